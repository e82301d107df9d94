"""torch.distributed.checkpoint (DCP) save/load of model + optimizer, shared by the ddp and fsdp strategies.

DCP writes one file per rank plus ``.metadata`` (each fsynced by the rank that wrote it: ``sync_files``) and reshards
on load, so a checkpoint written by N ranks loads on M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import torch

from launcher.train.strategies.base import Strategy

DCP_DIR = "dcp"


class TorchNativeStrategy(Strategy):
    """ddp and fsdp: a torch optimizer stepped by hand, model and optimizer checkpointed with DCP."""

    _trainable: Optional[List[torch.nn.Parameter]] = None

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
        save(self.model, self.optimizer, directory)

    def load(self, directory: Path) -> None:
        load(self.model, self.optimizer, directory)


def save(model: Any, optimizer: Any, directory: Path) -> None:
    """Collective: model and optimizer state under ``directory/dcp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    # The default FileSystemWriter fsyncs every file it writes (sync_files=True): nobody needs to fsync them again.
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(directory) / DCP_DIR))


def load(model: Any, optimizer: Any, directory: Path) -> None:
    """Collective: restore what ``save`` wrote, resharded to this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def checkpoint_problem(directory: Path) -> Optional[str]:
    """Why ``directory`` holds no loadable DCP checkpoint (cheap file checks), or None."""
    path = Path(directory) / DCP_DIR
    if not (path / ".metadata").is_file():
        return f"{path}/.metadata is missing"
    if not any(path.glob("*.distcp")):
        return f"{path} holds no .distcp shard"
    return None
