"""train.epochs (max_steps from the tokenized split, per-epoch reshuffle, exact resume mid-epoch) and data.sources
(mixtures drawn by weight, exact resume). The training runs are real 2-rank CPU runs of the tiny model."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TrainLauncher, check_ok, losses, records

from launcher.train.sampler import MixtureSampler, ResumableSampler, steps_per_epoch

EXAMPLES = Path("/work/shared/examples") if Path("/work/shared/examples").is_dir() else REPO / "launcher" / "examples"
# 380 train records (5 % of 400 held out) / (8 per rank x 2 ranks x 2 accumulation) = 11 optimizer steps per epoch.
EPOCH_RUN = [f"data.path={EXAMPLES / 'instructions.jsonl'}", "train.seq_len=64", "train.micro_batch_size=8",
             "train.grad_accum=2", "train.max_steps=200", "train.epochs=2", "train.eval_every=1000",
             "train.save_every=1000", "train.log_every=1", "train.warmup_steps=2", "train.preflight=false",
             "train.export=false"]
STEPS_PER_EPOCH = 380 // (8 * 2 * 2)


def test_mixture_draws_by_weight_and_resumes_exactly():
    def sampler(world: int = 1, rank: int = 0) -> MixtureSampler:
        return MixtureSampler([300, 50], [0.8, 0.2], global_batch_size=8, rank=rank, world_size=world, seed=5)

    whole = sampler()
    drawn = [i for _ in range(125) for i in whole.next_indices()]  # 1000 samples
    share = sum(i < 300 for i in drawn) / len(drawn)
    assert abs(share - 0.8) <= 0.02, share
    counts = Counter(i for i in drawn if i >= 300)
    assert max(counts.values()) <= -(-200 // 50) + 1  # the small source cycles through its permutation, no hot rows
    first = sampler()
    head = [first.next_indices() for _ in range(40)]
    state = first.state_dict()
    resumed = sampler()
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(85)] == [first.next_indices() for _ in range(85)]
    assert [i for batch in head for i in batch] == drawn[:320]
    # On two ranks the same state continues at the same global samples, each rank its half of each batch.
    ranks = [sampler(2, r) for r in (0, 1)]
    for r in ranks:
        r.load_state_dict(state)
    merged = [i for _ in range(5) for i in ranks[0].next_indices() + ranks[1].next_indices()]
    assert merged == drawn[320:360]
    assert sampler().next_indices() == sampler().next_indices()  # reproducible from the seed
    with pytest.raises(ValueError, match="weight above 0"):
        MixtureSampler([3, 4], [1.0, 0.0], global_batch_size=2, rank=0, world_size=1, seed=0)


def test_epoch_sampler_aligns_epochs_to_optimizer_steps_and_reshuffles():
    def sampler() -> ResumableSampler:
        return ResumableSampler(38, global_batch_size=4, rank=0, world_size=1, seed=1, grad_accum=2)

    s = sampler()
    per_epoch = steps_per_epoch(38, micro_batch_size=4, world_size=1, grad_accum=2)
    assert per_epoch == 4
    epochs = [[i for _ in range(per_epoch * 2) for i in s.next_indices()] for _ in range(2)]
    assert s.epoch == 2 and all(len(set(e)) == 32 for e in epochs)  # 38 - 38 % 8: whole optimizer steps only
    assert epochs[0] != epochs[1]  # reshuffled with (seed, epoch)
    again = sampler()
    for _ in range(11):
        again.next_indices()
    resumed = sampler()
    resumed.load_state_dict(again.state_dict())  # mid-epoch 2
    assert [resumed.next_indices() for _ in range(3)] == [again.next_indices() for _ in range(3)]


def test_mixture_sources_are_tokenized_once_each(tmp_path):
    from launcher.config.schema import DataConfig, DataSource
    from launcher.train.data import iter_texts, prepare_datasets
    from launcher.train.tokenizer import train_bpe_tokenizer

    corpus, chat = EXAMPLES / "corpus.txt", EXAMPLES / "aac_chat.jsonl"
    tokenizer = train_bpe_tokenizer([*iter_texts(corpus), *iter_texts(chat)], 512)
    a = tmp_path / "a.txt"
    a.write_text(corpus.read_text())
    b = tmp_path / "b.txt"
    b.write_text("\n".join(text.replace("\n", " ") for text in iter_texts(chat)) + "\n")
    data = dataclasses.asdict(DataConfig(path="unused", sources=[DataSource(str(a), 0.8), DataSource(str(b), 0.2)]))
    splits = prepare_datasets(data, tokenizer, 32, tmp_path / "cache", seed=3, is_main=True, barrier=lambda: None)
    assert [s["weight"] for s in splits.sources] == [0.8, 0.2]
    rows = [s["rows"] for s in splits.sources]
    assert len(splits.train) == sum(rows) and all(r > 0 for r in rows)
    only_a = dataclasses.asdict(DataConfig(path=str(a)))
    alone = prepare_datasets(only_a, tokenizer, 32, tmp_path / "cache", seed=3, is_main=True, barrier=lambda: None)
    assert alone.from_cache and str(alone.cache_dir) == splits.sources[0]["cache_dir"]  # shared with the mixture
    last = splits.train.collate([rows[0]])  # the first row of source b
    assert np.array_equal(last["input_ids"][0].numpy(), alone_b_row(tokenizer, b, tmp_path))


def alone_b_row(tokenizer, b: Path, tmp_path: Path) -> np.ndarray:
    from launcher.config.schema import DataConfig
    from launcher.train.data import prepare_datasets

    data = dataclasses.asdict(DataConfig(path=str(b)))
    return prepare_datasets(data, tokenizer, 32, tmp_path / "cache", seed=3, is_main=True,
                            barrier=lambda: None).train.collate([0])["input_ids"][0].numpy()


@pytest.mark.slow
def test_epochs_run_exactly_two_passes_and_resume_mid_epoch(train_launcher: TrainLauncher):
    from test_train_resume import _wait_for_step

    full = train_launcher.make_run("epochs-full", EPOCH_RUN)
    result = train_launcher.spawn(full)
    check_ok(result)
    out = result.stdout + result.stderr
    assert f"{STEPS_PER_EPOCH} steps per epoch, max_steps={2 * STEPS_PER_EPOCH}" in out, out[-3000:]
    assert sorted(losses(full)) == list(range(1, 2 * STEPS_PER_EPOCH + 1))

    stopped = train_launcher.make_run("epochs-stop", [*EPOCH_RUN, "train.save_every=3", "train.debug_step_sleep_s=0.2"])
    proc = subprocess.Popen(train_launcher.torchrun_command(stopped), env=train_launcher.env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_step(stopped, [proc], STEPS_PER_EPOCH + 2)  # inside the second epoch
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "after a checkpoint: exit 3" in out, out[-3000:]  # torchrun's own agent exits 1 on the SIGTERM
    assert STEPS_PER_EPOCH < max(r["step"] for r in records(stopped)) < 2 * STEPS_PER_EPOCH
    resumed = train_launcher.spawn(stopped)
    check_ok(resumed)
    assert losses(stopped) == losses(full)  # bit-identical on CPU, across the epoch boundary and the restart
