"""Data file formats: which files we read, how a format is detected, and cheap validation.

Stdlib only (no torch, numpy or datasets), so the login node can check ``data.path`` before submitting; the
tokenizing side lives in ``launcher.train.data``. Every error names the file (and line) and what was expected.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from launcher.errors import ConfigError

# The formats and what their records hold: error messages list these so users see what would have worked.
FORMAT_FIELDS: dict[str, str] = {
    "text": "a .txt file, one document per line",
    "jsonl_text": 'JSON Lines records with a "text" field (or a .csv file with a "text" column)',
    "instruction": 'JSON Lines records with "instruction" and "output" (and optionally "input")',
    "chat": 'JSON Lines records with "messages": a list of {"role": ..., "content": ...}',
}
# Packed formats (documents concatenated into blocks) vs supervised ones (one padded example per record).
PACKED_FORMATS = ("text", "jsonl_text")
SUPERVISED_FORMATS = ("instruction", "chat")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# The instruction prompt (Alpaca-style) and the role tag of the default chat template. They live here so that
# iter_texts can feed the tokenizer the text the model will see: a BPE that learned "### Response:" spends a few
# tokens on it instead of a dozen bytes.
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
ROLE_TAG = "<|{role}|>\n"
# File extension -> datasets.load_dataset builder name.
LOADERS: dict[str, str] = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass(frozen=True)
class DataFileSummary:
    """What validate_data_file looked at."""

    files: tuple[Path, ...]
    format: str
    records_checked: int


def known_formats() -> str:
    return "; ".join(f"{name}: {fields}" for name, fields in FORMAT_FIELDS.items())


def resolve_data_files(path: str | Path) -> list[Path]:
    """The files behind ``data.path``: the file itself, or a directory's files of one supported kind, sorted."""
    root = Path(path).expanduser()
    if root.is_file():
        _loader(root)  # raises on an unsupported extension
        return [root.resolve()]
    if not root.exists():
        raise FileNotFoundError(f"data.path={str(path)!r}: no such file or directory")
    files = sorted(p.resolve() for p in root.iterdir() if p.is_file() and p.suffix.lower() in LOADERS)
    if not files:
        raise FileNotFoundError(f"data.path={str(path)!r}: directory has no {'/'.join(LOADERS)} files")
    # One load_dataset call reads them all, and it takes one builder.
    loaders = {LOADERS[p.suffix.lower()] for p in files}
    if len(loaders) > 1:
        raise ValueError(f"data.path={str(path)!r}: mixes file kinds {sorted(loaders)}; keep one kind per directory")
    return files


def loader_name(files: list[Path]) -> str:
    """The datasets builder ("text", "json" or "csv") for resolved files."""
    return _loader(files[0])


def _loader(path: Path) -> str:
    try:
        return LOADERS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; supported: {', '.join(LOADERS)}") from None


def iter_json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for each record of a JSON Lines file (or a .json holding one array)."""
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        yield from _iter_json_array(path)
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e}); expected one JSON object per line") from None


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = getattr(e, "lineno", "?")
        raise ValueError(f"{path}:{line}: malformed JSON ({e})") from None
    for i, record in enumerate(records):
        yield f"{path}[{i}]", record


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _record_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "text" in record:
        return "jsonl_text"
    return None


def detect_format(path: str | Path) -> str:
    """The data format from the extension and the first record's fields (a .csv with a text column is jsonl_text)."""
    first = resolve_data_files(path)[0]
    loader = _loader(first)
    if loader == "text":
        return "text"
    if loader == "csv":
        header = _csv_header(first)
        if "text" not in header:
            raise ValueError(f"{first}:1: CSV header {header} has no 'text' column; known formats: {known_formats()}")
        return "jsonl_text"
    for location, record in iter_json_records(first):
        fmt = _record_format(record)
        if fmt is None:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{location}: records with none of the known fields (got {fields}); known formats: {known_formats()}"
            )
        return fmt
    raise ValueError(f"{first}: no records")


def validate_data_file(path: str | Path, fmt: str | None = None, *, max_records: int | None = None) -> DataFileSummary:
    """Check that every record (or the first ``max_records`` per file) fits ``fmt``; raises naming ``file:line``.

    Reads the files once with the stdlib: cheap next to tokenizing, and it turns the datasets library's opaque
    Arrow errors into a line number. ``fmt=None`` detects the format first.
    """
    files = resolve_data_files(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMAT_FIELDS:
        allowed = f"one of {', '.join(FORMAT_FIELDS)}"
        raise ConfigError("data.format", fmt, allowed, "or null to detect it from the file")
    checked = sum(_validate_file(f, fmt, max_records) for f in files)
    return DataFileSummary(files=tuple(files), format=fmt, records_checked=checked)


def _validate_file(path: Path, fmt: str, max_records: int | None) -> int:
    loader = _loader(path)
    if fmt in SUPERVISED_FORMATS and loader != "json":
        raise ValueError(f"{path}: data.format={fmt} needs {FORMAT_FIELDS[fmt]}, not a {path.suffix} file")
    if loader == "text":
        count = _validate_text(path, max_records)
    elif loader == "csv":
        count = _validate_csv(path, max_records)
    else:
        count = _validate_json(path, fmt, max_records)
    if count == 0:
        raise ValueError(f"{path}: no records")
    return count


def _validate_text(path: Path, max_records: int | None) -> int:
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            count += bool(line.strip())
            if max_records is not None and count >= max_records:
                break
    return count


def _validate_csv(path: Path, max_records: int | None) -> int:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "text" not in (reader.fieldnames or []):
            raise ValueError(f"{path}:1: CSV header {reader.fieldnames} has no 'text' column")
        count = 0
        for count, _row in enumerate(reader, start=1):
            if max_records is not None and count >= max_records:
                break
    return count


def _validate_json(path: Path, fmt: str, max_records: int | None) -> int:
    count = 0
    for count, (location, record) in enumerate(iter_json_records(path), start=1):
        problem = _record_problem(record, fmt)
        if problem:
            raise ValueError(f"{location}: {problem}; data.format={fmt} expects {FORMAT_FIELDS[fmt]}")
        if max_records is not None and count >= max_records:
            break
    return count


def _record_problem(record: Any, fmt: str) -> str | None:
    """Why a record does not fit ``fmt`` (None when it does)."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a JSON object"
    if fmt in PACKED_FORMATS:
        return None if isinstance(record.get("text"), str) else _field_problem(record, "text")
    if fmt == "instruction":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                return _field_problem(record, key)
        if record.get("input") is not None and not isinstance(record["input"], str):
            return '"input" must be a string or null'
        return None
    return _messages_problem(record)


def _field_problem(record: dict, key: str) -> str:
    if key not in record:
        return f'no "{key}" field (fields: {sorted(record)})'
    return f'"{key}" is a {type(record[key]).__name__}, not a string'


def _messages_problem(record: dict) -> str | None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list' if "messages" in record else _field_problem(record, "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            return f"messages[{i}] needs a role in {CHAT_ROLES}"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}].content must be a string"
    return None


def iter_texts(path: str | Path, fmt: str | None = None) -> Iterator[str]:
    """Every piece of text in the data (documents, prompts, responses, messages): what a tokenizer trains on."""
    files = resolve_data_files(path)
    fmt = fmt or detect_format(path)
    for file in files:
        loader = _loader(file)
        if loader == "text":
            with file.open(encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())
        elif loader == "csv":
            with file.open(newline="", encoding="utf-8") as f:
                yield from (row["text"] for row in csv.DictReader(f) if row.get("text"))
        else:
            for _, record in iter_json_records(file):
                yield from _record_texts(record, fmt)


def instruction_prompt(record: dict) -> str:
    template = INSTRUCTION_PROMPT if record.get("input") else INSTRUCTION_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def _record_texts(record: dict, fmt: str) -> Iterator[str]:
    if fmt == "chat":
        yield from (ROLE_TAG.format(role=m["role"]) + m["content"] for m in record["messages"])
    elif fmt == "instruction":
        yield instruction_prompt(record) + record["output"]
    elif record.get("text"):
        yield record["text"]


def check_seq_len(seq_len: int, max_positions: int) -> None:
    """Refuse sequences longer than the model's position table (a pretrained config may say less than the YAML)."""
    if seq_len < 2:
        raise ConfigError("train.seq_len", seq_len, "at least 2 (the model predicts token t+1 from tokens <= t)")
    if seq_len > max_positions:
        raise ConfigError(
            "train.seq_len", seq_len, f"at most the model's max_position_embeddings={max_positions}",
            "lower train.seq_len or use a model with longer positions",
        )
