"""Which sample indices each rank trains on, resumable across restarts and across world sizes.

The order is a per-epoch permutation seeded by (seed, epoch), cut into global batches; rank r takes its
contiguous slice of each. The saved position counts samples consumed globally, so a run resumed on a different
number of ranks continues at the same sample (the DP-degree mismatch behind loss jumps after resume in other
frameworks). Nothing here depends on the strategy (DDP, ZeRO, FSDP): only on seed, epoch and position.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)


def _permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    # SeedSequence over (seed, epoch): independent streams per epoch, stable across numpy versions and machines.
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class ResumableSampler:
    """``next_indices()`` gives this rank's micro-batch: ``global_batch_size // world_size`` indices.

    ``global_batch_size`` is the sequences of one micro-step over all ranks (micro_batch_size x world_size).
    The last incomplete global batch of an epoch is dropped; the next epoch starts with a new permutation.
    ``grad_accum``: an epoch holds a whole number of optimizer steps (``grad_accum`` global batches), so that
    ``train.epochs`` x ``steps_per_epoch`` steps are exactly that many passes.
    """

    def __init__(self, num_samples: int, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, grad_accum: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global batch of {global_batch_size} does not split evenly over {world_size} ranks")
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size} "
                f"(train.micro_batch_size x {world_size} ranks): lower train.micro_batch_size or train.seq_len, "
                "use fewer ranks, or add data"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        step = global_batch_size * max(1, grad_accum)
        # Whole optimizer steps per epoch (a split smaller than one step still yields its micro-batches).
        self._usable = num_samples - num_samples % step if num_samples >= step else num_samples
        self._epoch, self._offset = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def next_indices(self) -> list[int]:
        self._roll_over()  # also after a resume with a larger global batch than the one that saved
        perm = self._permutation()
        start = self._offset + self.rank * self.micro_batch_size
        indices = perm[start : start + self.micro_batch_size]
        self._offset += self.global_batch_size
        self._roll_over()  # so state_dict() right after an epoch's last batch already points at the next epoch
        return [int(i) for i in indices]

    def _roll_over(self) -> None:
        if self._offset + self.global_batch_size > self._usable:
            self._epoch, self._offset = self._epoch + 1, 0

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self._epoch:
            self._perm = _permutation(self.num_samples, self.seed, self._epoch, self.shuffle)
            self._perm_epoch = self._epoch
        return self._perm

    def state_dict(self) -> dict[str, int]:
        # num_samples is only checked on load: a different dataset makes the saved position meaningless.
        return {"epoch": self._epoch, "offset": self._offset, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved_n = state.get("num_samples", self.num_samples)
        if saved_n != self.num_samples:
            log.warning("resuming the data order of %d samples on a dataset of %d: the order differs from the "
                        "saved run's", saved_n, self.num_samples)
        self.seed = int(state["seed"])  # the run's data order belongs to the checkpoint, not the new command line
        self._epoch, self._offset = int(state["epoch"]), int(state["offset"])
        self._perm_epoch = -1


def steps_per_epoch(num_samples: int, *, micro_batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``num_samples`` (the sampler drops the last incomplete step's samples)."""
    return num_samples // (micro_batch_size * world_size * grad_accum)


class MixtureSampler:
    """Draws each sample's source by weight, then the source's next row in its own per-epoch permutation.

    The sources of global batch ``b`` come from a generator seeded by ``(seed, b)``; each source keeps a count of the
    rows drawn from it, and its j-th row is row ``j % n`` of its permutation for epoch ``j // n``. The state is the
    batch number and the counts, so a resume continues exactly, on any number of ranks. Indices are into the
    sources' rows concatenated (``launcher.train.packed.ConcatSplit``).
    """

    def __init__(self, sizes: list[int], weights: list[float], *, global_batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global batch of {global_batch_size} does not split evenly over {world_size} ranks")
        empty = [i for i, n in enumerate(sizes) if n < 1]
        if empty or len(sizes) != len(weights) or min(weights) <= 0:
            raise ValueError(f"data.sources: every source needs rows and a weight above 0 (rows {sizes}, weights "
                             f"{weights})")
        self.sizes, self.seed = [int(n) for n in sizes], seed
        self.p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.bases = np.cumsum([0, *self.sizes])[:-1]
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self._batch = 0
        self._counts = [0] * len(sizes)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def epoch(self) -> int:
        return 0

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def next_indices(self) -> list[int]:
        draws = np.random.default_rng([self.seed, 0x6D6978, self._batch]).choice(
            len(self.sizes), size=self.global_batch_size, p=self.p)
        batch = [self._next_row(int(s)) for s in draws]  # every rank walks the whole batch: counts stay equal
        self._batch += 1
        start = self.rank * self.micro_batch_size
        return batch[start : start + self.micro_batch_size]

    def _next_row(self, source: int) -> int:
        n, j = self.sizes[source], self._counts[source]
        epoch = j // n
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, source, epoch]).permutation(n))
            self._perms[source] = cached
        self._counts[source] = j + 1
        return int(self.bases[source] + cached[1][j % n])

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": True, "batch": self._batch, "counts": list(self._counts), "seed": self.seed,
                "sizes": list(self.sizes)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state.get("mixture"):
            raise ValueError("the checkpoint's data order is not a mixture's (data.sources changed since it was saved)")
        if list(state["sizes"]) != self.sizes:
            log.warning("resuming a mixture saved over sources of %s rows on sources of %s: the order differs",
                        state["sizes"], self.sizes)
        self.seed = int(state["seed"])
        self._batch, self._counts = int(state["batch"]), [int(c) for c in state["counts"]]
        self._perms.clear()


def eval_indices(num_samples: int, *, batch_size: int, rank: int, world_size: int, num_batches: int
                 ) -> list[list[int]]:
    """This rank's ``num_batches`` eval micro-batches: the first samples in order, each rank a contiguous slice.

    The same samples every evaluation, so eval losses compare across steps. Wraps around a split smaller than
    num_batches x batch_size x world_size (a tiny eval set repeats samples rather than giving ranks unequal batches).
    """
    if num_samples < 1:
        return []
    global_batch = batch_size * world_size
    batches = min(num_batches, -(-num_samples // global_batch))
    return [
        [(step * global_batch + rank * batch_size + j) % num_samples for j in range(batch_size)]
        for step in range(batches)
    ]
