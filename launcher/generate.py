"""``python -m launcher.generate RUN_DIR --prompt TEXT``: try a finished run's model (docs/inference.md).

Causal LM runs print a completion per prompt (a chat-trained run's prompt goes through its chat template), and
classification runs the label and its probability. Every result is appended to ``<run_dir>/generations.jsonl``
(``rundir.GENERATIONS_FILE``) as a JSON object with the prompt. A LoRA run loads the merged model when
``export/merged`` exists, else the base model plus the adapter (``--model`` chooses). Sampling options keep the names
of transformers' ``generate``. The arguments, the prompts and the run directory are checked before torch is
imported: a bad one is one line, exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from launcher.cli_errors import ArgumentParser, run_cli
from launcher.errors import UserError
from launcher.rundir import GENERATIONS_FILE


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m launcher.generate",
                            description="Generate from (or classify with) a finished run's export.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="<output_dir>/<run_name> of a finished run")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", metavar="FILE", help='prompts, one per line, or JSON Lines with "prompt"')
    parser.add_argument("--max-new-tokens", type=int, default=64, dest="max_new_tokens")
    parser.add_argument("--do-sample", action="store_true", dest="do_sample", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float, dest="top_p")
    parser.add_argument("--top-k", type=int, dest="top_k")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for sampling")
    parser.add_argument("--model", default="auto", choices=("auto", "adapter", "merged"),
                        help="LoRA runs: the merged model if it exists (auto), or base + adapter")
    parser.add_argument("--output", metavar="FILE",
                        help=f"JSON Lines to append to (default RUN_DIR/{GENERATIONS_FILE})")
    parser.add_argument("--submit", action="store_true",
                        help="run as a one-GPU job on the run's cluster (its smallest shareable partition)")
    return parser


def read_prompts(path: str) -> List[str]:
    """Prompts from a file: JSON Lines records with a "prompt" (or "text") string, else one prompt per line."""
    file = Path(path).expanduser()
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError("--prompts", path, f"cannot read it ({error})", "a UTF-8 text or JSON Lines file") from None
    if not lines:
        raise UserError("--prompts", path, "no prompts in it", "one prompt per line, or JSON Lines with \"prompt\"")
    if not lines[0].lstrip().startswith("{"):
        return lines
    prompts = []
    for lineno, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError("--prompts", f"{path}:{lineno}", "malformed JSON", "one JSON object per line") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError("--prompts", f"{path}:{lineno}", 'no "prompt" string', 'records like {"prompt": "..."}')
        prompts.append(text)
    return prompts


def sampling_options(args: Any) -> Dict[str, Any]:
    """transformers ``generate`` keyword arguments, each range checked."""
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens", args.max_new_tokens, "must be at least 1")
    options: Dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    checks = (("temperature", "--temperature", lambda v: v > 0, "a number > 0"),
              ("top_p", "--top-p", lambda v: 0 < v <= 1, "a number in (0, 1]"),
              ("top_k", "--top-k", lambda v: v >= 0, "an integer >= 0"))
    for name, flag, ok, allowed in checks:
        value = getattr(args, name)
        if value is None:
            continue
        if not ok(value):
            raise UserError(flag, value, "out of range", allowed)
        if not args.do_sample:
            raise UserError(flag, value, "only used when sampling", "add --do-sample")
        options[name] = value
    return options


def _main(argv: List[str]) -> int:
    from launcher.train.exported import find_export

    args = _parser().parse_args(argv)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise UserError("--prompt", None, "no prompt given", "--prompt TEXT (repeatable) or --prompts FILE")
    options = sampling_options(args)
    export = find_export(args.run_dir)
    export.weights(args.model)  # an absent merged model is a user error, before torch loads
    output = Path(args.output).expanduser().absolute() if args.output else export.run_dir / GENERATIONS_FILE
    if args.submit:
        return _submit(export, _job_argv(export, prompts, options, args, output), output)
    records = _run(export, prompts, options, args)
    with output.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"launcher: {len(records)} result(s) appended to {output}")
    return 0


def _run(export: Any, prompts: List[str], options: Dict[str, Any], args: Any) -> List[Dict[str, Any]]:
    import torch

    from launcher.train import inference

    torch.manual_seed(args.seed)
    loaded = inference.load(export, args.model)
    if export.task == "classification":
        results = inference.classify(loaded, prompts, max_length=export.config.train.seq_len)
        records = [{"prompt": p, **r, "weights": loaded.weights} for p, r in zip(prompts, results)]
        for record in records:
            print(f"{record['label']}\t{record['score']:.4f}\t{record['prompt']}")
        return records
    completions = inference.generate(export, loaded, prompts, options)
    records = [{"prompt": p, "completion": c, "weights": loaded.weights, "options": options}
               for p, c in zip(prompts, completions)]
    for record in records:
        print(f"### {record['prompt']}\n{record['completion']}\n")
    return records


def _job_argv(export: Any, prompts: List[str], options: Dict[str, Any], args: Any, output: Path) -> List[str]:
    """This command line for the job: absolute paths (the job may start elsewhere), the prompts inline."""
    argv = [str(export.run_dir), "--max-new-tokens", str(options["max_new_tokens"]), "--seed", str(args.seed),
            "--model", args.model, "--output", str(output)]
    argv += [f"--prompt={prompt}" for prompt in prompts]  # one word each: a prompt may start with "-"
    if options["do_sample"]:
        argv.append("--do-sample")
    for name in ("temperature", "top_p", "top_k"):
        if name in options:
            argv += [f"--{name.replace('_', '-')}", str(options[name])]
    return argv


def _submit(export: Any, argv: List[str], output: Path) -> int:
    """--submit: the same command as a one-device job on the cluster the run trained on (login-light)."""
    cfg = export.config
    if cfg.cluster is None:
        raise UserError("--submit", None, f"{export.run_dir} trained without a cluster (no cluster in its config)",
                        "leave --submit out to generate on this machine")
    from launcher.generate import slurm_task as task  # by its module's name: under -m this module is __main__
    from launcher.plan.job import make_plan
    from launcher.rundir import EVAL_SLURM_DIR
    from launcher.slurm.submit import submit_tool

    plan = make_plan(cfg)
    job = submit_tool(cfg, plan, task, argv, name="generate")
    print(f"launcher: submitted generation job {job.job_id}: results will be appended to {output} "
          f"(Slurm log in {plan.run_dir / EVAL_SLURM_DIR})")
    return 0


def slurm_task(argv: List[str]) -> int:
    """The --submit job's task (pickled by submitit): the command line; a failure fails the job."""
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"python -m launcher.generate exited {code}; see the log above")
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
