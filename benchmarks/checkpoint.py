"""Checkpoint saves: throughput against ``torch.save``, loop blocking sync vs async, LoRA checkpoint size.

One process (a world of one, gloo), a Llama of about 250M parameters built from a config (fp32 on CPU), the ddp
strategy after one optimizer step (so the AdamW moments exist), and the job's own ``CheckpointManager``, so every
number includes what a training save does (RNG file, trainer_state.json, manifest, fsyncs, rename):

    torch.save   torch.save({"model", "optim"}) of the same state dict (``get_state_dict``) into one file, fsynced
    ours-sync    CheckpointManager.save (DCP, one file per rank + .metadata, every file fsynced)
    ours-async   the same with async_save: ``blocked_s`` is the time the loop waits (the copy into host memory),
                 ``save_s`` the whole background write until COMPLETE
    lora         a LoRA run of the same model (r=8 on q,k,v,o): its checkpoint holds adapters only; the size ratio
                 is against ours-sync's full checkpoint

Each variant runs --reps times in turn on the same disk (--dir), the value is the median; between async saves the
benchmark waits for the background write (as training would go on between saves).

    python benchmarks/checkpoint.py --dir /tmp/ckpt-bench --json checkpoint-bench.json   # ~2 min, ~10 GB RAM
    python benchmarks/checkpoint.py --layers 2 --hidden 256 --vocab 4096                # a quick smoke run

Targets: ours-sync >= 0.8x torch.save's GB/s; ours-async blocked_s <= 0.3x ours-sync's; lora < 5% of the full size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_strategy(args: argparse.Namespace, *, lora: bool) -> Any:
    """The ddp strategy around a seeded Llama of the requested shape, after one optimizer step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.config.schema import PeftConfig, StrategyConfig, TrainConfig
    from launcher.train.distributed import DistEnv
    from launcher.train.modeling import apply_peft
    from launcher.train.strategies.ddp import DDPStrategy

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if lora:
        model = apply_peft(model, PeftConfig(name="lora"), seed=0)
    env = DistEnv(rank=0, local_rank=0, world_size=1, backend="gloo", device=torch.device("cpu"), source="single")
    strategy = DDPStrategy(StrategyConfig(name="ddp"), TrainConfig(), env)
    strategy.wrap(model)
    ids = torch.randint(0, args.vocab, (1, 16))
    strategy.forward_backward({"input_ids": ids, "labels": ids}, last=True)
    strategy.step()
    return strategy


def bench_torch_save(strategy: Any, directory: Path) -> Dict[str, float]:
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "state.pt"
    start = time.perf_counter()
    model_sd, optim_sd = get_state_dict(strategy.model, strategy.optimizer)
    with open(path, "wb") as handle:
        torch.save({"model": model_sd, "optim": optim_sd}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    shutil.rmtree(directory)
    return {"save_s": seconds, "blocked_s": seconds, "size_gb": size / 1e9}


def bench_manager(strategy: Any, root: Path, *, async_save: bool, reps: int, frozen_base: Any = None
                  ) -> List[Dict[str, Any]]:
    from launcher.train.checkpoint import CheckpointManager

    manager = CheckpointManager(root, strategy.env, strategy, keep_last=1, keep_every=None, async_save=async_save,
                                frozen_base=frozen_base)
    results = []
    for step in range(1, reps + 1):
        sync_result = manager.save(step, {"sampler": {}})
        manager.wait()  # training would go on here until the background write is done
        results.append(sync_result if sync_result is not None else manager.finished()[0])
    shutil.rmtree(root)
    return results


def summarize(name: str, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    save_s = statistics.median(r["save_s"] for r in runs)
    size = runs[-1]["size_gb"]
    return {"variant": name, "save_s": save_s, "blocked_s": statistics.median(r["blocked_s"] for r in runs),
            "first_blocked_s": runs[0]["blocked_s"], "size_gb": size, "gb_per_s": size / save_s, "runs": runs}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch.distributed as dist

    from launcher.train.frozen_base import base_fingerprint

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    work = Path(args.dir)
    strategy = build_strategy(args, lora=False)
    params = sum(p.numel() for p in strategy.module.parameters())
    rows = {"torch.save": [], "ours-sync": [], "ours-async": []}
    for _ in range(args.reps):  # interleaved: a burst of load from other processes hits every variant alike
        rows["torch.save"].append(bench_torch_save(strategy, work / "torch-save"))
        rows["ours-sync"] += bench_manager(strategy, work / "sync", async_save=False, reps=1)
        rows["ours-async"] += bench_manager(strategy, work / "async", async_save=True, reps=1)
    table = [summarize(name, runs) for name, runs in rows.items()]
    del strategy
    lora = build_strategy(args, lora=True)
    fingerprint = base_fingerprint({"pretrained": None, "hidden_size": args.hidden}, seed=0)
    table.append(summarize("lora", bench_manager(lora, work / "lora", async_save=False, reps=1,
                                                 frozen_base=fingerprint)))
    dist.destroy_process_group()
    by = {row["variant"]: row for row in table}
    return {
        "params": params, "dir": str(work), "reps": args.reps, "table": table,
        "throughput_vs_torch_save": by["ours-sync"]["gb_per_s"] / by["torch.save"]["gb_per_s"],
        "async_blocked_vs_sync": by["ours-async"]["blocked_s"] / by["ours-sync"]["blocked_s"],
        "lora_size_vs_full": by["lora"]["size_gb"] / by["ours-sync"]["size_gb"],
    }


def print_table(result: Dict[str, Any]) -> None:
    print(f"{result['params'] / 1e6:.0f}M parameters, {result['reps']} reps, on {result['dir']}")
    print(f"{'variant':<12} {'size GB':>8} {'save s':>8} {'GB/s':>7} {'blocked s':>10} {'first blocked s':>16}")
    for row in result["table"]:
        print(f"{row['variant']:<12} {row['size_gb']:>8.3f} {row['save_s']:>8.2f} {row['gb_per_s']:>7.2f} "
              f"{row['blocked_s']:>10.3f} {row['first_blocked_s']:>16.3f}")
    print(f"ours-sync / torch.save throughput: {result['throughput_vs_torch_save']:.2f}x (target >= 0.8)")
    print(f"ours-async / ours-sync blocked time: {result['async_blocked_vs_sync']:.3f}x (target <= 0.3)")
    print(f"lora / full checkpoint size: {result['lora_size_vs_full']:.4f} (target < 0.05)")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/launcher-checkpoint-bench", help="where to write (the disk measured)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
