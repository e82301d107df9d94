"""The fingerprint of a LoRA run's frozen base: what a checkpoint records instead of the base weights.

A LoRA checkpoint holds what training changes (adapters, their optimizer state, the loop state). The frozen base is
rebuilt at resume from where it came from, so the checkpoint records how to tell that it is the same base:

- a pretrained directory: its path and, per weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``), the size
  and a SHA-256 of 16 evenly spaced 64 KiB blocks (plus the first and last). Reading every byte of a 140 GB base would
  cost minutes per resume; another checkpoint of the same architecture differs in every block, so the sample tells
  them apart. A single flipped byte in between is not detected.
- a base built from the config: the model section's numbers and the seed that built it (``train.seed``), and the
  torch version (a different version may draw other initial weights from the same seed: it only warns).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
BLOCK = 64 * 1024
BLOCKS = 16


def _sampled_sha256(path: Path, size: int) -> str:
    """SHA-256 over the size and ``BLOCKS`` + 2 blocks of ``path`` (all of it when it is small)."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= BLOCK * (BLOCKS + 2):
            digest.update(handle.read())
            return digest.hexdigest()
        offsets = [0, size - BLOCK] + [i * (size - BLOCK) // (BLOCKS + 1) for i in range(1, BLOCKS + 1)]
        for offset in sorted(offsets):
            handle.seek(offset)
            digest.update(handle.read(BLOCK))
    return digest.hexdigest()


def _weight_files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def base_fingerprint(model: Any, *, seed: int) -> Dict[str, Any]:
    """The fingerprint of the base that ``model`` (the schema's ``ModelConfig``) builds with ``seed``."""
    fields = asdict(model) if is_dataclass(model) else dict(model)
    if fields.get("pretrained"):
        directory = Path(fields["pretrained"]).expanduser().resolve()
        files = {}
        for path in _weight_files(directory):
            size = os.stat(path).st_size
            files[str(path.relative_to(directory))] = {"size": size, "sha256": _sampled_sha256(path, size)}
        return {"source": "pretrained", "path": str(directory), "files": files}
    import torch

    numbers = {k: v for k, v in fields.items() if k not in ("name", "pretrained", "tokenizer", "gradient_checkpointing")}
    return {"source": "config", "model": numbers, "seed": int(seed), "torch": torch.__version__}


def fingerprint_problem(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any]) -> Optional[str]:
    """Why a checkpoint with base ``saved`` cannot continue on base ``current`` (None: the same base)."""
    if not saved:
        return None  # a checkpoint that holds its base weights (written before adapter-only checkpoints)
    if saved.get("source") != current.get("source"):
        return f"it was trained on a base from {saved.get('source')}, this run builds one from {current.get('source')}"
    if current["source"] == "pretrained":
        old, new = saved.get("files", {}), current.get("files", {})
        changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        if changed:
            return (f"the weight files of model.pretrained differ from the base it was trained on "
                    f"({saved.get('path')}): {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}")
        return None
    changed = sorted(k for k in set(saved["model"]) | set(current["model"])
                     if saved["model"].get(k) != current["model"].get(k))
    if saved.get("seed") != current.get("seed"):
        changed.append(f"train.seed ({saved.get('seed')} -> {current.get('seed')})")
    if changed:
        return "the base is built from the config and these settings changed: " + ", ".join(
            c if c.startswith("train.") else f"model.{c}" for c in changed)
    return None


def fingerprint_notes(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any]) -> List[str]:
    """Differences that do not refuse the resume but are worth a warning."""
    if not saved:
        return []
    notes = []
    if current.get("source") == "pretrained" and saved.get("path") != current.get("path"):
        notes.append(f"the base moved from {saved.get('path')} to {current.get('path')} (same weight files)")
    if current.get("source") == "config" and saved.get("torch") != current.get("torch"):
        notes.append(f"torch {saved.get('torch')} built the base, this is {current.get('torch')}: check that the "
                     "same seed gives the same initial weights")
    return notes
