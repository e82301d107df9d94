"""What counts as a secret, by variable name and by value: one definition for validation (refuse), the preflight
and the environment fingerprint (never record). Stdlib only."""

from __future__ import annotations

import re

# Upper-cased substrings of variable names that hold credentials.
SECRET_NAME_MARKERS = ("TOKEN", "SECRET", "KEY", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
# Known token shapes (Hugging Face, GitHub, OpenAI-style) anywhere in a value.
TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,})\b")
# A bare 40-hex value (classic GitHub / many API tokens); a Hugging Face snapshot directory name looks the same,
# so callers check path components separately.
HEX40_VALUE = re.compile(r"^[0-9a-f]{40}$")


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_NAME_MARKERS)


def looks_like_token(value: str) -> bool:
    return bool(TOKEN_VALUE.search(value) or HEX40_VALUE.match(value))
