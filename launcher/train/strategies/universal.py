"""Resume a ZeRO 1-3 checkpoint on another world size through DeepSpeed's universal checkpoint.

ZeRO partitions the fp32 master weights and the Adam moments per rank, so the files of N ranks do not load on M.
``deepspeed.checkpoint.ds_to_universal`` rewrites them per parameter (``zero/<name>/fp32.pt``, ``exp_avg.pt``,
``exp_avg_sq.pt``, plus the optimizer step), and the engine loads that on any world size with its ``load_universal``
setting. The model-states file (module, LR scheduler, step counters) is copied along.

The conversion runs on rank 0, once per checkpoint, into ``<checkpoint>/deepspeed-universal/`` (written as ``.tmp``,
renamed when done, so a crash leaves nothing that looks finished); the other ranks wait on the shared file system
(``run_together``), with no collective timeout. A second resume on the new world size reuses it; retention removes it
with its checkpoint. It is not in the checkpoint's ``COMPLETE`` manifest (written later, derived, rebuildable).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

from launcher.train.distributed import barrier, log, run_together

UNIVERSAL_TAG = "deepspeed-universal"


def saved_world_size(directory: Path, tag: str) -> int:
    """How many data-parallel ranks wrote the ZeRO checkpoint under ``directory/tag`` (one optimizer file each)."""
    return len(list((Path(directory) / tag).glob("*optim_states.pt")))


def _convert(directory: Path, tag: str) -> None:
    """Rank 0: ``ds_to_universal`` from ``directory/tag`` into ``directory/UNIVERSAL_TAG``."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final = directory / UNIVERSAL_TAG
    if final.is_dir():
        return
    tmp = directory / f"{UNIVERSAL_TAG}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(directory / tag), output_folder=str(tmp),
        # Worker processes would fork a rank that holds a process group: convert in this process.
        num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # Our engines never set the model's universal_checkpoint_info; the defaults are right for plain ZeRO.
        inject_missing_state=True,
    )
    started = time.perf_counter()
    output = io.StringIO()  # its prints and progress bars, shown only when it fails
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal(args)
    except BaseException:
        log(f"ds_to_universal failed on {directory / tag}:\n{output.getvalue()[-4000:]}")
        raise
    (directory / "latest_universal").unlink(missing_ok=True)  # it names the .tmp; we pass the tag ourselves
    os.replace(tmp, final)
    log(f"converted {directory / tag} to DeepSpeed's universal checkpoint in {time.perf_counter() - started:.1f}s")


def load_universal(engine: Any, directory: Path, tag: str, *, strict: bool, is_main: bool, device: Any) -> None:
    """Collective: convert (rank 0, once) and load the universal checkpoint into ``engine`` on this world size."""
    directory = Path(directory)

    def convert(done: Any) -> None:
        if is_main:
            _convert(directory, tag)
        done()

    run_together(convert, device, "converting the checkpoint to DeepSpeed's universal format", flag_dir=directory)
    barrier()
    config = engine._config  # the engine reads load_universal at load time only: switch it on for this load
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(directory), tag=UNIVERSAL_TAG, load_module_strict=strict,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint in {directory / UNIVERSAL_TAG}")
