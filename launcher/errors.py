"""The error users see before anything is submitted."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot run: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str, hint: str = "") -> None:
        self.field, self.value, self.allowed = field, value, allowed
        message = f"{field}={value!r} is not allowed: {allowed}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
