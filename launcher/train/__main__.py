"""``python -m launcher.train RUN_DIR``: one training process (torchrun starts N of them; see launcher.train.main)."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m launcher.train RUN_DIR   (RUN_DIR holds the resolved config.yaml)", file=sys.stderr)
        return 2
    from launcher.train.main import run

    return run(args[0])


def exit_now(code: int) -> None:
    """Exit without the interpreter's and C++'s static teardown. A native thread a library leaves joinable (seen once
    in ~10 ZeRO-3 runs on CPU: "terminate called without an active exception") would otherwise turn a finished,
    exported run into SIGABRT. Everything that matters is already written and flushed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
