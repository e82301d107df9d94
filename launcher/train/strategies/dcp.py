"""torch.distributed.checkpoint (DCP) save/load of model + optimizer, shared by the ddp and fsdp strategies.

DCP writes one file per rank plus ``.metadata`` (each fsynced by the rank that wrote it: ``sync_files``) and reshards
on load, so a checkpoint written by N ranks loads on M.

- Frozen parameters (the base under LoRA) are left out (``ignore_frozen_params``): the base is rebuilt at resume and
  checked against the fingerprint the checkpoint records (``launcher.train.frozen_base``).
- ``save_async``: DCP's ``async_save``. The loop waits only while the state is copied to host memory (pinned, reused
  between saves, on GPUs); a background thread writes the files. Its collectives (gathering the write plans, the
  metadata) run on a gloo group of their own, so they never interleave with training's collectives on the default
  group, and a NCCL job needs no CPU backend on it.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, List, Optional

import torch

from launcher.train.strategies.base import Strategy

DCP_DIR = "dcp"


class TorchNativeStrategy(Strategy):
    """ddp and fsdp: a torch optimizer stepped by hand, model and optimizer checkpointed with DCP."""

    _trainable: Optional[List[torch.nn.Parameter]] = None
    _stager: Any = None  # DCP's DefaultStager: keeps the host copy (pinned on GPUs) from one async save to the next
    _save_group: Any = None  # the gloo group of the background writes

    def step(self) -> torch.Tensor:
        if self._trainable is None:  # the same parameters every step: list them once
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        clip = float(self.train.grad_clip)
        norm = torch.nn.utils.clip_grad_norm_(self._trainable, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a sharded DTensor norm
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def save(self, directory: Path) -> None:
        save(self.model, self.optimizer, directory, delay_s=_delay_s(self.train))

    def save_async(self, directory: Path) -> Optional[Future]:
        """Collective: stage (blocking), then write in the background; the future resolves once every rank's files
        and ``.metadata`` are on disk (on rank 0: DCP's coordinator writes ``.metadata`` after all shards)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._save_group is None:
            self._save_group = dist.new_group(backend="gloo")
        if self._stager is None:
            gpu = self.env.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=gpu))
        return save_async(self.model, self.optimizer, directory, stager=self._stager, group=self._save_group,
                          delay_s=_delay_s(self.train))

    def load(self, directory: Path) -> None:
        load(self.model, self.optimizer, directory)


def _delay_s(train: Any) -> float:
    return max(0.0, float(getattr(train, "debug_save_sleep_s", 0.0) or 0.0))


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: the frozen keys are absent on purpose; a trainable key missing from the checkpoint still fails
    # in dcp.load, which loads exactly the keys asked for.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _writer(directory: Path, delay_s: float) -> Any:
    """DCP's file writer (fsyncs every file); with ``delay_s``, a test's slow file system."""
    from torch.distributed.checkpoint import FileSystemWriter

    path = str(Path(directory) / DCP_DIR)
    if not delay_s:
        return FileSystemWriter(path)

    class SlowWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)
            time.sleep(delay_s)  # shards on disk, no .metadata yet: a kill now leaves an unreadable DCP directory
            return written

    return SlowWriter(path)


# A bitsandbytes 4-bit weight's quantization constants: entries of the frozen base that ignore_frozen_params keeps
# (they are not parameters). They belong to the base, which the fingerprint covers; an evaluation repacks them in place.
_QUANT_STATE = re.compile(r"\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$")


def _state(model: Any, optimizer: Any) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    model_sd = {key: value for key, value in model_sd.items() if not _QUANT_STATE.search(key)}
    return {"model": model_sd, "optim": optim_sd}


def save(model: Any, optimizer: Any, directory: Path, *, delay_s: float = 0.0) -> None:
    """Collective: model (trainable parameters) and optimizer state under ``directory/dcp``."""
    import torch.distributed.checkpoint as dcp

    # The default FileSystemWriter fsyncs every file it writes (sync_files=True): nobody needs to fsync them again.
    dcp.save(_state(model, optimizer), storage_writer=_writer(directory, delay_s))


def save_async(model: Any, optimizer: Any, directory: Path, *, stager: Any, group: Any,
               delay_s: float = 0.0) -> Future:
    """Collective: what ``save`` writes, from a host copy, in a background thread. Returns DCP's future."""
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(_state(model, optimizer), storage_writer=_writer(directory, delay_s), process_group=group,
                          async_stager=stager)


def load(model: Any, optimizer: Any, directory: Path) -> None:
    """Collective: restore what ``save`` wrote, resharded to this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())


def checkpoint_problem(directory: Path) -> Optional[str]:
    """Why ``directory`` holds no loadable DCP checkpoint (cheap file checks), or None."""
    path = Path(directory) / DCP_DIR
    if not (path / ".metadata").is_file():
        return f"{path}/.metadata is missing"
    if not any(path.glob("*.distcp")):
        return f"{path} holds no .distcp shard"
    return None
