"""``python -m launcher.train RUN_DIR``: one training process (torchrun starts N of them; see launcher.train.main)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m launcher.train RUN_DIR   (RUN_DIR holds the resolved config.yaml)", file=sys.stderr)
        return 2
    from launcher.train.main import run

    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
