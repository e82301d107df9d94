"""``python -m launcher.container build|check``: the command line of the build (login node) and the check (image)."""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from launcher.cli_errors import ArgumentParser, run_cli
from launcher.container.build import build_cli
from launcher.container.check import check_installed
from launcher.errors import UserError

USAGE = """usage: python -m launcher.container build +cluster=NAME [key=value ...] [output=PATH] [--build-arg NAME=VALUE ...] [--run [--here]]
       python -m launcher.container check [--extra train]"""


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m launcher.container build",
                            description="Print (or --run) the image build command of +cluster=NAME.")
    parser.add_argument("overrides", nargs="*", help="+cluster=NAME, config overrides key=value, output=PATH")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a recipe argument: BASE_IMAGE (LUMI), NGC_TAG (Leonardo)")
    parser.add_argument("--run", action="store_true", help="run the build instead of printing it")
    parser.add_argument("--here", action="store_true",
                        help="with --run: build outside a Slurm job where the machine says not to")
    return parser


def _check_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m launcher.container check",
                            description="Inside an image: installed versions satisfy pyproject.toml.")
    parser.add_argument("--extra", default="train", help="optional-dependency group to check besides the base")
    return parser


def _main(argv: List[str]) -> int:
    """Dispatch ``build`` or ``check`` (``-h``: the usage). A request that cannot work, or a config that does not
    compose, raises: ``run_cli`` makes it one line and exit 2."""
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in ("build", "check"):
        raise UserError("COMMAND", argv[0] if argv else None, "not a command of python -m launcher.container",
                        "build or check (python -m launcher.container --help)")
    if argv[0] == "check":
        return check_installed(_check_parser().parse_args(argv[1:]).extra)
    args = _build_parser().parse_intermixed_args(argv[1:])
    return build_cli(args.overrides, build_args=args.build_arg, run=args.run, here=args.here)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of python -m launcher.container: 0 done, 2 bad input (one line), 1 a failed check or an internal
    error (its traceback in a file)."""
    return run_cli(_main, argv)
