"""Host memory of every rank while the model loads and during the first steps: ddp, fsdp and zero3, full and LoRA.

A Llama of about 250M parameters (hidden 1024, 12 layers, intermediate 3584, vocabulary 32000, untied) is saved with
``save_pretrained`` in fp32 (the CPU path's training precision) beside a byte-level BPE, then trained for
--steps steps on 2 CPU ranks through the real local path:

    python -m launcher nproc_per_node=2 model.pretrained=DIR strategy=S peft=P train.max_steps=3 ...

While a run goes, this script reads ``VmHWM`` (the peak resident set) of both rank processes from
``/proc/<pid>/status`` every 20 ms and keeps it at three moments: "built" (the model log line: built, with its
adapters, not yet wrapped), "ready" (wrapped by the strategy, optimizer and data ready) and "steps" (rank 0 logged step
--steps; the run goes on for one more step, so the final checkpoint's write is never in the numbers). An empty rank's
baseline (a process that imports torch, transformers and the job's own modules and initializes the gloo process
group, but builds no model) is measured the same way and subtracted per rank. Acceptance (issue 15): for each
sharded strategy, the summed peak over the ranks minus the baselines is at most 0.8x ddp's, full and LoRA.

    python benchmarks/host_memory.py                       # 6 runs of 1-4 min on 2 busy cores, ~10 GB RAM
    python benchmarks/host_memory.py --strategies ddp fsdp --peft none --out /tmp/hm

Writes <out>/host_memory.txt (the table) and <out>/host_memory.json; with --out the work directory (the checkpoint,
the runs: several GB) is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "launcher" / "examples" / "corpus.txt"
KIB = 1024
LIMIT = 0.8

_BASELINE = """
import json, os, sys
import torch, transformers, torch.distributed as dist
from transformers import AutoModelForCausalLM  # noqa: F401 - the lazy modeling imports a rank makes
# What every rank of the job imports whatever its strategy (deepspeed, which only zero* import, stays zero3's cost).
import accelerate, datasets, peft  # noqa: F401, E401
import launcher.train.main, launcher.train.data, launcher.train.loop, launcher.train.strategies.fsdp  # noqa
dist.init_process_group("gloo")
dist.barrier()
status = open("/proc/self/status").read()
hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:"))
with open(os.path.join(sys.argv[1], f"baseline{dist.get_rank()}.json"), "w") as f:
    json.dump({"rank": dist.get_rank(), "hwm_kib": hwm}, f)
dist.barrier()
dist.destroy_process_group()
"""


def save_checkpoint(directory: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """A seeded Llama (fp32) and a 1024-token BPE saved with ``save_pretrained``; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from launcher.train.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer = train_bpe_tokenizer(CORPUS.read_text().splitlines(), 1024, max_length=512)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def _status_kib(pid: int, field: str) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _rank_of(pid: int) -> Optional[int]:
    """The RANK of a training process (its environment names it), or None for any other process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"launcher.train" not in cmdline:
            return None
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"RANK="):
                return int(item[5:])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return None
    return None


def _descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class Sampler(threading.Thread):
    """Polls the ranks' VmHWM; ``mark(name)`` keeps the current peaks under ``name``; "steps" when rank 0 has logged
    step ``steps`` in ``metrics``."""

    def __init__(self, root: int, metrics: Path, steps: int) -> None:
        super().__init__(daemon=True)
        self.root, self.metrics, self.steps = root, metrics, steps
        self.peaks: Dict[int, int] = {}
        self.marks: Dict[str, Dict[int, int]] = {}
        self.ranks: Dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        scans = 0
        while not self.done.is_set():
            if scans % 25 == 0 or len(self.ranks) < 2:  # new processes: rescan the tree now and then
                for pid in _descendants(self.root):
                    rank = _rank_of(pid)
                    if rank is not None:
                        self.ranks[pid] = rank
            scans += 1
            for pid, rank in list(self.ranks.items()):
                hwm = _status_kib(pid, "VmHWM")
                if hwm is not None:
                    self.peaks[rank] = max(self.peaks.get(rank, 0), hwm)
            if "steps" not in self.marks and scans % 5 == 0 and _logged(self.metrics, self.steps):
                self.mark("steps")
            time.sleep(0.02)

    def mark(self, name: str) -> None:
        self.marks[name] = dict(self.peaks)


def baseline(work: Path, env: Dict[str, str]) -> Dict[int, int]:
    script = work / "baseline.py"
    script.write_text(_BASELINE)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    str(work)], env=env, check=True, capture_output=True)
    return {r: json.loads((work / f"baseline{r}.json").read_text())["hwm_kib"] for r in (0, 1)}


def run_one(strategy: str, peft: str, checkpoint: Path, work: Path, env: Dict[str, str], steps: int,
            seq_len: int) -> Dict[str, Any]:
    """One training run; the ranks' peaks (KiB) at load and after ``steps`` steps."""
    name = f"{strategy}-{peft}"
    command = [
        sys.executable, "-m", "launcher", "nproc_per_node=2", f"model.pretrained={checkpoint}", f"strategy={strategy}",
        f"peft={peft}", f"train.max_steps={steps + 1}", f"train.seq_len={seq_len}", "train.micro_batch_size=1",
        "train.grad_accum=1", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=1000",
        "train.save_every=1000",
        "train.export=false", "train.preflight=false", f"output_dir={work / 'runs'}", f"run_name={name}",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")
    sampler = Sampler(process.pid, work / "runs" / name / "metrics.jsonl", steps)
    sampler.start()
    tail: List[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if line.startswith("train: model "):
            sampler.mark("built")
        if "train: ready in" in line:
            sampler.mark("load")
    code = process.wait()
    sampler.done.set()
    sampler.join()
    if code != 0 or not {"built", "load", "steps"} <= set(sampler.marks):
        raise RuntimeError(f"{name}: exit {code}, marks {sorted(sampler.marks)}\n{''.join(tail)}")
    return {"strategy": strategy, "peft": peft, "wall_s": round(time.perf_counter() - started, 1),
            "built_kib": sampler.marks["built"], "load_kib": sampler.marks["load"], "steps_kib": sampler.marks["steps"]}


def _logged(metrics: Path, step: int) -> bool:
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or a line being written
        return False
    return any(r.get("step") == step and "loss" in r for r in records)


def summarize(runs: List[Dict[str, Any]], base: Dict[int, int]) -> List[Dict[str, Any]]:
    """Per run: each rank's peak, the sum minus the baselines (GiB), and the ratio to ddp's with the same peft."""
    for run in runs:
        for mark in ("built", "load", "steps"):  # VmHWM only grows: "steps" is the peak of the whole window
            kib = {r: run[f"{mark}_kib"].get(r, 0) for r in (0, 1)}
            run[f"{mark}_gib"] = {r: round(kib[r] / KIB**2, 3) for r in (0, 1)}
            run[f"{mark}_sum_minus_baseline_gib"] = round(sum(kib[r] - base[r] for r in (0, 1)) / KIB**2, 3)
    for run in runs:
        ddp = next((r for r in runs if r["strategy"] == "ddp" and r["peft"] == run["peft"]), None)
        for mark in ("built", "steps"):
            ratio = run[f"{mark}_sum_minus_baseline_gib"] / ddp[f"{mark}_sum_minus_baseline_gib"] if ddp else None
            run[f"{mark}_ratio_to_ddp"] = None if ratio is None else round(ratio, 3)
        run["meets_0.8x"] = None if run["strategy"] == "ddp" or ddp is None else run["steps_ratio_to_ddp"] <= LIMIT
    return runs


def table(runs: List[Dict[str, Any]], base: Dict[int, int], n_params: int) -> str:
    """The "ready" (loaded and wrapped) and "steps" (the whole window's) peaks; "built" stays in the JSON only: the
    replicated strategies' weights are memory-mapped from the checkpoint and become resident only when first read."""
    lines = [f"host memory, 2 CPU ranks, {n_params / 1e6:.1f}M-parameter Llama (fp32); VmHWM in GiB per rank (r0/r1);"
             f" an empty rank's baseline: {base[0] / KIB**2:.2f} / {base[1] / KIB**2:.2f}",
             "strategy | peft | ready r0/r1 | steps r0/r1 | sum - baseline | x ddp | <= 0.8x",
             "---------+------+-------------+-------------+----------------+-------+--------"]
    for run in runs:
        ok = {None: "-", True: "yes", False: "NO"}[run["meets_0.8x"]]
        pair = {m: f"{run[m + '_gib'][0]:5.2f}/{run[m + '_gib'][1]:5.2f}" for m in ("load", "steps")}
        lines.append(f"{run['strategy']:<8} | {run['peft']:<4} | {pair['load']} | {pair['steps']} | "
                     f"{run['steps_sum_minus_baseline_gib']:14.2f} | {run['steps_ratio_to_ddp']:5.2f} | {ok}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "zero3"])
    parser.add_argument("--peft", nargs="+", default=["none", "lora"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=None, help="where the table and JSON go (default: the work dir)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="host_memory_"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}
    n_params = save_checkpoint(work / "checkpoint", args.hidden, args.layers, args.intermediate, args.vocab)
    base = baseline(work, env)
    runs = [run_one(s, p, work / "checkpoint", work, env, args.steps, args.seq_len)
            for p in args.peft for s in args.strategies]
    runs = summarize(runs, base)
    text = table(runs, base, n_params)
    print(text)
    (out / "host_memory.txt").write_text(text + "\n")
    (out / "host_memory.json").write_text(json.dumps({"n_params": n_params, "baseline_kib": base, "runs": runs,
                                                      "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(f"wrote {out / 'host_memory.txt'} and {out / 'host_memory.json'}")
    if args.out is not None:  # the checkpoint and the runs' directories: several GB
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["meets_0.8x"] is not False for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
