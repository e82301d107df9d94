"""Logs of a run: where the current attempt starts, which file is the newest job's, and a polling tail -F."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, IO, Optional, Tuple

from launcher import rundir
from launcher.cli_errors import clean
from launcher.status.runs import newest_job_of
from launcher.status.safe import NotRegularFile, open_regular

# The batch script's first line of an attempt in the task-0 log (slurm_templates/common_setup.sh).
_ATTEMPT_MARKER = re.compile(rb"(?:^|\n)(launcher: job \S+ attempt \d+ on )")
_CHUNK = 1 << 16


def attempt_offset(path: Path, block: int = 1 << 20) -> int:
    """Byte offset of the last attempt's first line ("launcher: job J attempt N on ...") in a log; 0 if none (or
    not a regular file)."""
    try:
        handle = open_regular(path)
    except OSError:
        return 0
    with handle:
        end = os.fstat(handle.fileno()).st_size
        carry = b""
        while end > 0:
            start = max(0, end - block)
            # One byte before the block shows whether the block starts a line.
            lead = 1 if start > 0 else 0
            handle.seek(start - lead)
            data = handle.read(end - start + lead) + carry
            matches = [m for m in _ATTEMPT_MARKER.finditer(data) if not (lead and m.start() == 0 and data[:1] != b"\n")]
            if matches:
                return start - lead + matches[-1].start(1)
            carry = data[lead:lead + 256]
            end = start
    return 0


def current_log(run_dir: Path, task: int = 0, job_id: Optional[str] = None) -> Tuple[Optional[str], Optional[Path]]:
    """(job id, log path) of the newest job (or job_id); the path may not exist yet (job pending)."""
    job = job_id or newest_job_of(run_dir)
    if job is None:
        return None, None
    return job, rundir.task_log(run_dir, job, task)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Follower:
    """One follow(): the file being read, which file it was (device, inode) and how far it was read."""

    def __init__(self, locate: Callable[[], Optional[Path]], out: IO[bytes], offset: int,
                 notify: Callable[[str], None], refuse: Callable[[Path], Optional[str]]) -> None:
        self.locate, self.out, self.notify, self.refuse = locate, out, notify, refuse
        self.path = locate()
        self.handle: Optional[IO[bytes]] = None
        self.identity: Optional[Tuple[int, int]] = None  # (device, inode) of the file last opened
        self.position = offset
        self.waiting_for: Optional[Path] = None

    def open(self) -> None:
        """Open the file if it exists (a regular file, not refused); start from its beginning when it was replaced or
        truncated."""
        assert self.path is not None
        try:
            why = self.refuse(self.path)
            if why:
                raise NotRegularFile(why)
            handle = open_regular(self.path)
        except OSError as error:
            if self.waiting_for != self.path:
                why = "the job has not started yet?" if isinstance(error, FileNotFoundError) else f"{error}: not read"
                self.notify(f"launcher: waiting for {clean(self.path)} ({why})")
                self.waiting_for = self.path
            return
        self.waiting_for = None
        stat = os.fstat(handle.fileno())
        opened = (stat.st_dev, stat.st_ino)
        if self.identity is not None and opened != self.identity:
            self.notify(f"launcher: {clean(self.path)} was replaced; following the new file from its start")
            self.position = 0
        elif stat.st_size < self.position:
            self.notify(f"launcher: {clean(self.path)} was truncated; following from its start")
            self.position = 0
        self.identity = opened
        handle.seek(self.position)
        self.handle = handle

    def pump(self) -> bool:
        """Copy what was appended to out. True to go on at once: data came, or the file must be reopened."""
        assert self.handle is not None and self.path is not None
        data = self.handle.read(_CHUNK)
        if data:
            self.out.write(data)
            self.out.flush()
            self.position += len(data)
            return True
        try:
            stat: Optional[os.stat_result] = os.stat(self.path)
        except FileNotFoundError:
            stat = None  # removed: keep the open file until the next rescan, then wait for a new one
        if stat is not None and ((stat.st_dev, stat.st_ino) != self.identity or stat.st_size < self.position):
            self.close()
            return True
        return False

    def rescan(self) -> bool:
        """Ask locate() again. True when it names a newer job's log (followed from its start); else close an idle
        file, so that the next open revalidates it (NFS close-to-open consistency)."""
        newer = self.locate()
        if newer is not None and newer != self.path:
            self.notify(f"launcher: a newer job of the run: following {clean(newer)}")
            self.close()
            self.path, self.position, self.identity, self.waiting_for = newer, 0, None, None
            return True
        self.close()
        return False

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def follow(
    locate: Callable[[], Optional[Path]],
    out: IO[bytes],
    *,
    offset: int = 0,
    poll_s: float = 0.5,
    rescan_s: float = 2.0,
    stop: Callable[[], bool] = lambda: False,
    notify: Callable[[str], None] = _stderr,
    refuse: Callable[[Path], Optional[str]] = lambda path: None,
) -> None:
    """tail -F: print what is appended to locate()'s file, across truncation and replacement, until stop().

    locate() is asked again every rescan_s: a newer job of the run (a resubmission) switches to its log. A requeue
    appends to the same file (the batch script opens it in append mode), so following simply goes on. Idle files
    are reopened every rescan_s, which makes NFS clients revalidate their cached size. Polls: inotify does not work
    on Lustre or NFS. Only regular files are read (a FIFO would block); ``refuse(path)`` gives a reason not to read
    one (it leads outside the run directory), and the follow waits as for a missing file.
    """
    tail = _Follower(locate, out, offset, notify, refuse)
    next_rescan = time.monotonic() + rescan_s
    try:
        while not stop():
            if tail.handle is None and tail.path is not None:
                tail.open()
            if tail.handle is not None and tail.pump():
                continue
            if time.monotonic() >= next_rescan:
                next_rescan = time.monotonic() + rescan_s
                if tail.rescan():
                    continue
            time.sleep(poll_s)
    finally:
        tail.close()
