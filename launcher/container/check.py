"""Inside the image: the installed packages against pyproject.toml's ranges (``python -m launcher.container check``,
run by the recipes' %test). Stdlib only at import."""

from __future__ import annotations

import re
from typing import Any, Callable, List, Optional

from launcher.paths import PACKAGE_DIR


def project_requirements(extra: Optional[str] = "train") -> List[str]:
    """The base dependencies and those of ``extra``: from pyproject.toml in a checkout, else the installed metadata."""
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ImportError:  # Python 3.10: tomli, which pyproject.toml does not declare either
            import tomli as tomllib  # type: ignore[no-redef]
        project = tomllib.loads(pyproject.read_text())["project"]
        return list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get(extra, []))
    from importlib.metadata import requires

    out = []
    for line in requires("eurohpc-launcher") or []:
        spec, _, marker = line.partition(";")
        if not marker.strip() or (extra and re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", marker)):
            out.append(spec.strip())
    return out


def _requirement_class() -> Any:
    """``packaging``'s ``Requirement``. ``packaging`` is not a declared dependency of the project: it is used where
    installed (the images have it), else the copy vendored in pip."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    return Requirement


def check_installed(extra: Optional[str] = "train", *, version: Optional[Callable[[str], str]] = None) -> int:
    """Print each requirement with its installed version; 1 when one is missing or out of range.

    Pre-releases count as matching (NGC images ship torch ``2.7.0a0+...``): ``>=2.6`` accepts 2.7.0a0 but not 2.6.0a0.
    ``version`` looks up an installed version (default: ``launcher.versions.package_version``).
    """
    from importlib.metadata import PackageNotFoundError

    from launcher.versions import package_version

    requirement = _requirement_class()
    lookup = version or package_version
    bad = 0
    for line in project_requirements(extra):
        req = requirement(line)
        try:
            found = lookup(req.name)
        except PackageNotFoundError:
            found = None
        ok = found is not None and req.specifier.contains(found, prereleases=True)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'}  {req.name:<14} {found or 'missing':<28} wants {req.specifier or 'any'}")
    print("launcher: installed packages satisfy pyproject.toml" if not bad else
          f"launcher: {bad} package(s) missing or out of range")
    return 1 if bad else 0
