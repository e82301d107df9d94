"""Reading the definition files of containers/ (header, sections, ``%arguments`` defaults, ``%post`` pins)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

# A pinned requirement line of %post: ``name==version``.
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*$")


@dataclass(frozen=True)
class Recipe:
    """A definition file: header keys (lower case) and section bodies (``post``, ``environment``, ...)."""

    header: Dict[str, str]
    sections: Dict[str, str]
    text: str

    @property
    def arguments(self) -> Dict[str, str]:
        """The ``%arguments`` defaults."""
        out = {}
        for line in self.sections.get("arguments", "").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip()
        return out

    @property
    def pins(self) -> Dict[str, str]:
        """``name==version`` lines of ``%post`` (the requirements file it writes), names normalised."""
        pins = {}
        for line in self.sections.get("post", "").splitlines():
            match = _PIN.match(line)
            if match:
                pins[normalize(match.group(1))] = match.group(2)
        return pins


def normalize(name: str) -> str:
    """PEP 503 name: ``Hydra_Core`` and ``hydra-core`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_recipe(path: Path) -> Recipe:
    """Parse a definition file: ``Key: value`` lines before the first ``%section``, then each section's body."""
    text = Path(path).read_text()
    header: Dict[str, str] = {}
    sections: Dict[str, str] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("%"):
            current = words[0][1:].lower()
            sections.setdefault(current, "")
            continue
        if current is None:
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and ":" in stripped:
                key, value = stripped.split(":", 1)
                header[key.strip().lower()] = value.split("#")[0].strip()
        else:
            sections[current] += line + "\n"
    return Recipe(header=header, sections=sections, text=text)
