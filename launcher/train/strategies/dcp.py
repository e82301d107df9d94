"""torch.distributed.checkpoint (DCP) save/load of model + optimizer, shared by the ddp and fsdp strategies.

DCP writes one file per rank plus ``.metadata`` and reshards on load, so a checkpoint written by N ranks loads on M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from launcher.train.strategies.base import Strategy

DCP_DIR = "dcp"


class TorchNativeStrategy(Strategy):
    """ddp and fsdp: a torch optimizer stepped by hand, model and optimizer checkpointed with DCP."""

    def step(self) -> torch.Tensor:
        clip = float(self.train_cfg.grad_clip)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
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

    def checkpoint_problem(self, directory: Path) -> Optional[str]:
        return problem(directory)


def save(model: Any, optimizer: Any, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(directory) / DCP_DIR))


def load(model: Any, optimizer: Any, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def problem(directory: Path) -> Optional[str]:
    path = Path(directory) / DCP_DIR
    if not (path / ".metadata").is_file():
        return f"{path}/.metadata is missing"
    if not any(path.glob("*.distcp")):
        return f"{path} holds no .distcp shard"
    return None
