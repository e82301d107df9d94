"""``python -m launcher.export RUN_DIR --merge``: fold a finished LoRA run's adapter into a standalone model.

The merged model (with the tokenizer) goes to ``<run_dir>/export/merged`` (``rundir.MERGED_DIR``), where
``peft.merge_on_export=true`` puts it during training: ``launcher.generate`` and ``AutoModelFor*.from_pretrained``
load it without peft. Nothing is retrained and nothing is downloaded. The argument handling is login-light: torch is
imported only once the arguments and the run directory are known to be good.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from launcher.cli_errors import ArgumentParser, run_cli
from launcher.errors import UserError


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m launcher.export",
                            description="Merge a LoRA run's adapter into a standalone model (docs/inference.md).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="<output_dir>/<run_name> of a finished run")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into <RUN_DIR>/export/merged")
    return parser


def _main(argv: List[str]) -> int:
    from launcher.train.exported import find_export

    args = _parser().parse_args(argv)
    if not args.merge:
        raise UserError("--merge", None, "nothing to do", "pass --merge to merge the adapter into export/merged")
    export = find_export(args.run_dir)
    if not export.is_adapter:
        raise UserError("RUN_DIR", str(export.run_dir), "the export is a full model, not a LoRA adapter",
                        "--merge is for peft=lora runs; their export is already standalone")
    from launcher.train.inference import merge

    print(f"launcher: merged the adapter into {merge(export)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
