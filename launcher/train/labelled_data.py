"""Labelled records for ``task=classification``: a text field and a label field in CSV or JSON Lines files.

Stdlib only (the login node checks the data with it before submitting; the job reads it too). Labels may be strings or
integers; the label set is read from the data and sorted (numerically when every label is an integer, so ``10`` comes
after ``9``): its order is the class ids the model learns (``id2label`` in the exported config).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from launcher.train.data_formats import iter_json_records, loader_name, resolve_data_files

Record = Tuple[str, str]  # (text, label as a string)


def iter_labelled(path: str | Path, text_field: str, label_field: str,
                  max_records: Optional[int] = None) -> Iterator[Record]:
    """(text, label) for each record of ``path`` (a file or a directory of one kind); raises ValueError naming
    file:line and the field for a record without a text or a label."""
    files = resolve_data_files(path)
    if loader_name(files) == "text":
        raise ValueError(f"{files[0]}: task=classification reads CSV or JSON Lines records with a text and a label "
                         "field, not a .txt file")
    for file in files:
        records = _csv_records(file) if loader_name([file]) == "csv" else iter_json_records(file)
        for count, (location, record) in enumerate(records, start=1):
            yield _labelled(location, record, text_field, label_field)
            if max_records is not None and count >= max_records:
                break


def _csv_records(path: Path) -> Iterator[Tuple[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            yield f"{path}:{lineno}", row


def _labelled(location: str, record: Any, text_field: str, label_field: str) -> Record:
    if not isinstance(record, dict):
        raise ValueError(f"{location}: a {type(record).__name__}, not a record with fields")
    text, label = record.get(text_field), record.get(label_field)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{location}: task.text_field={text_field!r}: no text in this record "
                         f"(fields: {sorted(k for k in record if k is not None)})")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise ValueError(f"{location}: task.label_field={label_field!r}: a string or integer label is needed, got "
                         f"{label!r} (fields: {sorted(k for k in record if k is not None)})")
    return text, str(label).strip()


def label_names(labels: Sequence[str]) -> List[str]:
    """The distinct labels, sorted: numerically when all are integers, else as strings."""
    distinct = set(labels)
    if all(_is_int(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def check_labelled_data(path: str | Path, text_field: str, label_field: str, max_records: int) -> int:
    """The login node's check: the first ``max_records`` records per file have a text and a label, and there are
    at least two labels among them. Returns the records checked."""
    labels = [label for _, label in iter_labelled(path, text_field, label_field, max_records)]
    if not labels:
        raise ValueError(f"{path}: no records")
    if len(set(labels)) < 2 and len(labels) >= max_records:
        return len(labels)  # only a prefix was read: the other labels may come later
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: task.label_field={label_field!r}: every record has the label {labels[0]!r}; "
                         "classification needs at least two labels")
    return len(labels)
