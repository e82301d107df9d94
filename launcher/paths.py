"""Where the project's data files live, installed (wheel) or from a source checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    # A wheel carries the top-level folders inside the package as _<name>; a checkout has them beside it.
    installed = PACKAGE_DIR / f"_{name}"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _data_dir("conf")
TEMPLATES_DIR = _data_dir("slurm_templates")
CONTAINERS_DIR = _data_dir("containers")
EXAMPLES_DIR = PACKAGE_DIR / "examples"


def example_file(name: str) -> str:
    """Absolute path of a bundled example dataset (used by the ``${examples:...}`` resolver)."""
    path = EXAMPLES_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in EXAMPLES_DIR.iterdir())
        raise ValueError(f"no bundled example named {name!r}; available: {available}")
    return str(path)
