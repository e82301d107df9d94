"""Training batches on the device: collated from the memory-mapped split, pinned and copied one micro-batch ahead.

On GPUs a copy from pageable memory blocks the host even with ``non_blocking=True``. Here the collated batch goes
into pinned memory and its copy is queued while the device still works on the previous micro-batch, so the host runs
ahead. On CPU the collated batch is used as it is: nothing is copied and nothing is drawn ahead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import torch

Batch = Dict[str, "torch.Tensor"]


def to_device(batch: Batch, device: "torch.device") -> Batch:
    """``batch`` on ``device``: pinned host memory, then asynchronous copies (the batch itself on CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class DeviceBatches:
    """This rank's training micro-batches, in the sampler's order, on ``device`` (one drawn ahead on GPUs).

    ``sampler_state()`` is the sampler's position before any batch drawn ahead, so a checkpoint resumes at the first
    batch not trained on.
    """

    def __init__(self, split: Any, sampler: Any, device: "torch.device") -> None:
        self.split = split
        self.sampler = sampler
        self.device = device
        self.ahead = device.type == "cuda"
        self._pending: Optional[Tuple[Dict[str, Any], Batch]] = None  # (sampler state before it, batch)

    def _draw(self) -> Batch:
        indices: List[int] = self.sampler.next_indices()
        return to_device(self.split.collate(indices, skip_full_mask=True), self.device)

    def next(self, *, more: bool = True) -> Batch:
        """The next micro-batch; with ``more`` (and on GPUs) the one after it is collated and queued now."""
        if self._pending is not None:
            batch, self._pending = self._pending[1], None
        else:
            batch = self._draw()
        if self.ahead and more:
            state = self.sampler.state_dict()
            self._pending = (state, self._draw())
        return batch

    def sampler_state(self) -> Dict[str, Any]:
        """The sampler's position as if nothing had been drawn ahead (for checkpoints)."""
        return self._pending[0] if self._pending is not None else self.sampler.state_dict()
