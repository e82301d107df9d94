"""A finished causal-LM run put to use: ``launcher.generate``, ``launcher.export --merge`` and ``launcher.evaluate``.

Two tiny runs on 2 CPU ranks: full fine-tuning on instruction records the test writes (80 records, 8 held out: one
eval batch per rank covers each held-out row once, so the loop's last eval_loss is over the same rows as the
command's), and LoRA on the text corpus.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import REPO, TrainLauncher, check_ok, records

EVAL_RTOL = 1e-4


def _instructions(path: Path, n: int = 80) -> Path:
    colours = ["red", "blue", "green", "yellow", "black"]
    things = ["car", "house", "door", "cup", "bird", "hat", "ball", "book"]
    lines = []
    for i in range(n):
        colour, thing = colours[i % 5], things[(i // 5) % 8]
        output = f"The {thing} is {colour}." if i % 3 else f"A {colour} {thing}, {'very ' * (i % 4)}nice."
        lines.append(json.dumps({"instruction": "Describe the object.", "input": f"{colour} {thing}",
                                 "output": output}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lm_runs(train_launcher: TrainLauncher, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    data = _instructions(tmp_path_factory.mktemp("instructions") / "describe.jsonl")
    full = train_launcher.make_run("gen-full", [
        f"data.path={data}", "data.eval_fraction=0.1", "train.seq_len=48", "train.max_steps=8", "train.eval_every=8",
        "train.eval_batches=2", "train.save_every=0",
    ])
    lora = train_launcher.make_run("gen-lora", [
        "peft=lora", "train.max_steps=6", "train.lr=1e-2", "train.eval_every=0", "train.save_every=0",
    ])
    for run_dir in (full, lora):
        check_ok(train_launcher.spawn(run_dir))
    return {"full": full, "lora": lora}


def _tool(module: str, *args: str, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    merged = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=merged)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _generations(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_evaluate_perplexity_is_exp_of_the_training_eval_loss(lm_runs: Dict[str, Path]) -> None:
    run_dir = lm_runs["full"]
    logged = [r for r in records(run_dir) if "eval_loss" in r][-1]
    assert logged["step"] == 8 and logged["eval_batches"] == 1
    _ok(_tool("launcher.evaluate", str(run_dir)))
    result = json.loads((run_dir / "eval" / "heldout.json").read_text())
    assert result["rows"] == 8 and result["split"] == "eval" and result["weights"] == "full"
    assert result["eval_tokens"] == logged["eval_tokens"]  # the same rows and labels
    assert result["perplexity"] == pytest.approx(math.exp(logged["eval_loss"]), rel=EVAL_RTOL)
    table = (run_dir / "eval" / "README.md").read_text()
    assert "| heldout |" in table and "perplexity" in table
    # status shows the newest scores.
    status = _ok(_tool("launcher.status", str(run_dir.parent)))
    row = next(line for line in status.stdout.splitlines() if line.startswith("gen-full"))
    assert f"heldout: ppl {result['perplexity']:.4g}" in row


@pytest.mark.slow
def test_evaluate_scores_another_file_whole(lm_runs: Dict[str, Path], tmp_path: Path) -> None:
    data = _instructions(tmp_path / "other.jsonl", n=12)
    _ok(_tool("launcher.evaluate", str(lm_runs["full"]), "--data", str(data)))
    result = json.loads((lm_runs["full"] / "eval" / "other.json").read_text())
    assert result["rows"] == 12 and result["split"] == "all" and math.isfinite(result["perplexity"])


@pytest.mark.slow
def test_generate_from_a_full_run(lm_runs: Dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the object."}) + "\n")
    result = _ok(_tool("launcher.generate", str(lm_runs["full"]), "--prompt", "red car", "--prompts", str(prompts),
                       "--max-new-tokens", "6"))
    assert "### red car" in result.stdout
    out = _generations(lm_runs["full"])
    assert [r["prompt"] for r in out] == ["red car", "Describe the object."]
    assert all(r["weights"] == "full" and isinstance(r["completion"], str) and r["completion"] for r in out), out


@pytest.mark.slow
def test_lora_generates_the_same_from_the_adapter_and_the_merged_model(lm_runs: Dict[str, Path]) -> None:
    run_dir = lm_runs["lora"]
    assert not (run_dir / "export" / "merged").exists()
    args = ["--prompt", "The", "--prompt", "Once upon a time", "--max-new-tokens", "8"]
    _ok(_tool("launcher.generate", str(run_dir), "--model", "adapter", *args))
    _ok(_tool("launcher.export", str(run_dir), "--merge"))
    assert (run_dir / "export" / "merged" / "config.json").is_file()
    _ok(_tool("launcher.generate", str(run_dir), *args))  # auto: the merged model now
    adapter, merged = _generations(run_dir)[:2], _generations(run_dir)[2:]
    assert [r["weights"] for r in adapter + merged] == ["adapter"] * 2 + ["merged"] * 2
    assert [r["completion"] for r in adapter] == [r["completion"] for r in merged]
    assert all(r["completion"] for r in adapter), adapter


@pytest.mark.slow
def test_prompts_are_shaped_as_the_run_trained(lm_runs: Dict[str, Path]) -> None:
    """Chat runs: the chat template (one user turn, the assistant's opening); instruction runs: the instruction
    template; text runs: the prompt itself. The format comes from the run's data (detected when config.yaml has
    none)."""
    import dataclasses

    from transformers import AutoTokenizer

    from launcher.train.exported import find_export
    from launcher.train.inference import prompt_text

    instruction, text = find_export(lm_runs["full"]), find_export(lm_runs["lora"])
    assert (instruction.data_format, text.data_format) == ("instruction", "text")
    tokenizer = AutoTokenizer.from_pretrained(instruction.directory)
    assert prompt_text(instruction, tokenizer, "Hi") == "<s>### Instruction:\nHi\n\n### Response:\n"
    assert prompt_text(text, tokenizer, "Hi") == "Hi"
    chat = dataclasses.replace(text, data_format="chat")
    assert prompt_text(chat, tokenizer, "Hi") == "<s><|user|>\nHi</s><|assistant|>\n"


@pytest.mark.slow
def test_lm_eval_runs_a_task_built_from_a_local_jsonl_offline(lm_runs: Dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps({"question": f"The {thing} is", "choices": [" red.", " blue."], "answer": i % 2})
                            + "\n" for i, thing in enumerate(["car", "house", "door", "cup", "bird", "hat"])))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "colours.yaml").write_text(
        "task: colours_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: question\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    _ok(_tool("launcher.evaluate", str(lm_runs["full"]), "--lm-eval", "colours_local", "--lm-eval-include",
              str(tasks), env=offline))
    result = json.loads((lm_runs["full"] / "eval" / "lm-eval.json").read_text())
    assert 0.0 <= result["lm_eval"]["colours_local/acc"] <= 1.0, result
    # A benchmark whose dataset is not in the cache is named before anything is evaluated.
    missing = _tool("launcher.evaluate", str(lm_runs["full"]), "--lm-eval", "arc_easy", "--name", "arc", env=offline)
    assert missing.returncode == 2 and "arc_easy" in missing.stderr and "not in the local cache" in missing.stderr
    assert not (lm_runs["full"] / "eval" / "arc.json").exists()


# -- bad input: one line, exit 2, before torch is imported ---------------------------------------------------------


@pytest.fixture
def poisoned_torch(tmp_path: Path) -> Dict[str, str]:
    package = tmp_path / "poison" / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('poisoned torch: the login path imported torch')\n")
    return {"PYTHONPATH": f"{tmp_path / 'poison'}{os.pathsep}{REPO}"}


@pytest.mark.parametrize("module, args, expected", [
    ("launcher.generate", ["RUN"], "--prompt=(none): no prompt given"),
    ("launcher.generate", ["RUN", "--prompt", "x", "--top-p", "2", "--do-sample"], "--top-p=2.0: out of range"),
    ("launcher.generate", ["RUN", "--prompt", "x", "--temperature", "0.5"], "only used when sampling"),
    ("launcher.generate", ["RUN", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    ("launcher.generate", ["RUN", "--prompt", "x", "--model", "merged"], "a full fine-tune: it has no adapter"),
    ("launcher.generate", ["NORUN", "--prompt", "x"], "not a run directory"),
    ("launcher.export", ["RUN"], "--merge=(none): nothing to do"),
    ("launcher.export", ["RUN", "--merge"], "the export is a full model"),
    ("launcher.evaluate", ["RUN", "--data", "/no/such.jsonl"], "--data=/no/such.jsonl: no such file"),
    ("launcher.evaluate", ["RUN", "--batch-size", "0"], "--batch-size=0"),
])
def test_bad_input_is_one_line(tmp_path: Path, poisoned_torch: Dict[str, str], module: str, args: List[str],
                               expected: str) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run_name: run\ndata:\n  path: /nowhere.txt\n  format: text\n")
    (run_dir / "export" / "config.json").write_text("{}")
    argv = [str(run_dir) if a == "RUN" else str(tmp_path / "norun") if a == "NORUN" else a for a in args]
    result = _tool(module, *argv, env=poisoned_torch)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("launcher: error: ") and expected in lines[0], lines[0]


# -- train.evaluate_after through the real local Slurm --------------------------------------------------------------


def _slurm_up() -> bool:
    import shutil

    return shutil.which("sbatch") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0


def _sacct(job_id: str) -> Dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,Start,End"], capture_output=True,
                         text=True, timeout=30).stdout.strip().splitlines()
    state, start, end = (out[0].split("|") + ["", "", ""])[:3] if out else ("", "", "")
    return {"state": state.split(" ")[0], "start": start, "end": end}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="the local Slurm is not up (bash scripts/local_slurm.sh up)")
def test_evaluate_after_is_a_follow_up_job(tmp_path: Path) -> None:
    import re
    import time

    from login_helpers import run_launcher

    done = run_launcher(["+cluster=local_slurm", "train.evaluate_after=true", "run_name=evalafter", "train.max_steps=4",
                         "train.seq_len=32", "train.micro_batch_size=4", "train.eval_every=4", "train.save_every=4",
                         "train.log_every=1"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (train_id,) = re.findall(r"submitted job (\d+)", done.stdout)
    (eval_id,) = re.findall(r"submitted evaluation job (\d+)", done.stdout)
    shown = subprocess.run(["scontrol", "show", "job", eval_id], capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{train_id}" in shown or "JobState=COMPLETED" in shown, shown
    deadline = time.time() + 300
    while time.time() < deadline and _sacct(eval_id)["state"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        time.sleep(2)
    train, evaluation = _sacct(train_id), _sacct(eval_id)
    assert train["state"] == "COMPLETED" and evaluation["state"] == "COMPLETED", (train, evaluation)
    assert evaluation["start"] >= train["end"], (train, evaluation)  # ISO times compare as strings
    run_dir = tmp_path / "runs" / "evalafter"
    result = json.loads((run_dir / "eval" / "heldout.json").read_text())
    assert math.isfinite(result["perplexity"]) and result["rows"] > 0
    # generate --submit: the same command as a one-task job of the run's cluster.
    done = _ok(_tool("launcher.generate", str(run_dir), "--prompt", "Once", "--max-new-tokens", "4", "--submit"))
    (gen_id,) = re.findall(r"submitted generation job (\d+)", done.stdout)
    deadline = time.time() + 180
    while time.time() < deadline and _sacct(gen_id)["state"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        time.sleep(2)
    assert _sacct(gen_id)["state"] == "COMPLETED"
    assert [r["prompt"] for r in _generations(run_dir)] == ["Once"]
