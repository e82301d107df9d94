"""task=classification end to end on 2 CPU ranks: a labelled CSV the test writes (two classes, told apart by their
adjectives), full and LoRA fine-tuning under ddp, zero2 and fsdp, the eval metrics in metrics.jsonl, the export through
``pipeline("text-classification")``; plus the label reading, the metrics, the login-node check and the head's FLOPs.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from conftest import REPO, TrainLauncher, check_ok, records

POSITIVE = ["great", "wonderful", "excellent", "delicious", "friendly", "lovely"]
NEGATIVE = ["awful", "terrible", "rude", "cold", "dirty", "horrible"]
SUBJECTS = ["food", "service", "coffee", "staff", "room", "pizza", "waiter", "soup"]
ENDINGS = ["today", "this time", "as usual", "again", "tonight"]
# Never in the data: the exported model must classify them from the words it learned.
HELD_OUT = {"The pizza was lovely again.": "positive", "The pizza was horrible again.": "negative"}
# Sequences of 16 tokens, 8 per rank: 30 steps are about 2.5 epochs of the 192 training rows.
OVERRIDES = [
    "task=classification", "data.eval_fraction=0.2", "train.seq_len=16", "train.micro_batch_size=8",
    "train.grad_accum=1", "train.max_steps=30", "train.warmup_steps=3", "train.eval_every=15", "train.eval_batches=3",
    "train.save_every=0", "train.log_every=5",
]
# (strategy, peft, lr): ddp full and LoRA are the acceptance runs; zero2 and fsdp show the sharded paths (fsdp also
# merges the adapter during the export: peft.merge_on_export).
RUNS = {
    "full-ddp": ("ddp", "none", "3e-3"),
    "lora-ddp": ("ddp", "lora", "1e-2"),
    "full-zero2": ("zero2", "none", "3e-3"),
    "lora-fsdp": ("fsdp", "lora", "1e-2"),
}


def write_reviews(path: Path, rows: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "text"])
        written = 0
        while written < rows:
            label = rng.choice(["positive", "negative"])
            adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
            text = f"The {rng.choice(SUBJECTS)} was {adjective} {rng.choice(ENDINGS)}."
            if text in HELD_OUT:
                continue
            writer.writerow([label, text])
            written += 1
    return path


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reviews(tmp_path_factory.mktemp("labelled") / "reviews.csv")


@pytest.fixture(scope="module")
def runs(train_launcher: TrainLauncher, deepspeed_ops: None, reviews: Path) -> Dict[str, Path]:
    out = {}
    for name, (strategy, peft, lr) in RUNS.items():
        merge = ["peft.merge_on_export=true"] if strategy == "fsdp" else []
        run_dir = train_launcher.make_run(f"cls-{name}", [*OVERRIDES, f"data.path={reviews}", f"strategy={strategy}",
                                                          f"peft={peft}", f"train.lr={lr}", *merge])
        check_ok(train_launcher.spawn(run_dir))
        out[name] = run_dir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_classification_learns_and_logs_its_metrics(runs: Dict[str, Path], name: str) -> None:
    evals = [r for r in records(runs[name]) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30], evals
    last = evals[-1]
    assert last["eval_accuracy"] >= 0.9 and last["eval_f1"] >= 0.9, evals
    assert last["eval_loss"] < evals[0]["eval_loss"] or last["eval_accuracy"] == 1.0, evals
    config = json.loads((runs[name] / "export" / ("base_model" if "lora" in name else "") / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None


@pytest.mark.slow
def test_full_export_classifies_through_the_pipeline(runs: Dict[str, Path]) -> None:
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(runs["full-ddp"] / "export"), device="cpu")
    assert [r["label"] for r in classifier(list(HELD_OUT))] == list(HELD_OUT.values())


@pytest.mark.slow
def test_lora_export_classifies_from_the_adapter(runs: Dict[str, Path]) -> None:
    """The adapter export (trained head included: peft's modules_to_save) loads with peft's auto class."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    export = runs["lora-ddp"] / "export"
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(export)).merge_and_unload()
    classifier = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(export),
                          device="cpu")
    assert [r["label"] for r in classifier(list(HELD_OUT))] == list(HELD_OUT.values())


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_evaluate_and_generate_on_a_classification_run(runs: Dict[str, Path]) -> None:
    """evaluate: the loop's last eval covered the 48 held-out rows once (3 batches of 2 x 8), so the command's
    scores over the held-out split are the same; generate prints label and probability."""
    run_dir = runs["full-ddp"]
    logged = [r for r in records(run_dir) if "eval_loss" in r][-1]
    _tool("launcher.evaluate", str(run_dir))
    result = json.loads((run_dir / "eval" / "heldout.json").read_text())
    assert result["rows"] == 48 and result["eval_accuracy"] == logged["eval_accuracy"]
    assert result["eval_f1"] == pytest.approx(logged["eval_f1"]) and "perplexity" not in result
    assert result["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-4)
    out = _tool("launcher.generate", str(run_dir), *[f"--prompt={text}" for text in HELD_OUT])
    lines = [line.split("\t") for line in out.stdout.splitlines() if "\t" in line]
    assert [line[0] for line in lines] == list(HELD_OUT.values()) and all(float(line[1]) > 0.5 for line in lines)
    saved = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [r["label"] for r in saved] == list(HELD_OUT.values())


@pytest.mark.slow
def test_merged_lora_classifier_is_a_standalone_pipeline_model(runs: Dict[str, Path]) -> None:
    from transformers import pipeline

    _tool("launcher.export", str(runs["lora-ddp"]), "--merge")  # after the fact; lora-fsdp merged in its export
    for name in ("lora-ddp", "lora-fsdp"):
        classifier = pipeline("text-classification", model=str(runs[name] / "export" / "merged"), device="cpu")
        assert [r["label"] for r in classifier(list(HELD_OUT))] == list(HELD_OUT.values()), name


# -- no training below -----------------------------------------------------------------------------------------------


def test_labels_are_read_sorted_from_jsonl_with_integer_labels(tmp_path: Path) -> None:
    from launcher.train.labelled_data import iter_labelled, label_names

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"s{i}", "y": y}) + "\n" for i, y in enumerate([10, 2, 9, 2])))
    records_ = list(iter_labelled(path, "sentence", "y"))
    assert records_[0] == ("s0", "10")
    assert label_names([label for _, label in records_]) == ["2", "9", "10"]  # numeric order, not "10" < "2"
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "y": 1}\n{"sentence": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: task.label_field='y'"):
        list(iter_labelled(tmp_path / "bad.jsonl", "sentence", "y"))


def test_accuracy_and_macro_f1() -> None:
    from launcher.train.classification import scores

    # true 0: 3 right, 1 called 1; true 1: 2 right; class 2 never occurs nor is predicted (left out of the mean).
    result = scores([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    assert result["eval_accuracy"] == pytest.approx(5 / 6)
    assert result["eval_f1"] == pytest.approx((2 * 3 / (2 * 3 + 1) + 2 * 2 / (2 * 2 + 1)) / 2)


def test_the_login_node_names_a_missing_label_field(tmp_path: Path) -> None:
    data = tmp_path / "unlabelled.csv"
    data.write_text("text,stars\nnice place,5\nbad place,1\n")
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "task=classification", f"data.path={data}", f"output_dir={tmp_path}",
         "dry_run=true"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "task.label_field='label'" in lines[0] and "unlabelled.csv:2" in lines[0], lines
    assert not (tmp_path / "tiny-ddp-none").exists()


def test_the_flops_count_knows_the_classification_head() -> None:
    """The login node's count of a classifier (ModelShape.num_labels) equals the job's count of the built model."""
    import dataclasses

    pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from launcher.plan.flops import flops_for_shape
    from launcher.plan.shape import ModelShape
    from launcher.train.metrics import count_parameters, flops_per_token

    for tied in (False, True):
        config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=tied, num_labels=3, pad_token_id=0)
        model = AutoModelForSequenceClassification.from_config(config)
        shape = dataclasses.replace(ModelShape.from_config(config), num_labels=3)
        params = count_parameters(model)
        assert shape.n_params() == params["total"], tied
        assert shape.head_params() == 32 * 3
        job = flops_per_token(params, num_layers=2, hidden_size=32, seq_len=16)
        assert flops_for_shape(shape, 16) == pytest.approx(job, rel=1e-12), tied
    causal = ModelShape.from_config(config)
    assert causal.n_params() - shape.n_params() == 300 * 32 * (0 if tied else 1) - 32 * 3


def test_custom_field_names_pass_the_login_checks(tmp_path: Path) -> None:
    """task.text_field / task.label_field name any columns: the generic text-data check does not ask for `text`."""
    from launcher.config import validated

    data = tmp_path / "reviews.csv"
    data.write_text("review,sentiment\na great film,pos\nan awful film,neg\n")
    cfg = validated(["task=classification", f"data.path={data}", "task.text_field=review",
                     "task.label_field=sentiment", f"output_dir={tmp_path}"])
    assert cfg.data.format is None and cfg.task.text_field == "review"
    from launcher.plan.fit import planned_shape

    assert planned_shape(cfg).num_labels == 2  # the planner's head: hidden x 2, not the LM head
