"""The error users see before anything is submitted."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot run: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str, hint: str = "", *, details: str = "") -> None:
        # ``details``: lines printed after the one error line (e.g. the memory table of a refused strategy).
        self.field, self.value, self.allowed, self.hint, self.details = field, value, allowed, hint, details
        message = f"{field}={value!r} is not allowed: {allowed}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class UserError(ValueError):
    """A bad argument, file or value given to a tool (``python -m launcher.status``, ``.scaling``, ``.container``):
    what it is, the value, why it cannot be used and what is allowed. ``launcher.cli_errors.run_cli`` prints it as
    one line ``launcher: error: <field>=<value>: <why>; <allowed>`` and exits 2."""

    def __init__(self, field: str, value: object, why: str, allowed: str = "") -> None:
        self.field, self.value, self.why, self.allowed = field, value, why, allowed
        super().__init__(f"{field}={value}: {why}" + (f"; {allowed}" if allowed else ""))
