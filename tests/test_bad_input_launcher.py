"""Bad input to ``python -m launcher``, as a careless or hostile user gives it (issue 13): each case ends in one clear
line naming the field and the value, exit code 2, no traceback, no file written, nothing injected run.

Cases run in-process through ``launcher.__main__.main`` (the same path as the command line, Hydra's compose API) so
that ~120 of them take seconds; ``tests/test_safety.py`` runs rendered scripts under bash, and the ``-m`` cases run
as subprocesses in ``tests/test_sweep.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

import launcher.__main__ as cli
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT

LUMI = ["+cluster=lumi", LUMI_ACCOUNT]
LEO = ["+cluster=leonardo", LEONARDO_ACCOUNT]
LOCAL_SLURM = ["+cluster=local_slurm"]
PWN = "{tmp}/pwned"
TOKEN = "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zQ"


def _files(tmp: Path) -> Dict[str, Path]:
    """Data files of every broken kind, made once per case directory."""
    data = tmp / "data"
    data.mkdir()
    empty = data / "empty.txt"
    empty.write_text("")
    binary = data / "model.bin"
    binary.write_bytes(b"\x00\x01\x02binary\x00" * 100)
    (data / "emptydir").mkdir()
    bad_json = data / "bad.jsonl"
    bad_json.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json\n")
    no_output = data / "no_output.jsonl"
    no_output.write_text(json.dumps({"instruction": "a"}) + "\n")
    no_messages = data / "chat.jsonl"
    no_messages.write_text(json.dumps({"messages": "hello"}) + "\n")
    csv = data / "labels.csv"
    csv.write_text("label,sentence\n1,good\n")
    text = data / "corpus.txt"
    text.write_text("hello world\n" * 10)
    latin = data / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    (tmp / "model").mkdir()  # a directory without config.json
    return {"empty": empty, "binary": binary, "emptydir": data / "emptydir", "bad_json": bad_json,
            "no_output": no_output, "no_messages": no_messages, "csv": csv, "text": text, "latin": latin,
            "model": tmp / "model"}


# (overrides, the field the message names, a piece of the value it shows)
REFUSED: List[tuple] = [
    # -- values that would reach a shell ---------------------------------------------------------------------
    ([*LOCAL_SLURM, "+cluster.python='python; touch {tmp}/pwned'"], "cluster.python", "touch"),
    ([*LOCAL_SLURM, "+cluster.python='$(touch {tmp}/pwned)'"], "cluster.python", "touch"),
    ([*LOCAL_SLURM, "+cluster.python='`id`'"], "cluster.python", "id"),
    ([*LOCAL_SLURM, "cluster.setup_template=/etc/passwd"], "cluster.setup_template", "/etc/passwd"),
    ([*LOCAL_SLURM, "cluster.setup_template=../../x.sh"], "cluster.setup_template", "x.sh"),
    ([*LOCAL_SLURM, "cluster.setup_template=missing.sh"], "cluster.setup_template", "missing.sh"),
    ([*LOCAL_SLURM, "+cluster.teardown_template=/tmp/evil.sh"], "cluster.teardown_template", "evil"),
    ([*LOCAL_SLURM, "'+cluster.sbatch_extra={\"x\\ny\": 1}'"], "cluster.sbatch_extra", "x"),
    ([*LOCAL_SLURM, "+cluster.sbatch_extra.Bad_Key=1"], "cluster.sbatch_extra.Bad_Key", "Bad_Key"),
    ([*LOCAL_SLURM, "+cluster.sbatch_extra.partition=urgent"], "cluster.sbatch_extra.partition", "partition"),
    ([*LOCAL_SLURM, "+cluster.sbatch_extra.wrap=id"], "cluster.sbatch_extra.wrap", "wrap"),
    ([*LOCAL_SLURM, "+cluster.exclude_nodes='a;b'"], "cluster.exclude_nodes", "a;b"),
    ([*LOCAL_SLURM, "+cluster.exclude_nodes='$(id)'"], "cluster.exclude_nodes", "id"),
    ([*LOCAL_SLURM, "+cluster.visible_devices_var='X Y'"], "cluster.visible_devices_var", "X Y"),
    ([*LOCAL_SLURM, "+cluster.env.'BAD NAME'=1"], "cluster.env.", "BAD NAME"),
    ([*LUMI, "cluster.container.python='python && rm -rf /'"], "cluster.container.python", "rm"),
    ([*LUMI, "cluster.container.runtime=docker"], "cluster.container.runtime", "docker"),
    ([*LUMI, "cluster.container.image=''"], "cluster.container.image", ""),
    (["run_name='a\nb'"], "run_name", "a"),
    (["run_name=a/b"], "run_name", "a/b"),
    (["run_name=.."], "run_name", ".."),
    (["run_name=" + "x" * 300], "run_name", "xxx"),
    ([*LUMI, "run_name=a:b"], "run_name", "a:b"),
    ([*LUMI, "run_name=a,b"], "run_name", "a"),
    ([*LUMI, "output_dir=/scratch/a:b"], "output_dir", "a:b"),
    (["output_dir=''"], "output_dir", ""),
    # -- credentials, by value and by name ---------------------------------------------------------------------
    ([*LOCAL_SLURM, f"+cluster.env.LABEL={TOKEN}"], "cluster.env.LABEL", "redacted"),
    ([*LOCAL_SLURM, f"+cluster.env.LABEL=x{TOKEN}"], "cluster.env.LABEL", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.LABEL=AKIAIOSFODNN7EXAMPLE"], "cluster.env.LABEL", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.LABEL=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"], "cluster.env.LABEL", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.DB_URL='postgres://bob:hunter2@db/x'"], "cluster.env.DB_URL", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.OPTS='DB_PASS=hunter2'"], "cluster.env.OPTS", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.DB_PASS=hunter2"], "cluster.env.DB_PASS", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.AWS_SECRET_ACCESS_KEY=abc"], "cluster.env.AWS_SECRET_ACCESS_KEY", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.HF_TOKEN=abc"], "cluster.env.HF_TOKEN", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.MY_API_KEY=abc"], "cluster.env.MY_API_KEY", "redacted"),
    ([*LOCAL_SLURM, "+cluster.sbatch_extra.comment=" + "ghp_" + "a1B2c3D4" * 5], "cluster.sbatch_extra.comment",
     "redacted"),
    ([f"run_name={TOKEN}"], "run_name", "redacted"),
    (["run_name=0123456789abcdef0123456789abcdef01234567"], "run_name", "redacted"),
    ([*LOCAL_SLURM, "+cluster.env.LABEL=${oc.env:HOME}"], "cluster.env.LABEL", "oc.env"),
    (["run_name=${oc.env:USER,me}"], "run_name", "oc.env"),
    # -- values that would end in a traceback --------------------------------------------------------------------
    ([*LUMI, "cluster.device=tpu_v5"], "cluster.device", "tpu_v5"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "3"),
    (["model.num_heads=3"], "model.num_heads", "3"),
    (["budget.mfu=0"], "budget.mfu", "0"),
    (["budget.mfu=1.5"], "budget.mfu", "1.5"),
    (["budget.tokens=-1"], "budget.tokens", "-1"),
    (["budget.tokens_per_s_per_device=0"], "budget.tokens_per_s_per_device", "0"),
    (["model=nope"], "model", "nope"),
    (["strategy=zero4"], "strategy", "zero4"),
    (["+cluster=mars"], "cluster", "mars"),
    (["train.lr=abc"], "train.lr", "abc"),
    (["train.max_steps=1.5"], "train.max_steps", "1.5"),
    (["nodes=two"], "nodes", "two"),
    (["run_name=${nope}"], "run_name", "nope"),
    (["train.lr=${train.nope}"], "train.lr", "nope"),
    (["cluster.partition=x"], "cluster.partition", "no cluster"),
    (["+train.max_stepz=3"], "train.max_stepz", "3"),
    (["+strategy.zero_stage=2"], "strategy.zero_stage", "2"),
    ([*LUMI, "+cluster.partitions.standard-g.max_nodez=5"], "cluster.partitions.standard-g.max_nodez", "5"),
    (["train.lr=1e-3", "train.lr="], "train.lr", ""),
    # -- numbers that cannot work -------------------------------------------------------------------------------
    (["train.lr=nan"], "train.lr", "nan"),
    (["train.lr=inf"], "train.lr", "inf"),
    (["train.lr=-1e-3"], "train.lr", "-0.001"),
    (["train.lr=0"], "train.lr", "0"),
    (["train.warmup_steps=-1"], "train.warmup_steps", "-1"),
    (["train.grad_clip=-1"], "train.grad_clip", "-1"),
    (["train.grad_clip=nan"], "train.grad_clip", "nan"),
    (["train.weight_decay=-0.1"], "train.weight_decay", "-0.1"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio", "2"),
    (["train.min_lr_ratio=-0.5"], "train.min_lr_ratio", "-0.5"),
    (["train.max_steps=0"], "train.max_steps", "0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size", "0"),
    (["train.grad_accum=0"], "train.grad_accum", "0"),
    (["train.seq_len=0"], "train.seq_len", "0"),
    (["train.seq_len=4096"], "train.seq_len", "4096"),
    (["train.save_every=-1"], "train.save_every", "-1"),
    (["train.eval_every=-1"], "train.eval_every", "-1"),
    (["+cluster=local_slurm", "train.save_every=0"], "train.save_every", "0"),
    (["train.log_every=-5"], "train.log_every", "-5"),
    (["train.keep_last=0"], "train.keep_last", "0"),
    (["train.keep_every=0"], "train.keep_every", "0"),
    (["train.eval_batches=0"], "train.eval_batches", "0"),
    (["train.save_every_minutes=0"], "train.save_every_minutes", "0"),
    (["train.global_batch_size=0"], "train.global_batch_size", "0"),
    (["train.debug_step_sleep_s=-1"], "train.debug_step_sleep_s", "-1"),
    (["data.eval_fraction=1"], "data.eval_fraction", "1"),
    (["data.eval_fraction=-0.1"], "data.eval_fraction", "-0.1"),
    (["model.vocab_size=0"], "model.vocab_size", "0"),
    (["model.hidden_size=-64"], "model.hidden_size", "-64"),
    (["model.num_layers=0"], "model.num_layers", "0"),
    (["model.rope_theta=0"], "model.rope_theta", "0"),
    (["peft=lora", "peft.r=0"], "peft.r", "0"),
    (["peft=lora", "peft.alpha=0"], "peft.alpha", "0"),
    (["peft=lora", "peft.dropout=1"], "peft.dropout", "1"),
    (["peft=lora", "peft.target_modules=[]"], "peft.target_modules", "[]"),
    (["peft=lora", "peft.target_modules=[q_proj,nope]"], "peft.target_modules", "nope"),
    (["nodes=0"], "nodes", "0"),
    (["nodes=2"], "nodes", "2"),
    (["nproc_per_node=0"], "nproc_per_node", "0"),
    ([*LUMI, "cluster.cpus_per_task=-1"], "cluster.cpus_per_task", "-1"),
    ([*LUMI, "cluster.cpus_per_task=8"], "cluster.cpus_per_task", "8"),
    ([*LUMI, "cluster.signal_lead_s=-1"], "cluster.signal_lead_s", "-1"),
    ([*LUMI, "cluster.signal_lead_s=7200"], "cluster.signal_lead_s", "7200"),
    ([*LUMI, "cluster.max_requeues=-1"], "cluster.max_requeues", "-1"),
    ([*LUMI, "cluster.mem_per_gpu=banana"], "cluster.mem_per_gpu", "banana"),
    ([*LEO, "cluster.mem=480 GB"], "cluster.mem", "480 GB"),
    ([*LUMI, "cluster.qos=normal"], "cluster.qos", "normal"),
    ([*LEO, "cluster.qos=fast"], "cluster.qos", "fast"),
    ([*LUMI, "cluster.time=soon"], "cluster.time", "soon"),
    ([*LUMI, "cluster.time=3-00:00:00"], "cluster.time", "3-00:00:00"),
    ([*LUMI, "cluster.partition=gpu"], "cluster.partition", "gpu"),
    ([*LUMI, "cluster.partition=small-g", "nodes=5"], "nodes", "5"),
    ([*LUMI, "cluster.account=project_1"], "cluster.account", "project_1"),
    (["+cluster=lumi"], "cluster.account", "(none)"),
    ([*LUMI, "cluster.backend=mpi"], "cluster.backend", "mpi"),
    ([*LUMI, "cluster.billing_unit=euros"], "cluster.billing_unit", "euros"),
    ([*LUMI, "cluster.gpus_per_billing_gpu=0"], "cluster.gpus_per_billing_gpu", "0"),
    ([*LUMI, "cluster.billing_mem_gb_per_gpu=0"], "cluster.billing_mem_gb_per_gpu", "0"),
    ([*LUMI, "cluster.expected_busbw_gbps=-5"], "cluster.expected_busbw_gbps", "-5"),
    ([*LUMI, "cluster.gpus_per_node_requested=9"], "cluster.gpus_per_node_requested", "9"),
    ([*LUMI, "cluster.tasks_per_node=0"], "cluster.tasks_per_node", "0"),
    ([*LUMI, "strategy=zero2", "strategy.offload_params=true"], "strategy.offload_params", "True"),
    (["strategy.offload_optimizer=true"], "strategy.offload_optimizer", "True"),
    (["strategy.precision=fp8"], "strategy.precision", "fp8"),
    # -- data and model paths (checked on the login node, reading only the first records) ----------------------------
    (["data.path={empty}"], "data.path", "empty.txt"),
    (["data.path={binary}"], "data.path", "model.bin"),
    (["data.path={emptydir}"], "data.path", "emptydir"),
    (["data.path=''"], "data.path", ""),
    (["data.path={tmp}/missing.jsonl"], "data.path", "missing.jsonl"),
    (["data.path={latin}"], "data.path", "latin1.txt"),
    (["data.path={bad_json}"], "data.path", "bad.jsonl"),
    (["data.path={no_output}", "data.format=instruction"], "data.path", "no_output.jsonl"),
    (["data.path={no_messages}"], "data.path", "chat.jsonl"),
    (["data.path={csv}"], "data.path", "labels.csv"),
    (["data.path={text}", "data.format=chat"], "data.path", "corpus.txt"),
    (["data.format=parquet"], "data.format", "parquet"),
    (["model.pretrained={model}"], "model.pretrained", "model"),
    (["model.pretrained={tmp}/nowhere"], "model.pretrained", "nowhere"),
    (["model.tokenizer={model}"], "model.tokenizer", "model"),
    ([*LUMI, "data.path={tmp}/a:b.txt"], "data.path", "a:b.txt"),
]


def _run(argv: Sequence[str], tmp: Path, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "argv", ["launcher", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _tree(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _format(overrides: Sequence[str], tmp: Path, files: Dict[str, Path]) -> List[str]:
    values = {"tmp": str(tmp), **{k: str(v) for k, v in files.items()}}
    return [o.format(**values) if "{" in o and "${" not in o and "{\\" not in o and '{"' not in o else o
            for o in overrides]


@pytest.mark.parametrize("overrides, field, value", REFUSED, ids=[" ".join(c[0])[-60:] for c in REFUSED])
def test_bad_input_gets_one_clear_line_and_exit_2(overrides, field, value, tmp_path, monkeypatch, capsys):
    files = _files(tmp_path)
    before = _tree(tmp_path)
    code, out, err = _run(_format(overrides, tmp_path, files), tmp_path, monkeypatch, capsys)
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("launcher: error: "), err
    assert field in lines[0] and value in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert TOKEN not in out + err and "hunter2" not in out + err  # a refused secret is never echoed
    assert _tree(tmp_path) == before, "a refused run wrote files"
    assert not (tmp_path / "pwned").exists()


def test_the_table_covers_every_class() -> None:
    assert len(REFUSED) >= 100
