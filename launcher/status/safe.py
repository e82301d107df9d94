"""Reading a run directory's files without trusting them: regular files only (a FIFO never blocks a read), inside
the run directory (no ``..``, no symlink out), bounded sizes; and log text stripped of terminal control sequences.

Stdlib only (login node).
"""

from __future__ import annotations

import codecs
import math
import os
import re
import stat
from pathlib import Path
from typing import IO, Any, Dict, Optional, Tuple

from launcher.cli_errors import clean

NUMBER_LIMIT = 1e18  # no step, token count, rate or time of a job comes near this; inf follows from products


def is_finite_number(value: Any) -> bool:
    """An int or float that is finite and of a plausible size (below ``NUMBER_LIMIT``); bools are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -NUMBER_LIMIT < value < NUMBER_LIMIT
    return math.isfinite(value) and abs(value) < NUMBER_LIMIT


def parse_record(line: bytes) -> Optional[Dict[str, Any]]:
    """One metrics.jsonl line as a dict, None for anything else (``rundir.parse_metrics_line``, also when the
    line nests deeper than the parser can go)."""
    from launcher.rundir import parse_metrics_line

    try:
        return parse_metrics_line(line)
    except (RecursionError, MemoryError):
        return None


class NotRegularFile(OSError):
    """The path exists but is not a regular file; reading it could block (a FIFO) or mean nothing."""


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading when it is a regular file (following symlinks). ``FileNotFoundError`` when it is
    absent, ``NotRegularFile`` when it is something else. Opened non-blocking, so that a FIFO cannot hang the open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{kind_of(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``ValueError`` when larger); see ``open_regular``."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise ValueError(f"{size:,} bytes, more than the {limit:,} a {Path(path).name} can be")
        return handle.read(limit + 1)


def problem_of(error: BaseException) -> str:
    """Why a file could not be read, in a few words (no traceback, no echoed content)."""
    if isinstance(error, NotRegularFile):
        return str(error)
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (binary?): byte 0x{error.object[error.start]:02x} at offset {error.start}"
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error.strerror or error}"
    return f"{type(error).__name__}: {clean(str(error))[:160]}"


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (symlinks and ``..`` followed) to ``root`` or below it."""
    try:
        real, base = os.path.realpath(path), os.path.realpath(root)
    except (OSError, ValueError):
        return False
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def load_yaml_mapping(path: Path, limit: int) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the mapping a YAML file holds, None) or (None, why not): absent (why is None too), not a regular file, too
    large, not UTF-8, not YAML (where and what, without echoing the source), or not a mapping. PyYAML's safe loader."""
    import yaml  # PyYAML, a dependency of omegaconf; read lazily

    try:
        text = read_limited(path, limit).decode("utf-8")
        try:
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError:  # again with the Python parser: its messages say more than libyaml's
            data = yaml.load(text, Loader=yaml.SafeLoader)
    except FileNotFoundError:
        return None, None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, f"{type(error).__name__}{where}: {error.problem or error.context}"
    except (OSError, ValueError, yaml.YAMLError, RecursionError, MemoryError) as error:
        return None, problem_of(error)
    if not isinstance(data, dict):
        return None, f"not a mapping (a {type(data).__name__})"
    return data, None


def regular_problem(path: Path) -> Optional[str]:
    """None when ``path`` is a regular file or absent, else what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        return problem_of(error)
    return None if stat.S_ISREG(mode) else f"{kind_of(mode)}, not a regular file"


# -- log text ----------------------------------------------------------------------------------------------------

# An escape sequence that a chunk may end in the middle of: kept back until the next chunk.
_PARTIAL_ESCAPE = re.compile(r"(?:\x1b(?:\[[0-?]*[ -/]*|[\]PX^_][^\x07\x1b]{0,200})?|\x9b[0-?]*[ -/]*)\Z")


class LogCleaner:
    """Bytes of a log in, the same text out as UTF-8 without terminal escape sequences and control characters other
    than newline and tab (invalid UTF-8 becomes U+FFFD). Keeps state across chunks."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def feed(self, data: bytes, final: bool = False) -> bytes:
        text = self._held + self._decoder.decode(data, final)
        self._held = ""
        if not final:
            partial = _PARTIAL_ESCAPE.search(text)
            if partial and partial.start() < len(text):
                text, self._held = text[: partial.start()], text[partial.start():]
        return clean(text, keep_newlines=True).encode("utf-8")


class CleanOutput:
    """A binary stream that writes through a ``LogCleaner`` (what ``follow`` and ``logs`` print into)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.cleaner = out, LogCleaner()

    def write(self, data: bytes) -> int:
        self.out.write(self.cleaner.feed(data))
        return len(data)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.write(self.cleaner.feed(b"", final=True))
        self.out.flush()
