"""Streaming, parallel tokenization into the cache and ``python -m launcher.prepare`` (local run, CPU job script,
the dry run's view of the cache). Offline, CPU only, tiny corpora: seconds."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from launcher.config.schema import DataConfig  # noqa: E402
from launcher.paths import EXAMPLES_DIR  # noqa: E402
from launcher.train import stream  # noqa: E402
from launcher.train.data import iter_texts, prepare_datasets  # noqa: E402
from launcher.train.tokenizer import train_bpe_tokenizer  # noqa: E402
from login_helpers import LUMI_ACCOUNT, REPO, config, run_launcher  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(iter_texts(EXAMPLES_DIR / "aac_chat.jsonl"), 512)


def build(path: Path, tokenizer, root: Path, **data):
    cfg = dataclasses.asdict(DataConfig(name="t", path=str(path), **data))
    return prepare_datasets(cfg, tokenizer, 32, root, seed=11, is_main=True, barrier=lambda: None)


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in ("train/tokens.npy", "train/doc_offsets.npy", "eval/tokens.npy", "eval/doc_offsets.npy"):
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def test_one_and_two_workers_write_the_same_cache_in_units(tmp_path, tokenizer, monkeypatch):
    corpus = tmp_path / "big.jsonl"
    corpus.write_text((EXAMPLES_DIR / "aac_chat.jsonl").read_text() * 6)  # 2,400 documents
    monkeypatch.setattr(stream, "UNIT_BYTES", 40_000)  # about 15 units: lines cut at every unit edge
    one = build(corpus, tokenizer, tmp_path / "one", num_workers=1)
    two = build(corpus, tokenizer, tmp_path / "two", num_workers=2)
    assert one.meta["stats"]["units"] > 10 and one.cache_dir.name == two.cache_dir.name
    assert digest(one.cache_dir) == digest(two.cache_dir)
    splits = one.meta["stats"]["splits"]
    assert splits["eval"]["documents"] == 120 and splits["train"]["documents"] == 2280  # exactly 5 %
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in iter_texts(corpus))
    assert one.train.num_tokens + one.eval.num_tokens == expected  # every document once, nothing lost at unit edges
    assert one.train.tokens.dtype == np.uint16 and stream.token_dtype(70_000) == np.uint32
    offsets = np.asarray(one.train.doc_offsets)
    assert offsets[0] == 0 and offsets[-1] == one.train.num_tokens and (np.diff(offsets) > 0).all()
    eos = tokenizer.eos_token_id
    assert (np.asarray(one.train.tokens)[offsets[1:] - 1] == eos).all()  # each document ends with eos


def test_cache_key_hashes_content_and_verify_reads_it_all(tmp_path, tokenizer, monkeypatch):
    from launcher.train import data_cache

    monkeypatch.setattr(data_cache, "EDGE_BYTES", 16_384)  # the file's ends, as the first and last MiB of a big file
    path = tmp_path / "c.txt"
    lines = [f"document {i} about the ball and the cup" for i in range(5000)]  # about 190 kB
    path.write_text("\n".join(lines) + "\n")
    first = build(path, tokenizer, tmp_path / "cache")
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace("document 0 ", "document X ", 1))  # same size, new first MiB
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: the old key could not tell
    assert build(path, tokenizer, tmp_path / "cache").cache_dir != first.cache_dir
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    middle = len(text) // 2
    path.write_text(text[:middle] + text[middle:].replace("about", "ABOUT", 1))  # between the hashed ends
    reused = build(path, tokenizer, tmp_path / "cache")
    assert reused.from_cache and reused.cache_dir == first.cache_dir  # documented: the key reads 2 MiB only
    verified = build(path, tokenizer, tmp_path / "cache", verify=True)
    assert not verified.from_cache and verified.cache_dir == first.cache_dir  # rebuilt in place
    assert build(path, tokenizer, tmp_path / "cache", verify=True).from_cache


def prepare_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "launcher.prepare", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_prepare_here_writes_the_cache_the_dry_run_and_the_run_find(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((EXAMPLES_DIR / "corpus.txt").read_text() * 5)
    args = [f"data.path={corpus}", f"output_dir={tmp_path / 'runs'}", "run_name=prep", "train.seq_len=32"]
    done = prepare_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s, ETA" in done.stderr and "prepare: done: 2000 documents" in done.stderr, done.stderr
    assert "launcher: prepared" in done.stdout
    again = prepare_cli(args, tmp_path)
    assert "tokenized cache reused" in again.stderr and "first and last MiB" in again.stderr, again.stderr
    from launcher.prepare.caches import source_caches

    (cache,) = source_caches(config(args))
    assert cache.meta is not None and str(cache.directory) in done.stdout  # the login node finds the job's key
    dry = run_launcher(["+cluster=local_slurm", "dry_run=true", "train.epochs=3", "train.micro_batch_size=4",
                        "train.grad_accum=1", *args], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    per_epoch = cache.meta["rows"]["train"] // (4 * 2)  # local_slurm: 2 ranks
    assert f"{per_epoch:,} steps per epoch (global batch 8 sequences); train.epochs=3: max_steps {3 * per_epoch}" \
        in dry.stdout, dry.stdout


def test_prepare_job_script_for_lumi_is_cpu_only_and_sized_from_the_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((EXAMPLES_DIR / "corpus.txt").read_text())
    done = prepare_cli(["+cluster=lumi", LUMI_ACCOUNT, "dry_run=true", f"data.path={corpus}",
                        f"output_dir={tmp_path / 'runs'}"], tmp_path)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for line in ("--partition=small", "--cpus-per-task=16", "--account=project_465000123", "--time=00:15:00",
                 "-m launcher.prepare.work"):
        assert line in script, script
    assert "--gpus" not in script and "--mem=10G" in script  # 2 + 0.5 x 16 cores, plus BPE training of 0 GB


@pytest.mark.parametrize("args, expected", [
    (["data.num_workers=0"], "data.num_workers"),
    (["train.epochs=2", "train.max_steps=50"], "train.max_steps=50"),
    (["data.sources=[{path: /nonexistent/x.txt, weight: 1}]"], "data.sources[0].path"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, args, expected):
    done = prepare_cli([*args, f"output_dir={tmp_path}"], tmp_path)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2


def test_mixture_prepared_in_process_shows_tokens_per_source_in_the_summary(tmp_path):
    from launcher.plan.summary import local_summary
    from launcher.prepare.work import prepare

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text((EXAMPLES_DIR / "corpus.txt").read_text())
    b.write_text("\n".join(t.replace("\n", " ") for t in iter_texts(EXAMPLES_DIR / "aac_chat.jsonl")) + "\n")
    args = [f"data.sources=[{{path: '{a}', weight: 0.8}}, {{path: '{b}', weight: 0.2}}]",
            f"output_dir={tmp_path / 'runs'}", "run_name=mix", "train.seq_len=32"]
    cfg = config(args)
    report = prepare(cfg, tmp_path / "runs" / "mix", emit=lambda line: None)
    assert [s["weight"] for s in report["sources"]] == [0.8, 0.2]
    summary = local_summary(config(args), 2, str(tmp_path / "runs" / "mix"))
    for source in report["sources"]:
        assert f"weight {source['weight']:g}, {source['rows']:,} train" in summary, summary
        assert f"{source['tokens']:,} train tokens" in summary, summary
