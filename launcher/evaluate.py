"""``python -m launcher.evaluate RUN_DIR``: score a finished run (docs/inference.md).

    python -m launcher.evaluate RUN_DIR                  the held-out split (data.eval_fraction of the run's data)
    python -m launcher.evaluate RUN_DIR --data FILE      every record of FILE, tokenized as the run's data
    python -m launcher.evaluate RUN_DIR --lm-eval TASKS  lm-evaluation-harness tasks on the export, offline

Causal LM: eval_loss (token-weighted, as the training loop's) and perplexity = exp(eval_loss). Classification:
eval_loss, eval_accuracy and eval_f1 (macro). Each evaluation is written to ``<run_dir>/eval/<name>.json`` and the
table of all of them to ``<run_dir>/eval/README.md``; ``python -m launcher.status`` shows the newest. Arguments and
files are checked before torch is imported. The result helpers at the top are stdlib only (``launcher.status`` reads
them).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from launcher.cli_errors import ArgumentParser, run_cli
from launcher.errors import UserError
from launcher.rundir import EVAL_DIR, EVAL_TABLE, is_regular_file

# Columns of the table (and of status), in this order, when an evaluation has them.
SCORES = ("perplexity", "eval_loss", "eval_accuracy", "eval_f1")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# -- results (stdlib) -----------------------------------------------------------------------------------------------


def read_results(run_dir: Path) -> List[Dict[str, Any]]:
    """Every readable ``eval/*.json`` of a run (with its "name"), oldest first; a bad file is skipped."""
    results = []
    directory = Path(run_dir) / EVAL_DIR
    if not directory.is_dir():
        return results
    for path in sorted(directory.glob("*.json")):
        if not is_regular_file(path):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            results.append({**record, "name": path.stem})
    return sorted(results, key=lambda r: r.get("created_unix") or 0)


def latest_scores(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The newest evaluation of a run, or None."""
    results = read_results(run_dir)
    return results[-1] if results else None


def format_scores(record: Dict[str, Any]) -> str:
    """``ppl 12.3 acc 0.950`` style: the scores an evaluation has."""
    short = {"perplexity": "ppl", "eval_loss": "loss", "eval_accuracy": "acc", "eval_f1": "f1"}
    return " ".join(f"{short[k]} {record[k]:.4g}" for k in SCORES
                    if isinstance(record.get(k), (int, float)) and not (k == "eval_loss" and "perplexity" in record))


def write_result(run_dir: Path, name: str, record: Dict[str, Any]) -> Path:
    """``eval/<name>.json`` (atomically) and the refreshed table ``eval/README.md``."""
    directory = Path(run_dir) / EVAL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    (directory / EVAL_TABLE).write_text(markdown_table(read_results(run_dir)), encoding="utf-8")
    return path


def markdown_table(results: List[Dict[str, Any]]) -> str:
    columns = [k for k in SCORES if any(k in r for r in results)]
    extra = sorted({k for r in results for k in r.get("lm_eval", {})})
    header = ["name", "data", "split", "rows", "weights", *columns, *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.get("name"), r.get("data"), r.get("split"), r.get("rows"), r.get("weights")]
        cells += [r.get(k) for k in columns] + [r.get("lm_eval", {}).get(k) for k in extra]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value).replace("|", "\\|")


# -- the command ---------------------------------------------------------------------------------------------------


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m launcher.evaluate", description="Score a finished run's export.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="<output_dir>/<run_name> of a finished run")
    parser.add_argument("--data", metavar="FILE", help="score every record of FILE instead of the held-out split")
    parser.add_argument("--name", help="the result's name: eval/<name>.json (default: heldout, or FILE's stem)")
    parser.add_argument("--batch-size", type=int, dest="batch_size", help="rows per forward (default: "
                                                                          "train.micro_batch_size)")
    parser.add_argument("--model", default="auto", choices=("auto", "adapter", "merged"),
                        help="LoRA runs: the merged model if it exists (auto), or base + adapter")
    parser.add_argument("--lm-eval", dest="lm_eval", metavar="TASKS",
                        help="comma-separated lm-evaluation-harness tasks (offline; pip install '.[eval]')")
    parser.add_argument("--lm-eval-include", dest="lm_eval_include", metavar="DIR",
                        help="a directory of task YAMLs of your own (lm-eval's --include_path)")
    parser.add_argument("--limit", type=int, help="lm-eval: at most this many examples per task")
    return parser


def _check_args(args: Any) -> str:
    """The result's name, after checking every argument (no torch yet)."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size", args.batch_size, "must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit", args.limit, "must be at least 1")
    if args.data:
        path = Path(args.data).expanduser()
        if not path.exists():
            raise UserError("--data", args.data, "no such file or directory", "a data file like the run's")
    if args.lm_eval_include and not Path(args.lm_eval_include).expanduser().is_dir():
        raise UserError("--lm-eval-include", args.lm_eval_include, "no such directory", "a directory of task YAMLs")
    name = args.name or ("lm-eval" if args.lm_eval else Path(args.data).stem if args.data else "heldout")
    if not _NAME.match(name):
        raise UserError("--name", name, "not a file name", "letters, digits, '_', '.', '-' (at most 100)")
    return name


def _check_data(export: Any, data: str) -> None:
    """The --data file has records of the run's kind (stdlib checks, file:line in the message)."""
    try:
        if export.task == "classification":
            from launcher.train.labelled_data import check_labelled_data

            check_labelled_data(Path(data).expanduser(), export.config.task.text_field,
                                export.config.task.label_field, max_records=200)
        else:
            from launcher.train.data_formats import validate_data_file

            validate_data_file(Path(data).expanduser(), None, max_records=200)
    except (ValueError, OSError) as error:
        raise UserError("--data", data, str(error), "records like the run's training data") from None


def _main(argv: List[str]) -> int:
    from launcher.train.exported import find_export

    args = _parser().parse_args(argv)
    name = _check_args(args)
    export = find_export(args.run_dir)
    export.weights(args.model)
    if args.lm_eval:
        from launcher.train.lm_eval_run import check_lm_eval, run_lm_eval

        tasks = check_lm_eval(args.lm_eval, args.lm_eval_include)
        record = run_lm_eval(export, tasks, include=args.lm_eval_include, limit=args.limit, choice=args.model)
    else:
        if args.data:
            _check_data(export, args.data)
        from launcher.train.evaluate_run import evaluate_export

        record = evaluate_export(export, data_path=args.data, batch_size=args.batch_size, choice=args.model)
    path = write_result(export.run_dir, name, record)
    print(f"launcher: {name}: {format_scores(record) or json.dumps(record.get('lm_eval', {}))} -> {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


def slurm_task(argv: List[str]) -> int:
    """The train.evaluate_after job's task (pickled by submitit): the command line; a failure fails the job."""
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"python -m launcher.evaluate {' '.join(argv)} exited {code}; see the log above")
    return code


if __name__ == "__main__":
    sys.exit(main())
