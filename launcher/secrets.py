"""What counts as a secret, by variable name and by value: one definition for validation (refuse), the preflight
and the environment fingerprint (never record). Stdlib only.

Secrets reach jobs by name only: the user exports them in the submitting shell and sbatch passes the environment on
(the container forwards a fixed list by name, ``launcher.container.exec.FORWARDED_ENV``); no value is ever written
into config.yaml, job.sh or a log.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

# Upper-cased substrings of variable names that hold credentials (*_KEY, *SECRET*, *PASS*, *TOKEN*, ...).
SECRET_NAME_MARKERS = ("TOKEN", "SECRET", "KEY", "PASS", "CREDENTIAL", "AUTH")
# Known token shapes, also glued to other text: Hugging Face, GitHub, OpenAI-style, Slack, AWS access keys.
TOKEN_VALUE = re.compile(
    r"(hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|sk-[A-Za-z0-9_-]{20,}"
    r"|xox[abpr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16})"
)
# A bare 40-hex value (W&B keys, classic tokens); inside a path it is a Hugging Face snapshot or a git commit.
HEX40_VALUE = re.compile(r"^[0-9a-f]{40}$")
# user:password@host in a URL.
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
# NAME=value or NAME: value where NAME looks like a secret's name (DB_PASS=hunter2, api_key: ...).
ASSIGNED_SECRET = re.compile(r"\b\w*(?:PASS|SECRET|TOKEN|_KEY|APIKEY)\w*\s*[=:]\s*\S+", re.IGNORECASE)
# Long random-looking words (base64 or alphanumeric keys such as AWS secret keys): no '-', '_' or '.' inside, which
# names and paths are made of.
_HIGH_ENTROPY_WORD = re.compile(r"[A-Za-z0-9+/=]{32,}")
HIGH_ENTROPY_BITS = 4.5


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_NAME_MARKERS)


def shannon_bits(text: str) -> float:
    """Bits of entropy per character of ``text`` (a 32-character random token: about 5; an English word: about 3)."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _high_entropy(value: str) -> bool:
    if value.startswith(("/", "~", ".")):
        return False  # a path: snapshot and commit directory names are random-looking by design
    for word in _HIGH_ENTROPY_WORD.findall(value):
        mixed = all(len(re.findall(p, word)) >= 3 for p in ("[a-z]", "[A-Z]", "[0-9]"))
        if mixed and shannon_bits(word) >= HIGH_ENTROPY_BITS:
            return True
        # AWS secret access keys: 40 base64 characters with '/' or '+'.
        aws_like = len(word) == 40 and re.search(r"[/+]", word) and re.search(r"[0-9]", word)
        if aws_like and re.search(r"[a-z]", word) and re.search(r"[A-Z]", word) and shannon_bits(word) >= 4.3:
            return True
    return False


def secret_in_value(value: str) -> Optional[str]:
    """Why ``value`` looks like it holds a credential, or None."""
    if TOKEN_VALUE.search(value):
        return "it contains a token"
    if HEX40_VALUE.match(value):
        return "it is a 40-hex key"
    if URL_CREDENTIALS.search(value):
        return "it is a URL with user:password@"
    if ASSIGNED_SECRET.search(value):
        return "it assigns a secret-looking name"
    if _high_entropy(value):
        return "it contains a long random-looking string"
    return None
