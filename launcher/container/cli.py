"""``python -m launcher.container build|check``: the command line of the build (login node) and the check (image)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from launcher.container.build import BuildError, build_cli
from launcher.container.check import check_installed

USAGE = """usage: python -m launcher.container build +cluster=NAME [key=value ...] [output=PATH] [--build-arg NAME=VALUE ...] [--run [--here]]
       python -m launcher.container check [--extra train]"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher.container build",
                                     description="Print (or --run) the image build command of +cluster=NAME.")
    parser.add_argument("overrides", nargs="*", help="+cluster=NAME, config overrides key=value, output=PATH")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a recipe argument: BASE_IMAGE (LUMI), NGC_TAG (Leonardo)")
    parser.add_argument("--run", action="store_true", help="run the build instead of printing it")
    parser.add_argument("--here", action="store_true",
                        help="with --run: build outside a Slurm job where the machine says not to")
    return parser


def _check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher.container check",
                                     description="Inside an image: installed versions satisfy pyproject.toml.")
    parser.add_argument("--extra", default="train", help="optional-dependency group to check besides the base")
    return parser


def _build(argv: Sequence[str]) -> int:
    """The build command; a request that cannot work, or a config that does not compose, is one line and exit 2."""
    args = _build_parser().parse_intermixed_args(argv)
    try:
        return build_cli(args.overrides, build_args=args.build_arg, run=args.run, here=args.here)
    except BuildError as err:
        print(f"launcher: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra/OmegaConf composition errors: one line, no traceback
        from launcher.errors import ConfigError

        known = isinstance(err, ConfigError) or type(err).__module__.split(".")[0] in ("hydra", "omegaconf")
        if not known:
            raise
        print(f"launcher: {err}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch ``build`` or ``check``; print the usage (exit 2, or 0 for ``-h``) for anything else."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "check"):
        asked = argv[:1] in (["-h"], ["--help"])
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if argv[0] == "check":
        return check_installed(_check_parser().parse_args(argv[1:]).extra)
    return _build(argv[1:])
