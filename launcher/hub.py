"""Hugging Face Hub ids for ``model.pretrained`` and ``model.tokenizer``, resolved on the login node (docs/models.md).

A value is a Hub id when it is not an existing local path and reads ``org/name`` or ``org/name@revision``. It is
resolved offline, through huggingface_hub's own cache code (``snapshot_download(local_files_only=True)``: ``refs/<rev>``
-> ``snapshots/<hash>``), against ``<hf_home>/hub`` where ``hf_home`` is the profile's ``cluster.hf_home`` (the job
exports the same directory as ``HF_HOME``), else ``$HF_HOME`` or ``~/.cache/huggingface``. The snapshot must then be
complete: ``config.json``, the tokenizer files when the tokenizer comes from it, and safetensors weights
(``model.safetensors``, or ``model.safetensors.index.json`` and every shard it lists). The job gets the pinned
snapshot path (``.../models--org--name/snapshots/<40 hex>``), never the id.

Stdlib only at import: huggingface_hub is imported when a Hub id is resolved, so dry runs of local paths or of
models built from their numbers never pay for it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from launcher.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,253}[A-Za-z0-9_])?")
HUB_ID_SHAPE = ("a Hub id org/name or org/name@revision (letters, digits, '-', '_', '.'; no '--' or '..'; "
                "a revision is a branch, a tag or a 40-hex commit)")
CONFIG_PATTERNS = ["config.json", "generation_config.json"]
# What AutoTokenizer reads: the fast tokenizer, a sentencepiece model, or a BPE's vocab and merges, with its config.
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"]
# Safetensors only: a single file or the index and its shards (never consolidated.safetensors, *.bin, *.pt).
WEIGHT_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
INDEX = "model.safetensors.index.json"
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class HubId:
    text: str  # as the user wrote it
    repo_id: str
    revision: str  # "main" when none was given


@dataclass(frozen=True)
class Snapshot:
    """A Hub id resolved to its pinned local snapshot, with what the login node found in it."""

    field: str
    hub_id: HubId
    path: str  # <hf_home>/hub/models--org--name/snapshots/<commit>
    parts: Tuple[str, ...] = ()  # "config", "tokenizer", "4 of 4 shards"

    def describe(self) -> str:
        found = f" ({', '.join(self.parts)})" if self.parts else ""
        return f"{self.hub_id.repo_id}@{self.hub_id.revision} -> {self.path}{found}"


# Resolutions of this process, by (hf_home, field, value): the check, the typed config and the summary share one.
_RESOLVED: Dict[Tuple[str, str, str], Snapshot] = {}


def default_hf_home() -> Path:
    """Where huggingface_hub puts its cache without a profile: ``$HF_HOME``, else ``~/.cache/huggingface``."""
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser().absolute()


def hf_home(configured: Optional[str]) -> Path:
    """The HF home the job uses: the profile's ``cluster.hf_home`` (absolute), else ``default_hf_home()``."""
    return Path(configured).expanduser().absolute() if configured else default_hf_home()


def hub_cache(home: Path) -> Path:
    """huggingface_hub's cache under an HF home (``HF_HUB_CACHE`` defaults to ``$HF_HOME/hub``)."""
    return Path(home) / "hub"


def parse(field: str, value: Any) -> Optional[HubId]:
    """The Hub id ``value`` names, or None for a local path; ConfigError for a shape that could be either or neither."""
    text = str(value)
    if not text.strip() or Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or "\\" in text:
        return None
    repo, at, revision = text.partition("@")
    if repo.count("/") != 1:
        return None  # "gpt2", "models/a/b": a local path (its check says that it does not exist)
    org, name = repo.split("/")
    names_ok = all(_NAME.fullmatch(part) and "--" not in part and ".." not in part for part in (org, name))
    revision_ok = not at or (_REVISION.fullmatch(revision) and ".." not in revision and "//" not in revision
                             and not revision.endswith(".lock"))
    if not names_ok or not revision_ok:
        raise ConfigError(field, text, f"an existing local directory, or {HUB_ID_SHAPE}")
    if Path(org).expanduser().is_dir():
        raise ConfigError(field, text, f"./{repo} for a local directory, or {HUB_ID_SHAPE}",
                          f"ambiguous: the directory ./{org} exists here but holds no {name}")
    return HubId(text, repo, revision if at else "main")


def stage_command(cfg: Mapping[str, Any], field: str, value: str) -> str:
    """The command that stages ``value`` into the cache this config resolves against."""
    words = ["python", "-m", "launcher.stage"]
    cluster = cfg.get("cluster") or {}
    if cluster:
        words.append(f"+cluster={cluster['name']}")
        if cluster.get("account"):
            words.append(f"cluster.account={cluster['account']}")
    return " ".join(shlex.quote(w) for w in [*words, f"{field}={value}"])


def resolve(field: str, hub_id: HubId, home: Path, *, model: bool, tokenizer: bool, stage: str) -> Snapshot:
    """The pinned snapshot of ``hub_id`` in ``home``'s cache, checked for the files the run reads (ConfigError
    naming the field, the value and the first missing file otherwise)."""
    path = locate(field, hub_id, home, stage=stage, patterns=allow_patterns(model=model, tokenizer=tokenizer))
    parts: List[str] = []
    if model:
        _require(field, hub_id, path, "config.json", (path / "config.json").is_file(), stage)
        parts.append("config")
    if tokenizer:
        _require(field, hub_id, path, "tokenizer.json (or tokenizer.model, or vocab.json and merges.txt)",
                 has_tokenizer(path), stage)
        parts.append("tokenizer")
    if model:
        parts.append(_check_weights(field, hub_id, path, stage))
    snapshot = Snapshot(field, hub_id, str(path), tuple(parts))
    key = (str(home), field, hub_id.text)
    _RESOLVED.pop(key, None)  # the newest resolution last: ``resolved`` reads from the end
    _RESOLVED[key] = snapshot
    return snapshot


def pinned_path(field: str, value: str, home: Path) -> str:
    """The snapshot path of an id ``resolve`` checked in this process (else located again, unchecked)."""
    known = _RESOLVED.get((str(home), field, value))
    if known is not None:
        return known.path
    hub_id = parse(field, value)
    assert hub_id is not None, value
    return str(locate(field, hub_id, home, stage=stage_command({}, field, value)))


def resolved(field: str, path: Optional[str]) -> Optional[Snapshot]:
    """The resolution that gave ``field`` its ``path`` (a snapshot path in a typed config); None for a local path."""
    return next((s for s in reversed(_RESOLVED.values()) if path and s.field == field and s.path == path), None)


def allow_patterns(*, model: bool, tokenizer: bool) -> List[str]:
    """The files of a repository the run reads: what ``launcher.stage`` downloads and what the check expects."""
    return (CONFIG_PATTERNS + WEIGHT_PATTERNS if model else []) + (TOKENIZER_PATTERNS if tokenizer else [])


def locate(field: str, hub_id: HubId, home: Path, *, stage: str, patterns: Optional[List[str]] = None) -> Path:
    """``refs/<revision>`` -> ``snapshots/<commit>`` through huggingface_hub's offline lookup; where it keeps the
    repository's file list (``trees/<commit>.json``), a file of ``patterns`` missing from the snapshot is named."""
    from huggingface_hub import errors, snapshot_download

    incomplete = getattr(errors, "IncompleteSnapshotError", None)
    cache = hub_cache(home)
    try:
        found = snapshot_download(hub_id.repo_id, revision=hub_id.revision, cache_dir=str(cache),
                                  local_files_only=True, allow_patterns=patterns)
    except Exception as error:  # noqa: BLE001 - every failure of the lookup is the user's input or cache
        if incomplete is not None and isinstance(error, incomplete):
            missing = re.search(r"missing \((.*?)\)\.", str(error))
            why = f"an incomplete snapshot: missing {missing[1] if missing else error}"
        elif isinstance(error, errors.LocalEntryNotFoundError):
            why = f"not in the HF cache {cache} (revision {hub_id.revision})"
        elif isinstance(error, (OSError, ValueError)):
            why = f"not readable from the HF cache {cache}: {type(error).__name__}: {error}"
        else:
            raise
        raise ConfigError(field, hub_id.text, "a Hub id staged in the HF cache the job uses, or a local directory",
                          f"{why}; stage it on the login node: {stage}") from None
    # The cache as the job names it (huggingface_hub returns it resolved): snapshots link into ../../blobs, so the
    # snapshot and its repository folder stay under the one bound $HF_HOME.
    return cache / Path(found).relative_to(Path(cache).expanduser().resolve())


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")) or all(
        (path / name).is_file() for name in ("vocab.json", "merges.txt"))


def _require(field: str, hub_id: HubId, path: Path, what: str, present: bool, stage: str) -> None:
    if not present:
        raise ConfigError(field, hub_id.text, "a complete snapshot: config.json, tokenizer files and safetensors",
                          f"{what} missing in {path}; stage it again: {stage}")


def _check_weights(field: str, hub_id: HubId, path: Path, stage: str) -> str:
    """"N of N shards" for complete safetensors weights; ConfigError naming what is missing or why it is refused."""
    allowed = "safetensors weights: model.safetensors, or model.safetensors.index.json and every shard it lists"
    index = path / INDEX
    if index.is_file():
        shards = index_shards(field, hub_id.text, index)
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise ConfigError(field, hub_id.text, allowed,
                              f"shard {missing[0]} missing ({len(shards) - len(missing)} of {len(shards)} shards in "
                              f"{path}: missing {', '.join(missing)}); stage it again: {stage}")
        return f"{len(shards)} of {len(shards)} shards"
    if (path / "model.safetensors").is_file():
        return "1 of 1 shards"
    pickled = sorted(p.name for p in path.iterdir() if p.name.endswith(_PICKLED))
    if pickled:
        raise ConfigError(field, hub_id.text, allowed,
                          f"{path} holds pickled weights only ({', '.join(pickled[:3])}): the launcher loads "
                          "safetensors only, since loading a pickle can run code; pick a revision with safetensors "
                          "(the Hub's conversion PRs: @refs/pr/N) or convert it with save_pretrained")
    raise ConfigError(field, hub_id.text, allowed, f"no model.safetensors or {INDEX} in {path}; stage it: {stage}")


def index_shards(field: str, value: str, index: Path) -> List[str]:
    """The shard files a safetensors index lists (its ``weight_map`` values), in order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(field, value, f"a readable {INDEX} with a weight_map",
                          f"{index}: {type(error).__name__}: {error}") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ConfigError(field, value, "shards named relative to the snapshot", f"{index} lists {shard!r}")
    return shards
