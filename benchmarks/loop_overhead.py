"""Loop overhead: tokens/s of our entrypoint against hand-written loops and Hugging Face Trainer.

Same model (a Llama built from a config, seeded), same tokenized data and batches (packed rows: no attention mask),
same optimizer (torch AdamW), schedule, clipping, DDP settings and DeepSpeed config, 2 processes on this machine. Six
variants, interleaved in every repetition:

    ours-ddp       python -m torch.distributed.run ... -m launcher.train RUN_DIR   (strategy=ddp)
    hand-ddp       a minimal DDP loop: collate, forward, backward, clip, step (no logging, no checkpoints)
    ours-zero2     our entrypoint with strategy=zero2
    hand-zero2     a minimal loop on the DeepSpeed engine with our generated DeepSpeed config
    trainer-zero2  transformers.Trainer with the same DeepSpeed config (deepspeed=<dict>)
    ours-ddp-nowatch  ours-ddp with train.hang_timeout_s=0 train.straggler_every=0 (what the watchdog and the
                   straggler gather cost: target ours-ddp >= 0.99x of it)

Throughput is measured on the steady state, in windows of --log-every steps after the first --warmup-window steps:
tokens = steps x micro x accum x world x seq_len per window, divided by the window's wall time. Ours reads its windows
from metrics.jsonl (its log windows, which exclude the final checkpoint and export); the baselines take a timestamp
after a barrier at the same steps. A run's value is the median of its windows (robust to a burst of load from other
processes on a shared machine), the reported value the median over --reps repetitions.

    python benchmarks/loop_overhead.py                 # about 3 minutes on a 2-core CPU
    python benchmarks/loop_overhead.py --reps 5 --steps 60 --hidden 256

Targets: ours >= 0.98x the hand-written loop on the same framework, >= 1.0x Trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ours-ddp", "hand-ddp", "ours-zero2", "hand-zero2", "trainer-zero2", "ours-ddp-nowatch")
# ours-ddp-nowatch: ours-ddp without the hang watchdog and the straggler gather (docs/hangs.md), for their cost.
VARIANT_OVERRIDES = {"ours-ddp-nowatch": ["train.hang_timeout_s=0", "train.straggler_every=0"]}


# ----------------------------------------------------------------------------------------------------- parent


def bench_overrides(args: argparse.Namespace, work: Path, strategy: str, tokenizer_dir: Path) -> List[str]:
    return [
        "model=tiny", f"model.hidden_size={args.hidden}", f"model.intermediate_size={args.hidden * 11 // 4}",
        f"model.num_layers={args.layers}", f"model.num_heads={args.hidden // 32}",
        f"model.num_kv_heads={args.hidden // 32}", f"model.tokenizer={tokenizer_dir}",
        "data=corpus", f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum=1", f"train.max_steps={args.steps}", f"train.warmup_steps={args.warmup}",
        "train.eval_every=0", f"train.save_every={args.steps}", f"train.log_every={args.log_every}",
        f"strategy={strategy}", f"output_dir={work}",
    ]


def write_run(work: Path, name: str, overrides: List[str]) -> Path:
    from omegaconf import OmegaConf

    from launcher.config import compose

    cfg = compose([*overrides, f"run_name={name}"])
    run_dir = work / name
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return run_dir


def prepare_tokenizer(work: Path) -> Path:
    """One tokenizer for every variant, so every variant reads the same tokenized cache."""
    from launcher.config import compose
    from launcher.train.data_formats import iter_texts
    from launcher.train.tokenizer import save_atomically, train_bpe_tokenizer

    cfg = compose(["model=tiny", "data=corpus"])
    tokenizer = train_bpe_tokenizer(iter_texts(cfg.data.path, cfg.data.format), cfg.model.vocab_size)
    save_atomically(tokenizer, work / "tokenizer")
    return work / "tokenizer"


def launch(variant: str, run_dir: Path, env: Dict[str, str]) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if variant.startswith("ours"):
        command = [*torchrun, "-m", "launcher.train", str(run_dir)]
    else:
        command = [*torchrun, str(Path(__file__).resolve()), "--worker", variant, "--run-dir", str(run_dir)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def window_throughputs(variant: str, run_dir: Path, warmup: int) -> List[float]:
    if not variant.startswith("ours"):
        return json.loads((run_dir / "bench.json").read_text())["windows_tokens_per_s"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows, previous_step = [], 0
    for record in (r for r in lines if "tokens_per_s" in r):
        if previous_step >= warmup:
            windows.append(record["tokens_per_s"])
        previous_step = record["step"]
    return windows


def main(args: argparse.Namespace) -> None:
    work = Path(args.out or tempfile.mkdtemp(prefix="loop-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    tokenizer_dir = prepare_tokenizer(work)
    results: Dict[str, List[float]] = {v: [] for v in args.variants}
    start = time.perf_counter()
    for rep in range(args.reps):
        for variant in args.variants:
            strategy = variant.split("-")[1]
            overrides = [*bench_overrides(args, work, strategy, tokenizer_dir), *VARIANT_OVERRIDES.get(variant, [])]
            run_dir = write_run(work, f"{variant}-{rep}", overrides)
            launch(variant, run_dir, env)
            windows = window_throughputs(variant, run_dir, args.warmup_window)
            results[variant].append(statistics.median(windows))
            print(f"rep {rep} {variant:14s} {results[variant][-1]:9.0f} tokens/s  (windows: "
                  f"{', '.join(f'{w:.0f}' for w in windows)})", flush=True)
    medians = {v: statistics.median(r) for v, r in results.items()}
    print(f"\nmedians over {args.reps} repetitions ({time.perf_counter() - start:.0f}s; model hidden {args.hidden}, "
          f"{args.layers} layers, seq_len {args.seq_len}, micro batch {args.micro_batch}, 2 ranks):")
    for variant, value in medians.items():
        print(f"  {variant:14s} {value:9.0f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in results[variant])})")
    ratios = {}
    pairs = (("ours-ddp", "hand-ddp"), ("ours-zero2", "hand-zero2"), ("ours-zero2", "trainer-zero2"),
             ("ours-ddp", "ours-ddp-nowatch"))
    for ours, other in pairs:
        if ours in medians and other in medians:
            ratios[f"{ours} / {other}"] = medians[ours] / medians[other]
    for name, ratio in ratios.items():
        target = 1.0 if "trainer" in name else 0.99 if "nowatch" in name else 0.98
        print(f"  {name:26s} {ratio:.3f}x  (target >= {target}x: {'ok' if ratio >= target else 'BELOW'})")
    (work / "loop_overhead.json").write_text(json.dumps({"runs": results, "medians": medians, "ratios": ratios},
                                                       indent=1))
    print(f"results: {work / 'loop_overhead.json'}")


# ----------------------------------------------------------------------------------------------------- workers


class _Setup:
    """What every baseline shares with our entrypoint: config, model, data split, optimizer, schedule."""

    def __init__(self, run_dir: Path) -> None:
        import torch
        import torch.distributed as dist
        from omegaconf import OmegaConf

        from launcher.train.data import cache_root_for, prepare_datasets
        from launcher.train.modeling import build_model, hf_config
        from launcher.train.tokenizer import load_or_build_tokenizer

        self.cfg = OmegaConf.load(run_dir / "config.yaml")
        self.run_dir = run_dir
        dist.init_process_group("gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        plain = OmegaConf.to_container(self.cfg, resolve=True)
        tokenizer = load_or_build_tokenizer(plain["model"], lambda: [], run_dir / "tokenizer", is_main=self.rank == 0,
                                            barrier=dist.barrier)
        self.config = hf_config(plain["model"], tokenizer)
        self.model = build_model(plain["model"], config=self.config, seed=int(self.cfg.train.seed))
        data = plain["data"]
        cache_root = cache_root_for(data, plain["output_dir"])
        self.split = prepare_datasets(data, tokenizer, int(self.cfg.train.seq_len), cache_root,
                                      seed=int(self.cfg.train.seed), is_main=self.rank == 0, barrier=dist.barrier).train
        self.micro = int(self.cfg.train.micro_batch_size)
        self.steps = int(self.cfg.train.max_steps)
        self.tokens_per_step = self.micro * int(self.cfg.train.grad_accum) * self.world * int(self.cfg.train.seq_len)
        torch.manual_seed(int(self.cfg.train.seed) + self.rank)

    def batch(self, step: int) -> Dict[str, Any]:
        n = len(self.split)
        start = (step * self.world + self.rank) * self.micro
        return self.split.collate([(start + j) % n for j in range(self.micro)], skip_full_mask=True)

    def optimizer_and_scheduler(self, model: Any) -> Any:
        from launcher.train.strategies.base import build_optimizer_and_scheduler

        return build_optimizer_and_scheduler(model, self.cfg.train)

    def mark(self, step: int, warmup: int, every: int, marks: List[float]) -> None:
        """A timestamp after a barrier at the end of steps warmup, warmup + every, ... (1-based step numbers)."""
        import torch.distributed as dist

        if step >= warmup and (step - warmup) % every == 0:
            dist.barrier()
            marks.append(time.perf_counter())

    def report(self, marks: List[float], every: int) -> None:
        import torch.distributed as dist

        if self.rank == 0:
            windows = [self.tokens_per_step * every / (b - a) for a, b in zip(marks, marks[1:])]
            (self.run_dir / "bench.json").write_text(json.dumps({"windows_tokens_per_s": windows}))
        dist.barrier()
        # The measurement is on disk. Interpreter teardown of a Trainer/DeepSpeed process on gloo once aborted here
        # (SIGABRT after the results were written): skip it, it is not part of any baseline's throughput.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def worker_hand_ddp(run_dir: Path, warmup: int, every: int) -> None:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from launcher.train.strategies.ddp import NO_FORWARD_BUFFER_SYNC

    s = _Setup(run_dir)
    model = DistributedDataParallel(s.model, gradient_as_bucket_view=True, **NO_FORWARD_BUFFER_SYNC)  # ours' settings
    optimizer, scheduler = s.optimizer_and_scheduler(model)
    clip = float(s.cfg.train.grad_clip)
    marks: List[float] = []
    for step in range(s.steps):
        loss = model(**s.batch(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        s.mark(step + 1, warmup, every, marks)
    s.report(marks, every)


def worker_hand_zero2(run_dir: Path, warmup: int, every: int) -> None:
    import deepspeed

    from launcher.train.strategies.deepspeed import deepspeed_config

    s = _Setup(run_dir)
    optimizer, scheduler = s.optimizer_and_scheduler(s.model)
    ds_config = deepspeed_config(s.cfg.strategy, s.cfg.train, world_size=s.world, precision="fp32",
                                 device_type="cpu", hidden_size=s.config.hidden_size)  # the buckets ours gets
    engine, _, _, _ = deepspeed.initialize(model=s.model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    marks: List[float] = []
    for step in range(s.steps):
        loss = engine(**s.batch(step)).loss
        engine.backward(loss)
        engine.step()
        s.mark(step + 1, warmup, every, marks)
    s.report(marks, every)


def worker_trainer_zero2(run_dir: Path, warmup: int, every: int) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from launcher.train.strategies.deepspeed import deepspeed_config

    s = _Setup(run_dir)
    optimizer, scheduler = s.optimizer_and_scheduler(s.model)
    ds_config = deepspeed_config(s.cfg.strategy, s.cfg.train, world_size=s.world, precision="fp32",
                                 device_type="cpu", hidden_size=s.config.hidden_size)  # the buckets ours gets
    split = s.split

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(split)

        def __getitem__(self, index: int) -> Dict[str, Any]:
            return split[index]

    marks: List[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            s.mark(state.global_step, warmup, every, marks)

    args = TrainingArguments(
        output_dir=str(run_dir / "trainer"), per_device_train_batch_size=s.micro,
        gradient_accumulation_steps=int(s.cfg.train.grad_accum), max_steps=s.steps,
        logging_steps=int(s.cfg.train.log_every), save_strategy="no", report_to=[], deepspeed=ds_config,
        use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, learning_rate=float(s.cfg.train.lr),
        max_grad_norm=float(s.cfg.train.grad_clip), seed=int(s.cfg.train.seed), disable_tqdm=True,
    )
    trainer = Trainer(model=s.model, args=args, train_dataset=Rows(), optimizers=(optimizer, scheduler),
                      callbacks=[Clock()])
    trainer.train()
    s.report(marks, every)


WORKERS = {"hand-ddp": worker_hand_ddp, "hand-zero2": worker_hand_zero2, "trainer-zero2": worker_trainer_zero2}


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-window", type=int, default=10, help="steps excluded from the measurement")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="learning-rate warmup steps")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", help="work directory (default: a new temporary directory)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    ns = parse(sys.argv[1:])
    if ns.worker:
        WORKERS[ns.worker](Path(ns.run_dir), ns.warmup_window, ns.log_every)
    else:
        main(ns)
