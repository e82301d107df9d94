"""One error path for every command line (``python -m launcher``, ``launcher.status``, ``launcher.scaling``,
``launcher.container``).

    user error       one line ``launcher: error: <field>=<value>: <why>; <what is allowed>`` on stderr, exit 2
    internal error   one line saying so and naming the file under ``tempfile.gettempdir()`` that holds the
                     traceback, exit 1

Use::

    def main(argv=None) -> int:
        return run_cli(_main, argv)          # _main(argv) -> int raises UserError / ConfigError for bad input

A user error is a ``launcher.errors.UserError`` or ``ConfigError``, an error of Hydra's or OmegaConf's (a bad override
or interpolation: the user's config), or an ``ArgumentParser.error`` of the ``ArgumentParser`` below (argparse's
usage errors, as one line). Everything else is a bug. ``clean`` strips terminal control characters from text that
came from files or arguments before it is printed.

Stdlib only, imported by the login-node tools: never hydra, omegaconf or torch here (their errors are recognised by
their module name).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import traceback
from typing import IO, Callable, List, NoReturn, Optional, Sequence, Tuple

from launcher.errors import ConfigError, UserError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_INTERRUPTED = 130
PREFIX = "launcher: error: "
INTERNAL_LOG_PREFIX = "launcher-internal-error-"
VALUE_MAX_CHARS = 200

# Terminal control: ESC sequences (CSI, OSC/DCS/APC/PM/SOS strings up to their terminator, two-byte escapes), then any
# other C0 control, DEL and C1 control (U+0080..U+009F, which some terminals also obey).
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -~]?"
                     r"|\x9b[0-?]*[ -/]*[@-~]?")
# Bidirectional overrides and isolates go too: they make a name read as another ("Trojan Source").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_ALL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` without terminal escape sequences and control characters (``keep_newlines``: keeps ``\\n`` and
    ``\\t``, for log text; else they go too, for names and table cells)."""
    text = _ESCAPE.sub("", str(text))
    return (_CONTROL if keep_newlines else _CONTROL_ALL).sub("", text)


def show(value: object, limit: int = VALUE_MAX_CHARS) -> str:
    """A value as an error line shows it: strings bare unless they hold control characters or white space at an end
    (then escaped, in quotes), other values as Python writes them; at most ``limit`` characters."""
    if isinstance(value, str):
        text = value if value and _CONTROL_ALL.search(value) is None and value == value.strip() else repr(value)
    elif value is None:
        text = "(none)"
    elif isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        text = repr(value)
    text = clean(text)  # repr leaves C1 controls as they are
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(field: str, value: object, why: str, allowed: str = "") -> str:
    """``launcher: error: <field>=<value>: <why>; <allowed>`` (one line, control characters removed)."""
    line = f"{PREFIX}{clean(field)}={show(value)}: {clean(why).rstrip('.')}"
    return line + (f"; {clean(allowed)}" if allowed else "")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors raised as ``UserError`` (one line through ``run_cli``) instead of printing
    the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        field, value, why = _argparse_problem(message)
        raise UserError(field, value, why, f"see {self.prog} --help")


_ARGPARSE_FORMS: Tuple[Tuple["re.Pattern[str]", Callable[["re.Match[str]"], Tuple[str, object, str]]], ...] = (
    (re.compile(r"argument (\S+): invalid (\w+) value: '(.*)'$", re.S),
     lambda m: (m[1], m[3], f"not a valid {'integer' if m[2] == 'int' else m[2]}")),
    (re.compile(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)$", re.S),
     lambda m: (m[1], m[2], f"not one of {m[3]}")),
    (re.compile(r"argument (\S+): expected (.*)$", re.S), lambda m: (m[1], None, f"expected {m[2]}")),
    (re.compile(r"argument (\S+): (.*)$", re.S), lambda m: (m[1], _quoted(m[2]), m[2])),
    (re.compile(r"the following arguments are required: (.*)$", re.S), lambda m: (m[1], None, "required")),
    (re.compile(r"unrecognized arguments: (.*)$", re.S), lambda m: ("arguments", m[1], "not recognized")),
)


def _quoted(text: str) -> object:
    found = re.search(r"'([^']*)'|(-?[0-9][^ ,;]*)", text)
    return (found[1] if found[1] is not None else found[2]) if found else None


def _argparse_problem(message: str) -> Tuple[str, object, str]:
    for pattern, parts in _ARGPARSE_FORMS:
        match = pattern.match(message)
        if match:
            return parts(match)
    return "arguments", None, message


# -- recognising a user's error --------------------------------------------------------------------------------------


def _chain(error: BaseException) -> List[BaseException]:
    """The error and what caused it (``__cause__``, else ``__context__``), outermost first."""
    seen: List[BaseException] = []
    while error is not None and error not in seen and len(seen) < 8:
        seen.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return seen


def _library(error: BaseException) -> Optional[str]:
    root = type(error).__module__.split(".")[0]
    return root if root in ("hydra", "omegaconf") else None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _config_error_line(error: ConfigError) -> str:
    """``<field>=<value>: <hint, else "not allowed">; allowed: <allowed>``."""
    return error_line(error.field, error.value, error.hint or "not allowed", f"allowed: {error.allowed}")


_OMEGACONF_ALLOWED = (
    ("Interpolation", "an interpolation that resolves, e.g. ${train.lr}"),
    ("Validation", "a value of the type the schema gives (launcher/config/schema.py)"),
    ("Key", "a key of the schema (launcher/config/schema.py); +key=value adds one where that is allowed"),
    ("Attribute", "a key of the schema (launcher/config/schema.py); +key=value adds one where that is allowed"),
)


def _override_value(key: str, argv: Sequence[str]) -> Optional[str]:
    """The value the command line gave ``key`` (``key=v``, ``+key=v``, ``++key=v``), the last one; None if none."""
    found = None
    for arg in argv:
        name, sep, value = arg.lstrip("+~").partition("=")
        if sep and name == key:
            found = value
    return found


def _group_and_name(missing: str, argv: Sequence[str]) -> Tuple[str, str]:
    """("cluster", "../x") for Hydra's missing "cluster/../x": the override that asked for it, else the first "/"."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and f"{key}/{value}" == missing:
            return key, value
    group, _, name = missing.partition("/")
    return group, name


def _hydra_line(error: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for an error of Hydra's or OmegaConf's while composing or resolving the config."""
    for link in _chain(error):
        if getattr(link, "missing_cfg_file", None):
            group, name = _group_and_name(str(link.missing_cfg_file), argv)  # type: ignore[attr-defined]
            options = ", ".join(getattr(link, "options", None) or [])
            return error_line(group or "config", name, "no such config", f"one of: {options}" if options else "")
        if hasattr(link, "override"):
            key, _, value = str(getattr(link, "override")).partition("=")
            return error_line(key, value, "not valid override syntax",
                              "key=value; quote a value that holds spaces or ;|&$`()<> as key='value'")
        key = getattr(link, "full_key", None)
        if key:
            value = _override_value(str(key), argv)
            value = value if value is not None else getattr(link, "value", None)
            allowed = next((text for part, text in _OMEGACONF_ALLOWED if part in type(link).__name__),
                           "see launcher/config/schema.py")
            return error_line(str(key), "" if value is None else value, _first_line(link), allowed)
    first = _first_line(error)
    quoted = re.search(r"'([^']+)'", first)
    key = quoted[1] if quoted else "config"
    return error_line(key, _override_value(key, argv) or "", first, "see python -m launcher --help")


def describe(error: BaseException, argv: Sequence[str] = ()) -> Optional[str]:
    """The one line for a user's error, None for anything else (an internal error). ``argv``: the command line,
    where the value of a key that Hydra or OmegaConf names is looked up."""
    if isinstance(error, UserError):
        return error_line(error.field, error.value, error.why, error.allowed)
    if isinstance(error, ConfigError):
        return _config_error_line(error)
    if _library(error):
        return _hydra_line(error, argv)
    return None


# -- running a command line -----------------------------------------------------------------------------------------


def write_traceback(error: BaseException, argv: Sequence[str] = ()) -> Optional[str]:
    """Write the traceback into a new file under ``tempfile.gettempdir()``; its path, None when it cannot be written."""
    try:
        handle, path = tempfile.mkstemp(prefix=f"{INTERNAL_LOG_PREFIX}{os.getpid()}-", suffix=".log")
        with os.fdopen(handle, "w", encoding="utf-8", errors="replace") as out:
            out.write(f"argv: {list(argv)!r}\n")
            out.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    except OSError:
        return None
    return path


def internal_error_line(error: BaseException, path: Optional[str]) -> str:
    where = f"the traceback is in {path}" if path else "the traceback could not be written; it follows"
    return (f"launcher: internal error (a bug, not your input): {type(error).__name__}: {show(_first_line(error))}; "
            f"{where}; please report it")


def run_cli(main_fn: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None, *,
            stderr: Optional[IO[str]] = None) -> int:
    """Run ``main_fn(argv)`` (default ``sys.argv[1:]``) and turn what it raises into the exit status and one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    err = stderr or sys.stderr
    try:
        code = main_fn(args)
        return EXIT_OK if code is None else int(code)
    except SystemExit as exit_:  # argparse's --help, or a plain sys.exit(...)
        if isinstance(exit_.code, str):
            print(PREFIX + clean(exit_.code), file=err)
            return EXIT_USER
        return EXIT_OK if exit_.code is None else int(exit_.code)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # piped into head: the reader left, nothing is wrong
        _silence_stdout()
        return EXIT_OK
    except Exception as error:  # noqa: BLE001 - THE place where every error becomes one line
        line = describe(error, args)
        if line is not None:
            print(line, file=err)
            details = getattr(error, "details", "")
            if details:
                print(clean(details, keep_newlines=True), file=err)
            return EXIT_USER
        path = write_traceback(error, args)
        print(internal_error_line(error, path), file=err)
        if path is None:
            traceback.print_exception(type(error), error, error.__traceback__, file=err)
        return EXIT_INTERNAL


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
