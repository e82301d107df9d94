"""Inputs checked on the login node before anything waits in a queue: the data (it exists, is text, its format is
detected or checked, its first records parse, a bad line is named as file:line), the model and tokenizer
directories or Hub ids. Reads only the first records of each file; stdlib only (``launcher.train.data_formats`` is
too), but for huggingface_hub, imported when a value is a Hub id."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.errors import ConfigError

# Records read per file on the login node: enough for the format and a malformed line early in a file.
RECORDS_CHECKED = 200
_SNIFF_BYTES = 8192


def check_inputs(cfg: Mapping[str, Any]) -> Optional[str]:
    """Check data, model and tokenizer paths (a Hub id: its pinned snapshot in the HF cache the job uses, see
    ``launcher.hub``); returns the data format (explicit, else detected from the file)."""
    model = cfg["model"]
    for key, needs in (("pretrained", ("config.json",)), ("tokenizer", ("tokenizer.json", "tokenizer_config.json"))):
        value = model[key]
        if value is None:
            continue
        if _check_hub_id(cfg, key, value):
            continue
        path = Path(str(value)).expanduser()
        if not str(value).strip() or not path.is_dir():
            raise ConfigError(f"model.{key}", value, "an existing local directory (compute nodes never download), "
                                                     "or a Hub id org/name[@revision] staged on the login node")
        if not any((path / name).is_file() for name in needs):
            raise ConfigError(f"model.{key}", value, f"a Hugging Face directory holding {' or '.join(needs)} "
                                                     "(save_pretrained writes it)")
    check_epochs(cfg["train"], cfg["data"])
    if (cfg.get("task") or {}).get("name") == "classification":
        return cfg["data"]["format"]  # labelled records (validation._check_task read them): no text format to detect
    return check_data(cfg["data"])


def check_epochs(train: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """train.epochs sets max_steps: both at once would leave one ignored. "Set" for max_steps means changed from the
    schema's default (a YAML group that sets it, such as training=benchmark, counts as setting it)."""
    from launcher.config.schema import TrainConfig

    epochs = train.get("epochs")
    if epochs is None:
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError("train.epochs", epochs, "a whole number of passes, at least 1, or null to use max_steps")
    if train["max_steps"] != TrainConfig.max_steps:
        raise ConfigError("train.epochs", epochs, f"not together with train.max_steps={train['max_steps']}: "
                                                  "train.epochs sets max_steps", "drop one of the two")
    if data.get("sources"):
        raise ConfigError("train.epochs", epochs, "a single data.path: a mixture (data.sources) draws by weight and "
                                                  "has no epochs", "set train.max_steps instead")


def _check_hub_id(cfg: Mapping[str, Any], key: str, value: Any) -> bool:
    """True when ``model.<key>`` is a Hub id whose snapshot holds what the run reads (ConfigError otherwise); False
    for a local path. huggingface_hub is imported only here, for a Hub id."""
    from launcher import hub

    field = f"model.{key}"
    hub_id = hub.parse(field, value)
    if hub_id is None:
        return False
    cluster = cfg.get("cluster") or {}
    home = hub.hf_home(cluster.get("hf_home"))
    if cluster.get("container") and re.search(r"[,:]", str(home)):
        raise ConfigError("cluster.hf_home", str(home), "a path without ',' or ':' (it is bound into the container)")
    from_pretrained = key == "pretrained"
    tokenizer = not from_pretrained or cfg["model"]["tokenizer"] is None
    hub.resolve(field, hub_id, home, model=from_pretrained, tokenizer=tokenizer,
                stage=hub.stage_command(cfg, field, str(value)))
    return True


def check_data(data: Mapping[str, Any]) -> str:
    """data.path (or each of data.sources) and the tokenizing settings; returns the data format."""
    workers = data.get("num_workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError("data.num_workers", workers, "a number of processes, at least 1, or null for the job's cores")
    if not data.get("sources"):
        return _check_path("data.path", data["path"], data["format"])
    formats = set()
    for i, source in enumerate(data["sources"]):
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.sources[{i}].weight", weight, "a number above 0 (weights need not sum to 1)")
        formats.add(_check_path(f"data.sources[{i}].path", source.get("path"), data["format"]))
    packed = formats <= {"text", "jsonl_text"}
    if len(formats) > 1 or not packed:
        raise ConfigError("data.sources", [s.get("path") for s in data["sources"]],
                          f"packed data of one format (text or jsonl_text), not {sorted(formats)}")
    return formats.pop()


def _check_path(name: str, raw: Any, fmt: Optional[str]) -> str:
    from launcher.train.data_formats import resolve_data_files, validate_data_file

    path = Path(str(raw)).expanduser()
    if raw is None or not str(raw).strip() or not path.exists():
        raise ConfigError(name, raw, "an existing file or directory of data files")
    try:
        files = resolve_data_files(path)
    except (ValueError, OSError) as error:
        raise ConfigError(name, str(path), f"a file or a directory holding data files ({error})") from None
    for file in files:
        problem = _not_text(file)
        if problem:
            raise ConfigError(name, str(file), f"a non-empty text file ({problem})")
    try:
        summary = validate_data_file(path, fmt, max_records=RECORDS_CHECKED)
    except ConfigError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as error:
        allowed = "records of the format: " + (fmt or "detected from the first record")
        raise ConfigError(name, str(path), f"{allowed}; {error}") from None
    return summary.format


def _not_text(path: Path) -> Optional[str]:
    """Why ``path`` is not a text data file (empty, binary, not UTF-8), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as error:
        return f"unreadable: {error.strerror}"
    if not head.strip():
        return "it is empty"
    if b"\x00" in head:
        return "it holds NUL bytes: a binary file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # a multi-byte character cut at the sniff boundary is fine
            return f"not UTF-8 at byte {error.start}"
    return None
