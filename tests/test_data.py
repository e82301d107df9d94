"""Data pipeline: formats, validation, tokenizer, tokenize-once cache, loss masking, resumable sampler.

Offline and CPU-only; the whole file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/datasets read them at import
os.environ["HF_DATASETS_OFFLINE"] = "1"

from launcher.config.schema import DataConfig, ModelConfig  # noqa: E402
from launcher.errors import ConfigError  # noqa: E402
from launcher.paths import EXAMPLES_DIR  # noqa: E402
from launcher.train import data as data_mod  # noqa: E402
from launcher.train.data import (  # noqa: E402
    IGNORE_INDEX,
    check_seq_len,
    detect_format,
    instruction_prompt,
    iter_texts,
    prepare_datasets,
    validate_data_file,
)
from launcher.train.sampler import ResumableSampler, eval_indices  # noqa: E402
from launcher.train.tokenizer import CHAT_TEMPLATE, load_or_build_tokenizer, train_bpe_tokenizer  # noqa: E402

EXAMPLES = {
    "corpus.txt": "text",
    "aac_chat.jsonl": "jsonl_text",
    "instructions.jsonl": "instruction",
    "chat_messages.jsonl": "chat",
    "reviews.csv": "jsonl_text",
}
MODEL_CFG = ModelConfig(vocab_size=1024, max_position_embeddings=512)


def no_barrier() -> None:
    pass


def all_example_texts():
    for name in sorted(EXAMPLES):
        yield from iter_texts(EXAMPLES_DIR / name)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(all_example_texts(), 1024, max_length=512)


def data_cfg(path: Path | str, **overrides) -> dict:
    """The data section as the job hands it to launcher.train.data (``asdict`` of the typed section)."""
    return dataclasses.asdict(DataConfig(name="t", path=str(path), **overrides))


def prepare(cfg: dict, tokenizer, tmp_path: Path, seq_len: int = 64, **kwargs):
    kwargs = {"seed": 1234, "is_main": True, "barrier": no_barrier, **kwargs}
    return prepare_datasets(cfg, tokenizer, seq_len, tmp_path / "cache", **kwargs)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name, fmt", EXAMPLES.items())
def test_detects_and_validates_every_example(name, fmt):
    assert detect_format(EXAMPLES_DIR / name) == fmt
    summary = validate_data_file(EXAMPLES_DIR / name)
    assert summary.format == fmt and summary.records_checked == 400


def test_missing_file_names_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path=.*nope.jsonl"):
        detect_format(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="data.path"):
        validate_data_file(tmp_path / "nope.jsonl", "chat")


def test_malformed_json_reports_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", ['{"text": "fine"}', "", '{"text": "broken'])
    with pytest.raises(ValueError, match=rf"{bad}:3: malformed JSON"):
        validate_data_file(bad)


def test_unknown_fields_list_the_known_formats(tmp_path):
    odd = write(tmp_path / "odd.jsonl", ['{"prompt": "a", "completion": "b"}'])
    with pytest.raises(ValueError, match=r"odd.jsonl:1: records with none of the known fields") as err:
        detect_format(odd)
    for fmt in EXAMPLES.values():
        assert fmt in str(err.value)
    assert "'completion', 'prompt'" in str(err.value)


def test_record_errors_name_line_and_field(tmp_path):
    path = write(tmp_path / "i.jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": 3}'])
    with pytest.raises(ValueError, match=r"i.jsonl:2: \"output\" is a int"):
        validate_data_file(path, "instruction")
    chat = write(tmp_path / "c.jsonl", ['{"messages": [{"role": "robot", "content": "x"}]}'])
    with pytest.raises(ValueError, match=r"c.jsonl:1: messages\[0\] needs a role"):
        validate_data_file(chat)
    with pytest.raises(ValueError, match="needs JSON Lines"):
        validate_data_file(EXAMPLES_DIR / "corpus.txt", "instruction")
    with pytest.raises(ConfigError, match="data.format"):
        validate_data_file(EXAMPLES_DIR / "corpus.txt", "parquet")


def test_csv_without_text_column(tmp_path):
    path = write(tmp_path / "x.csv", ["label,body", "1,hello"])
    with pytest.raises(ValueError, match=r"x.csv:1: CSV header .* no 'text' column"):
        detect_format(path)


def test_json_array_and_directory_of_files(tmp_path, tokenizer):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": f"doc {i} about the ball"} for i in range(20)]))
    assert detect_format(array) == "jsonl_text"
    assert validate_data_file(array).records_checked == 20
    assert len(prepare(data_cfg(array), tokenizer, tmp_path).train) > 0
    folder = tmp_path / "docs"
    folder.mkdir()
    write(folder / "b.txt", ["second file"] * 10)
    write(folder / "a.txt", ["first file"] * 10)
    assert validate_data_file(folder).records_checked == 20
    assert list(iter_texts(folder))[0] == "first file"  # sorted by name
    per_doc = {t: len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in ("first file", "second file")}
    expected = 10 * sum(per_doc.values())
    assert prepare(data_cfg(folder, eval_fraction=0.0), tokenizer, tmp_path).train.num_tokens == expected


def test_check_seq_len():
    check_seq_len(512, 512)
    with pytest.raises(ConfigError, match=r"train.seq_len=1024 .*max_position_embeddings=512"):
        check_seq_len(1024, 512)


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_and_round_trips(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    again = train_bpe_tokenizer(all_example_texts(), 1024, max_length=512)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    a = load_or_build_tokenizer(MODEL_CFG, all_example_texts, tmp_path / "a", is_main=True, barrier=no_barrier)
    b = load_or_build_tokenizer(MODEL_CFG, all_example_texts, tmp_path / "b", is_main=True, barrier=no_barrier)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "a"), local_files_only=True)
    text = "Dad needs the water. Ünïcödé too"
    assert loaded(text)["input_ids"] == a(text)["input_ids"] == b(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.chat_template == CHAT_TEMPLATE
    assert not list(tmp_path.glob(".*tmp*"))  # the temp dir was renamed away


def test_tokenizer_resume_and_other_ranks_load_without_training(tmp_path):
    save = tmp_path / "tok"
    load_or_build_tokenizer(MODEL_CFG, all_example_texts, save, is_main=True, barrier=no_barrier)

    def must_not_train():
        raise AssertionError("trained again")

    barriers = []
    for is_main in (True, False):
        tok = load_or_build_tokenizer(MODEL_CFG, must_not_train, save, is_main=is_main,
                                      barrier=lambda: barriers.append(1))
        assert tok.eos_token == "</s>"
    assert len(barriers) == 2  # every rank passes the barrier exactly once


def test_tokenizer_from_local_directory(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "pre")
    cfg = dataclasses.replace(MODEL_CFG, pretrained=str(tmp_path / "pre"))
    tok = load_or_build_tokenizer(cfg, lambda: [], tmp_path / "unused", is_main=False, barrier=None)
    assert len(tok) == len(tokenizer)
    with pytest.raises(FileNotFoundError, match="model.tokenizer=.*missing.*no such directory"):
        load_or_build_tokenizer(dataclasses.replace(cfg, tokenizer=str(tmp_path / "missing")), lambda: [],
                                tmp_path / "x", is_main=True, barrier=no_barrier)


# ------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_gives_seq_len_rows(name, tmp_path, tokenizer):
    splits = prepare(data_cfg(EXAMPLES_DIR / name), tokenizer, tmp_path)
    assert splits.format == EXAMPLES[name] and not splits.from_cache
    assert len(splits.train) > 0 and len(splits.eval) >= 1
    batch = splits.train.collate([0, len(splits.train) - 1])
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].shape == (2, 64) and str(batch[key].dtype) == "torch.int64"
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    item = splits.eval[0]
    assert item["input_ids"].shape == (64,)


def test_packing_covers_the_corpus(tmp_path, tokenizer):
    path = EXAMPLES_DIR / "corpus.txt"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    expected = [t for line in lines for t in [*tokenizer(line, add_special_tokens=False)["input_ids"],
                                              tokenizer.eos_token_id]]
    whole = prepare(data_cfg(path, eval_fraction=0.0), tokenizer, tmp_path, seq_len=32)
    assert len(whole.eval) == 0 and len(whole.train) == -(-len(expected) // 32)
    rows = whole.train.collate(list(range(len(whole.train))))
    tokens = rows["input_ids"][rows["attention_mask"].bool()].tolist()
    assert tokens == expected  # contiguous, in order, nothing dropped: only the last row is padded
    assert rows["attention_mask"][:-1].all()
    assert (rows["labels"][rows["attention_mask"].bool()] == rows["input_ids"][rows["attention_mask"].bool()]).all()
    split = prepare(data_cfg(path, eval_fraction=0.1), tokenizer, tmp_path, seq_len=32)
    assert split.train.num_tokens + split.eval.num_tokens == len(expected)
    assert split.meta["stats"]["documents"] == len(lines)


def test_eval_split_is_seeded(tmp_path, tokenizer):
    path = EXAMPLES_DIR / "instructions.jsonl"
    first = prepare(data_cfg(path), tokenizer, tmp_path / "a")
    same = prepare(data_cfg(path), tokenizer, tmp_path / "b")
    other = prepare(data_cfg(path), tokenizer, tmp_path / "c", seed=7)
    assert len(first.eval) == 20  # 5 % of 400
    assert np.array_equal(first.eval.input_ids, same.eval.input_ids)
    assert not np.array_equal(first.eval.input_ids, other.eval.input_ids)


def trained_text(row: dict, tokenizer) -> str:
    return tokenizer.decode(row["labels"][row["labels"] != IGNORE_INDEX])


def test_instruction_masks_the_prompt(tmp_path, tokenizer):
    path = EXAMPLES_DIR / "instructions.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    splits = prepare(data_cfg(path, eval_fraction=0.0), tokenizer, tmp_path, seq_len=128)
    row = splits.train[0]
    assert trained_text(row, tokenizer) == record["output"] + "</s>"
    n = int(row["attention_mask"].sum())
    prompt = tokenizer.decode(row["input_ids"][: n - (row["labels"] != IGNORE_INDEX).sum()])
    assert prompt.startswith("<s>### Instruction:") and record["input"] in prompt
    unmasked = prepare(data_cfg(path, eval_fraction=0.0, train_on_prompt=True), tokenizer, tmp_path, seq_len=128)
    row = unmasked.train[0]
    assert (row["labels"][:n] == row["input_ids"][:n]).all() and (row["labels"][n:] == IGNORE_INDEX).all()
    assert unmasked.cache_dir != splits.cache_dir


def test_chat_trains_on_assistant_turns_only(tmp_path, tokenizer):
    path = tmp_path / "two_turns.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "dad need water"},
                    {"role": "assistant", "content": "Dad needs water"}, {"role": "user", "content": "more"},
                    {"role": "assistant", "content": "Dad needs more water"}]
    write(path, [json.dumps({"messages": conversation})] * 4)
    row = prepare(data_cfg(path, eval_fraction=0.0), tokenizer, tmp_path, seq_len=128).train[0]
    assert trained_text(row, tokenizer) == "Dad needs water</s>Dad needs more water</s>"
    n = int(row["attention_mask"].sum())
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tokenizer.decode(row["input_ids"][:n]) == full  # segments reassemble the rendered conversation
    unmasked = prepare(data_cfg(path, eval_fraction=0.0, train_on_prompt=True), tokenizer, tmp_path, seq_len=128)
    assert trained_text(unmasked.train[0], tokenizer) == full


def test_chat_example_and_fallback_template(tmp_path, tokenizer):
    path = EXAMPLES_DIR / "chat_messages.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    row = prepare(data_cfg(path, eval_fraction=0.0), tokenizer, tmp_path).train[0]
    assert trained_text(row, tokenizer) == record["messages"][-1]["content"] + "</s>"
    bare = train_bpe_tokenizer(all_example_texts(), 1024)
    bare.chat_template = None  # e.g. a pretrained base model's tokenizer: the role-tagged template is used
    row = prepare(data_cfg(path, eval_fraction=0.0), bare, tmp_path).train[0]
    assert trained_text(row, bare) == record["messages"][-1]["content"] + "</s>"


def test_non_prefix_chat_template_is_refused(tmp_path):
    odd = train_bpe_tokenizer(all_example_texts(), 1024)
    odd.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="train_on_prompt=true"):
        prepare(data_cfg(EXAMPLES_DIR / "chat_messages.jsonl"), odd, tmp_path)


def test_too_long_examples_are_dropped_not_trained_on_padding(tmp_path, tokenizer):
    path = write(tmp_path / "long.jsonl", [json.dumps({"instruction": "word " * 200, "output": "ok"})] * 3
                 + [json.dumps({"instruction": "short", "output": "ok"})] * 3)
    short = len(tokenizer("<s>" + instruction_prompt({"instruction": "short"}) + "ok</s>")["input_ids"])
    splits = prepare(data_cfg(path, eval_fraction=0.0), tokenizer, tmp_path, seq_len=short + 4)
    assert len(splits.train) == 3 and splits.meta["stats"]["dropped_no_response_tokens"] == 3


def test_second_call_hits_the_cache(tmp_path, tokenizer, monkeypatch):
    cfg = data_cfg(EXAMPLES_DIR / "aac_chat.jsonl")
    first = prepare(cfg, tokenizer, tmp_path)
    meta_mtime = (first.cache_dir / "meta.json").stat().st_mtime_ns

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_mod, "_build_cache", must_not_tokenize)
    second = prepare(cfg, tokenizer, tmp_path)
    assert second.from_cache and second.cache_dir == first.cache_dir
    assert (first.cache_dir / "meta.json").stat().st_mtime_ns == meta_mtime
    assert np.array_equal(first.train.tokens, second.train.tokens)
    other_rank = prepare(cfg, tokenizer, tmp_path, is_main=False)  # non-main ranks only ever read
    assert other_rank.from_cache and len(other_rank.train) == len(first.train)
    monkeypatch.undo()
    shorter = prepare(cfg, tokenizer, tmp_path, seq_len=32)
    assert not shorter.from_cache and shorter.cache_dir != first.cache_dir and shorter.train.seq_len == 32
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.cache_dir.name,
                                                                             shorter.cache_dir.name])


def test_cache_key_follows_the_data_file(tmp_path, tokenizer):
    path = write(tmp_path / "c.txt", ["the ball"] * 10)
    first = prepare(data_cfg(path), tokenizer, tmp_path)
    write(path, ["the ball"] * 12)
    assert prepare(data_cfg(path), tokenizer, tmp_path).cache_dir != first.cache_dir


def test_other_ranks_wait_for_rank_zero(tmp_path, tokenizer):
    """Rank 1 reaches the barrier first; it must read only once rank 0 has published the cache."""
    cfg = data_cfg(EXAMPLES_DIR / "corpus.txt")
    barrier = threading.Barrier(2, timeout=30)
    results = {}

    def rank(r):
        results[r] = prepare(cfg, tokenizer, tmp_path, is_main=r == 0, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not results[0].from_cache and results[1].from_cache
    assert np.array_equal(results[0].train.tokens, results[1].train.tokens)
    with pytest.raises(FileNotFoundError, match="all nodes share"):
        prepare(data_cfg(EXAMPLES_DIR / "reviews.csv"), tokenizer, tmp_path / "empty", is_main=False)


def test_load_dataset_json_works_offline():
    code = ("import datasets; assert datasets.config.HF_DATASETS_OFFLINE; "
            f"ds = datasets.load_dataset('json', data_files={str(EXAMPLES_DIR / 'chat_messages.jsonl')!r}, "
            "split='train', cache_dir=__import__('tempfile').mkdtemp()); print(len(ds))")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "400"


# ------------------------------------------------------------------------------------------- sampler


def take(sampler: ResumableSampler, steps: int) -> list[list[int]]:
    return [sampler.next_indices() for _ in range(steps)]


def samplers(n: int, world: int, micro: int = 4, seed: int = 0) -> list[ResumableSampler]:
    return [ResumableSampler(n, global_batch_size=micro * world, rank=r, world_size=world, seed=seed)
            for r in range(world)]


def test_one_epoch_over_ranks_is_a_permutation():
    ranks = samplers(103, world=4)  # global batch 16: 6 steps, 7 samples dropped
    seen = [i for s in ranks for batch in take(s, 6) for i in batch]
    assert len(seen) == 96 and len(set(seen)) == 96 and all(0 <= i < 103 for i in seen)
    assert all(s.epoch == 1 and s.state_dict()["offset"] == 0 for s in ranks)
    first_epoch_start = samplers(103, world=4)[0].next_indices()
    assert ranks[0].next_indices() != first_epoch_start  # a new permutation each epoch


def test_each_rank_gets_a_contiguous_slice_of_the_global_batch():
    (single,) = samplers(64, world=1, micro=8)
    pair = samplers(64, world=2, micro=4)
    for _ in range(12):  # crosses epoch boundaries
        assert single.next_indices() == pair[0].next_indices() + pair[1].next_indices()


def test_restore_continues_identically():
    (reference,) = samplers(50, world=1, seed=3)
    (resumed,) = samplers(50, world=1, seed=3)
    take(reference, 7)
    take(resumed, 7)
    state = json.loads(json.dumps(resumed.state_dict()))  # survives the JSON beside a checkpoint
    (fresh,) = samplers(50, world=1, seed=999)  # the saved seed wins over the new command line's
    fresh.load_state_dict(state)
    assert take(fresh, 10) == take(reference, 10)
    assert set(state) >= {"epoch", "offset", "seed"}


def test_resume_on_fewer_ranks_continues_at_the_same_sample():
    two = samplers(40, world=2, micro=2)  # global batch 4
    take(two[0], 3)
    take(two[1], 3)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["offset"] == 12
    (one,) = samplers(40, world=1, micro=2)  # global batch 2 after the resume
    one.load_state_dict(state)
    expected = [i for _ in range(2) for s in two for i in s.next_indices()]
    assert [i for _ in range(4) for i in one.next_indices()] == expected


def test_sampler_rejects_impossible_batches():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(5, global_batch_size=8, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="does not split evenly"):
        ResumableSampler(50, global_batch_size=7, rank=0, world_size=2, seed=0)


def test_unshuffled_sampler_and_eval_indices():
    s = ResumableSampler(10, global_batch_size=4, rank=1, world_size=2, seed=0, shuffle=False)
    assert take(s, 3) == [[2, 3], [6, 7], [2, 3]]
    assert eval_indices(5, batch_size=2, rank=1, world_size=2, num_batches=4) == [[2, 3], [1, 2]]
    assert eval_indices(100, batch_size=2, rank=0, world_size=2, num_batches=2) == [[0, 1], [4, 5]]
    assert eval_indices(0, batch_size=2, rank=0, world_size=2, num_batches=2) == []


# ------------------------------------------------------------------------------------------- the job's config


@pytest.mark.parametrize("cluster", [[], ["+cluster=lumi"]])
def test_run_config_reads_back_typed_and_unchanged(tmp_path, cluster):
    from omegaconf import OmegaConf

    from launcher.config import compose
    from launcher.config.load import read_run_config
    from launcher.config.schema import ClusterConfig, LauncherConfig, TrainConfig, as_container

    composed = compose(["model=tiny", "data=corpus", "run_name=r", "train.seq_len=32", "train.lr=1e-3", *cluster])
    OmegaConf.save(composed, tmp_path / "config.yaml", resolve=True)
    cfg = read_run_config(tmp_path)
    assert isinstance(cfg, LauncherConfig) and isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.cluster, ClusterConfig) if cluster else cfg.cluster is None
    assert (cfg.train.seq_len, cfg.train.lr, cfg.model.vocab_size) == (32, 1e-3, 1024)
    assert dataclasses.asdict(cfg) == as_container(composed)  # the config hash of a run keeps its value


def test_run_config_drops_retired_keys_and_refuses_bad_values(tmp_path):
    from omegaconf.errors import ValidationError

    from launcher.config.load import read_run_config, section

    path = tmp_path / "config.yaml"
    path.write_text("run_name: old\ndata: {path: x.txt}\nstrategy: {name: zero2, zero_stage: 2}\n"
                    "train: {debug_step_sleep_s: 0}\n")
    cfg = read_run_config(tmp_path)  # written by an older launcher: zero_stage is no schema field any more
    assert cfg.strategy.name == "zero2" and not hasattr(cfg.strategy, "zero_stage")
    assert isinstance(cfg.train.debug_step_sleep_s, float)  # schema types, not YAML's
    path.write_text("run_name: bad\ndata: {path: x.txt}\ntrain: {lr: fast}\n")
    with pytest.raises(ValidationError, match="lr"):
        read_run_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no resolved config"):
        read_run_config(tmp_path / "absent")
    assert section({"vocab_size": 300}, ModelConfig) == ModelConfig(vocab_size=300)
    assert section(MODEL_CFG, ModelConfig) is MODEL_CFG
