"""Bad input to the tools beside the launcher: ``python -m launcher.status`` (list, logs, cancel), ``python -m
launcher.scaling report`` and ``python -m launcher.container build|check`` (issue 13).

One table of cases, each run as a subprocess in its own tmp tree (cwd, HOME and TMPDIR inside it, no Slurm on the
PATH, matplotlib hidden so that a report costs no plotting). Every case asserts:

- the exit code: 2 for a user error (one ``launcher: error: <field>=<value>: ...`` line on stderr), else what the tool
  gives for a directory with corrupt runs (0: the table or report still comes, the bad run shown with its file);
- that the output names the field or file and the value (``says``) and lists the good runs (``lists``);
- no traceback, and no terminal control character in what is printed;
- no file written outside the directories the tool may write (status: none; scaling: the report directory), and
  no internal-error log in TMPDIR;
- no marker file made by an injected command; for ``container build`` the printed commands are also run under bash
  with stub runtimes, and nothing injected runs.

Kinds: ``error`` a clear error for a bad argument or config, ``safe`` a corrupt file handled (shown, skipped, said),
``refused`` a hostile value (path escape, FIFO, shell or terminal injection) refused or neutralised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PWN = "{tmp}/pwned"
FIFO, DIR = "<fifo>", "<dir>"


@dataclass(frozen=True)
class Link:
    target: str


@dataclass
class Case:
    id: str
    cli: str  # status | scaling | container
    args: Tuple[str, ...]
    files: Dict[str, object] = field(default_factory=dict)  # path under tmp -> bytes | str | FIFO | DIR | Link
    rc: int = 2
    says: Tuple[str, ...] = ()
    kind: str = "error"
    lists: Tuple[str, ...] = ()
    writes: Tuple[str, ...] = ()  # paths under tmp the tool may write into
    shell: bool = False  # run the printed commands under bash


# -- run directories --------------------------------------------------------------------------------------------------

CONFIG = "run_name: r\ncluster:\n  name: lumi\n  partition: standard-g\ntrain:\n  max_steps: 30\n"
METRICS = "".join(json.dumps({"step": s, "loss": 2.5, "tokens_per_s": 1000.0 + s, "step_time_s": 0.5,
                              "elapsed_s": 2.0 * s}) + "\n" for s in range(1, 31))
GOOD = {"runs/good/config.yaml": CONFIG, "runs/good/metrics.jsonl": METRICS, "runs/good/export": DIR}
LOG = "launcher: job 5 attempt 1 on n1\nstep 1\n"
WITH_JOB = {**GOOD, "runs/good/slurm/5_submitted.pkl": b"", "runs/good/slurm/5_0_log.out": LOG}


def line(**record) -> str:
    return json.dumps(record) + "\n"


def st(id, files, says, *, kind="safe", name="bad", base=None):
    """A listing of runs/ holding the good run and run ``name`` with ``files`` (beside a good config and metrics)."""
    bad = {f"runs/{name}/config.yaml": CONFIG, f"runs/{name}/metrics.jsonl": METRICS[:200].rsplit("\n", 1)[0] + "\n"}
    bad.update({f"runs/{name}/{k}": v for k, v in files.items()})
    return Case(id, "status", ("{tmp}/runs",), {**(base or GOOD), **bad}, 0, says, kind, ("good",))


def logs(id, args, files=(), says=(), rc=2, kind="refused"):
    return Case(id, "status", ("logs", "{tmp}/runs/good", *args), {**WITH_JOB, **dict(files)}, rc, says, kind)


POINT = "@point"  # the config.yaml of a scaling point (composed once, see point_config)
POINT_FILES = {"config.yaml": POINT, "metrics.jsonl": METRICS, "export": DIR}
SWEEP = {f"runs/good/{k}": v for k, v in POINT_FILES.items()}
REPORT = ("report", "{tmp}/runs", "--warmup-steps", "5")


def sc(id, files, says, *, name="bad", kind="safe", args=REPORT, rc=0):
    """A report over runs/ holding the good point and point ``name`` with ``files`` (beside a good config)."""
    bad = {f"runs/{name}/{k}": v for k, v in {**POINT_FILES, **files}.items()}
    return Case(id, "scaling", args, {**SWEEP, **bad}, rc, says, kind, ("| ok |",), ("runs/scaling",))


def sca(id, args, says, files=None, kind="error"):
    return Case(id, "scaling", args, SWEEP if files is None else files, 2, says, kind)


BUILD = ("build", "+cluster=lumi", "cluster.account=project_465000123")
ANY_ACCOUNT = "cluster.account_pattern=.+"


def cb(id, args, says, *, rc=2, kind="error", shell=False):
    return Case(id, "container", args, {}, rc, says, kind, shell=shell)


# -- the table --------------------------------------------------------------------------------------------------------

CASES = [
    # status: one corrupt run among good ones
    st("metrics-nan-step", {"metrics.jsonl": '{"step": NaN, "loss": 2.0}\n'}, ("bad", "step=nan")),
    st("metrics-inf-elapsed", {"metrics.jsonl": '{"step": 3, "loss": 2, "elapsed_s": Infinity}\n'}, ("elapsed_s=inf",)),
    st("metrics-string-loss", {"metrics.jsonl": line(step=3, loss="abc")}, ("metrics.jsonl", "loss=abc")),
    st("metrics-list-step", {"metrics.jsonl": line(step=[1], loss=2.0)}, ("step=[1]",)),
    st("metrics-bool-step", {"metrics.jsonl": line(step=True, loss=2.0)}, ("step=True",)),
    st("metrics-huge-int", {"metrics.jsonl": '{"step": 1' + "0" * 400 + ', "loss": 2}\n'}, ("metrics.jsonl", "step=")),
    st("metrics-binary", {"metrics.jsonl": bytes(range(256)) * 4 + b"\n"}, ("metrics.jsonl", "not JSON objects")),
    st("metrics-cut-last-line", {"metrics.jsonl": METRICS + '{"step": 31, "lo'}, ("metrics.jsonl", "last line is cut")),
    st("metrics-fifo", {"metrics.jsonl": FIFO}, ("metrics.jsonl", "a FIFO")),
    st("metrics-directory", {"metrics.jsonl": DIR}, ("metrics.jsonl", "a directory")),
    st("metrics-empty", {"metrics.jsonl": ""}, ("bad",)),
    st("metrics-array-lines", {"metrics.jsonl": "[1, 2]\n7\n"}, ("2 line(s) that are not JSON objects",)),
    st("metrics-deep-nesting", {"metrics.jsonl": METRICS + "[" * 100000 + "\n"},
       ("metrics.jsonl", "no readable record")),
    st("config-binary", {"config.yaml": bytes(range(128, 256))}, ("config.yaml", "not UTF-8")),
    st("config-not-yaml", {"config.yaml": "train: [max_steps: 1\n"}, ("config.yaml", "ParserError")),
    st("config-a-list", {"config.yaml": "- 1\n- 2\n"}, ("config.yaml", "not a mapping")),
    st("config-cluster-name-list", {"config.yaml": "cluster:\n  name: [1, 2]\n"}, ("cluster.name=[1, 2]",)),
    st("config-max-steps-string", {"config.yaml": "train:\n  max_steps: lots\n"}, ("train.max_steps=lots",)),
    st("config-train-number", {"config.yaml": "train: 5\n"}, ("train=5",)),
    st("config-fifo", {"config.yaml": FIFO}, ("config.yaml", "a FIFO")),
    st("config-too-large", {"config.yaml": "x: " + "a" * (5 << 20) + "\n"}, ("config.yaml", "bytes, more than")),
    st("config-deep-nesting", {"config.yaml": "[" * 100000}, ("config.yaml",)),
    st("config-ansi-cluster", {"config.yaml": 'cluster:\n  name: "\\e[31mred\\e]0;title\\a"\n'}, ("red",),
       kind="refused"),
    st("name-ansi", {}, ("red",), name="\x1b[31mred\x1b[0m", kind="refused"),
    st("name-command", {}, ("pwned",), name="$(touch pwned);`touch pwned`", kind="refused"),
    st("name-newline-bidi", {}, ("ab",), name="a\nb\u202e", kind="refused"),
    st("attempts-fifo", {"logs/attempts.log": FIFO}, ("attempts.log", "a FIFO")),
    st("attempts-binary", {"logs/attempts.log": bytes(range(256)) * 8}, ("bad",)),
    st("attempts-odd-job-ids", {"logs/attempts.log": "launcher: job \u0661\u0662 attempt 1 started x\n"
                                "launcher: job 5\x1b[2J attempt 1 started x\n"}, ("bad",), kind="refused"),
    st("slurm-is-a-file", {"slurm": "not a directory"}, ("bad",)),
    st("checkpoints-is-a-file", {"checkpoints": "x"}, ("bad",)),
    Case("dir-missing", "status", ("{tmp}/nope",), {}, 2, ("DIR={tmp}/nope", "not a directory")),
    Case("dir-is-a-file", "status", ("{tmp}/f",), {"f": "x"}, 2, ("DIR={tmp}/f",)),
    Case("json-corrupt-run", "status", ("{tmp}/runs", "--json"), {**GOOD, "runs/bad/metrics.jsonl": "NaN\n",
         "runs/\x1b[1mx/config.yaml": CONFIG}, 0, ('"problems"', "not JSON objects", "\\u001b"), "safe", ("good",)),
    Case("list-unknown-option", "status", ("--bogus",), {}, 2, ("arguments=--bogus",)),
    # status logs
    Case("logs-not-a-run", "status", ("logs", "{tmp}"), {}, 2, ("RUN_DIR={tmp}", "not a run directory")),
    logs("logs-job-dotdot", ("--job", "../../x"), says=("--job=../../x", "not a Slurm job id")),
    logs("logs-job-command", ("--job", "$(touch {tmp}/pwned)"), says=("--job=$(touch",)),
    logs("logs-job-newline", ("--job", "5\n"), says=("--job='5\\n'",)),
    logs("logs-job-other-run", ("--job", "6"), says=("--job=6", "not a job of run good")),
    logs("logs-task-negative", ("--task", "-1"), says=("--task=-1",), kind="error"),
    logs("logs-task-not-int", ("--task", "x"), says=("--task=x", "not a valid integer"), kind="error"),
    logs("logs-symlink-out", ("--task", "1"), {"runs/good/slurm/5_1_log.out": Link("{tmp}/secret"),
                                               "secret": "secret\n"}, ("leads outside the run directory",)),
    Case("logs-slurm-dir-symlink-out", "status", ("logs", "{tmp}/runs/good"), {**GOOD, "elsewhere/5_0_log.out": LOG,
         "elsewhere/5_submitted.pkl": b"", "runs/good/slurm": Link("{tmp}/elsewhere")}, 2, ("log=", "leads outside"),
         "refused"),
    logs("logs-fifo", ("--task", "2"), {"runs/good/slurm/5_2_log.out": FIFO}, ("5_2_log.out", "a FIFO")),
    logs("logs-fifo-follow", ("--task", "2", "--follow"), {"runs/good/slurm/5_2_log.out": FIFO}, ("a FIFO",)),
    logs("logs-directory", ("--task", "3"), {"runs/good/slurm/5_3_log.out": DIR}, ("5_3_log.out", "a directory")),
    logs("logs-ansi", ("--all",), {"runs/good/slurm/5_0_log.out": "a\x1b]0;t\x07b\x1b[2Jc\x9b1md\x00e\r\n"},
         ("abcde",), rc=0),
    logs("logs-binary", ("--all",), {"runs/good/slurm/5_0_log.out": bytes(range(256))}, ("0123",), rc=0, kind="safe"),
    Case("cancel-job-dotdot", "status", ("cancel", "{tmp}/runs/good", "--job", "../x"), WITH_JOB, 2, ("--job=../x",),
         "refused"),
    Case("cancel-job-command", "status", ("cancel", "{tmp}/runs/good", "--job", "`touch {tmp}/pwned`"), WITH_JOB, 2,
         ("--job=`touch",), "refused"),
    Case("cancel-not-a-run", "status", ("cancel", "{tmp}/nope"), {}, 2, ("RUN_DIR={tmp}/nope",)),
    # scaling report: bad arguments
    sca("sweep-missing", ("report", "{tmp}/nope"), ("SWEEP_DIR={tmp}/nope", "does not exist")),
    sca("sweep-is-a-file", ("report", "{tmp}/f"), ("SWEEP_DIR={tmp}/f", "not a directory"), {"f": "x"}),
    sca("tokens-nan", (*REPORT, "--tokens", "nan"), ("--tokens=nan", "not a finite number")),
    sca("tokens-negative", (*REPORT, "--tokens", "-5"), ("--tokens=-5", "positive")),
    sca("tokens-text", (*REPORT, "--tokens", "lots"), ("--tokens=lots",)),
    sca("overhead-inf", (*REPORT, "--overhead", "inf"), ("--overhead=inf",)),
    sca("warmup-negative", ("report", "{tmp}/runs", "--warmup-steps", "-1"), ("--warmup-steps=-1",)),
    sca("warmup-text", ("report", "{tmp}/runs", "--warmup-steps", "x"), ("--warmup-steps=x",)),
    sca("mode-unknown", (*REPORT, "--mode", "sideways"), ("--mode=sideways", "auto")),
    sca("out-is-a-file", (*REPORT, "--out", "{tmp}/f"), ("--out={tmp}/f",), {**SWEEP, "f": "x"}),
    sca("out-symlink-out", REPORT, ("SWEEP_DIR/scaling=", "leads outside"), {**SWEEP, "runs/scaling": Link("{tmp}/o"),
                                                                          "o": DIR}, kind="refused"),
    sca("no-subcommand", (), ("command=",)),
    # scaling report: one corrupt point among good ones
    sc("point-nan-step", {"metrics.jsonl": METRICS + '{"step": NaN, "tokens_per_s": 5}\n'}, ("bad", "step=nan")),
    sc("point-inf-rate", {"metrics.jsonl": METRICS + line(step=31, tokens_per_s=float("inf"))}, ("tokens_per_s=inf",)),
    sc("point-string-rate", {"metrics.jsonl": METRICS + line(step=31, tokens_per_s="fast")}, ("tokens_per_s=fast",)),
    sc("point-list-step", {"metrics.jsonl": line(step=[1], tokens_per_s=5)}, ("step=[1]", "**failed** (bad)")),
    sc("point-huge-values", {"metrics.jsonl": line(step=40, tokens_per_s=1e308)}, ("tokens_per_s=1e+308",)),
    sc("point-binary-metrics", {"metrics.jsonl": bytes(range(256)) * 8}, ("metrics.jsonl", "not JSON objects")),
    sc("point-cut-last-line", {"metrics.jsonl": METRICS + '{"step": 31, "to'}, ("last line is cut",)),
    sc("point-metrics-fifo", {"metrics.jsonl": FIFO}, ("metrics.jsonl unreadable: a FIFO",)),
    sc("point-config-binary", {"config.yaml": bytes(range(128, 256))}, ("config.yaml unreadable: not UTF-8",)),
    sc("point-config-wrong-type", {"config.yaml": "train:\n  max_steps: thirty\n"}, ("train.max_steps",)),
    sc("point-config-fifo", {"config.yaml": FIFO}, ("config.yaml unreadable: a FIFO",)),
    sc("point-config-list", {"config.yaml": "[1, 2]\n"}, ("config.yaml unreadable: not a mapping",)),
    sc("point-fingerprint-types", {"environment.json": '{"git_commit": [1], "world_size": "8", "torch": 5}'},
       ("environment.json", "git_commit")),
    sc("point-fingerprint-binary", {"environment.json": b"\xff\xfe\x00"}, ("environment.json", "not UTF-8")),
    sc("point-fingerprint-fifo", {"environment.json": FIFO}, ("environment.json", "a FIFO")),
    sc("point-log-fifo", {"metrics.jsonl": "", "slurm/7_submitted.pkl": b"", "slurm/7_0_log.out": FIFO},
       ("**failed** (bad)",)),
    sc("point-attempts-fifo", {"logs/attempts.log": FIFO}, ("bad",)),
    sc("point-log-ansi", {"metrics.jsonl": "",
                          "slurm/7_0_log.out": "\x1b[31mRuntimeError: CUDA out of memory\x1b[0m\n"},
       ("out of memory: RuntimeError: CUDA out of memory",), kind="refused"),
    sc("point-name-ansi-command", {}, ("2 of 2 points measured",), name="\x1b[31m$(touch pwned)", kind="refused"),
    Case("report-over-symlink-and-fifo", "scaling", REPORT, {**SWEEP, "runs/scaling/scaling.md": Link("{tmp}/victim"),
         "victim": "keep\n", "runs/scaling/scaling.csv.tmp": FIFO}, 0, ("| ok |",), "refused", (), ("runs/scaling",)),
    # container build / check
    cb("cluster-unknown", ("build", "+cluster=nope"), ("cluster=nope", "lumi")),
    cb("cluster-path", ("build", "+cluster=../x"), ("cluster=../x",)),
    cb("cluster-none", ("build",), ("+cluster=(none)",)),
    cb("cluster-without-recipe", ("build", "+cluster=local_slurm"), ("+cluster=local_slurm", "leonardo, lumi")),
    cb("override-syntax", (*BUILD, "cluster.account=x;y"), ("cluster.account=x;y", "override syntax")),
    cb("override-unknown-key", (*BUILD, "cluster.nodez=1"), ("cluster.nodez=1",)),
    cb("override-wrong-type", (*BUILD, "cluster.container.binds=abc"), ("cluster.container.binds=abc",)),
    cb("interpolation-env", (*BUILD[:2], "cluster.account=${oc.env:NOPE_X}"), ("cluster.account=${oc.env:NOPE_X}",)),
    cb("interpolation-missing", (*BUILD[:2], "cluster.account=${nope}"), ("cluster.account=${nope}",)),
    cb("account-pattern", (*BUILD[:2], "cluster.account='x;>{tmp}/pwned'"), ("cluster.account=x;>",), kind="refused"),
    cb("account-semicolon-quoted", (*BUILD[:2], ANY_ACCOUNT, "cluster.account='x;>{tmp}/pwned'",
                                    "output={tmp}/o/l.sif"),
       ('SINGULARITY_TMPDIR="/scratch/x;>',), rc=0, kind="refused", shell=True),
    cb("account-command-quoted", (*BUILD[:2], ANY_ACCOUNT, "cluster.account='$(touch {tmp}/pwned)'",
                                  "output={tmp}/o/l.sif"), ("\"/scratch/\"'$(touch",), rc=0, kind="refused",
       shell=True),
    cb("account-backticks-srun", ("build", "+cluster=leonardo", ANY_ACCOUNT, "cluster.account='x`>{tmp}/pwned`'",
                                  "output={tmp}/o/l.sif"), ("srun -A 'x`>",), rc=0, kind="refused", shell=True),
    cb("output-command", (*BUILD, "output={tmp}/o/$(>{tmp}/pwned).sif"), ("'{tmp}/o/$(>",), rc=0, kind="refused",
       shell=True),
    cb("output-white-space", (*BUILD, "output={tmp}/a b.sif"), ("output={tmp}/a b.sif", "white space")),
    cb("output-option", (*BUILD, "output=-rf"), ("output=-rf", "option")),
    cb("build-arg-command", (*BUILD, "--build-arg", "BASE_IMAGE=$(touch {tmp}/pwned)"), ("--build-arg BASE_IMAGE=",),
       kind="refused"),
    cb("build-arg-unknown", (*BUILD, "--build-arg", "NOPE=1"), ("--build-arg=NOPE", "BASE_IMAGE")),
    cb("build-arg-no-value", (*BUILD, "--build-arg", "BASE_IMAGE"), ("--build-arg=BASE_IMAGE", "NAME=VALUE")),
    cb("runtime-command", (*BUILD, "cluster.container.runtime='x;>{tmp}/pwned'"), ("cluster.container.runtime=x;>",),
       kind="refused"),
    cb("unknown-command", ("frobnicate",), ("COMMAND=frobnicate",)),
    cb("unknown-option", ("build", "--bogus"), ("arguments=--bogus",)),
    cb("check-odd-extra", ("check", "--extra", "$(touch {tmp}/pwned)"), ("installed packages",), rc=0, kind="refused"),
]


# -- running a case ---------------------------------------------------------------------------------------------------

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
STUBS = ("singularity", "apptainer", "srun", "module", "mkdir", "sacct", "squeue", "scontrol", "scancel")


@pytest.fixture(scope="module")
def point_config() -> str:
    """A scaling point's config.yaml: composed and typed as the launcher writes it."""
    from omegaconf import OmegaConf

    from launcher.config import compose

    cfg = compose(["+cluster=lumi", "cluster.account=project_465000123", "model=tiny", "train.max_steps=30"])
    return OmegaConf.to_yaml(cfg, resolve=True)


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> Path:
    """A PYTHONPATH entry hiding matplotlib (reports skip the plots), and stub commands that do nothing."""
    root = tmp_path_factory.mktemp("tools")
    (root / "hide" / "matplotlib").mkdir(parents=True)
    (root / "hide" / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    (root / "bin").mkdir()
    for name in STUBS:
        (root / "bin" / name).write_text("#!/bin/sh\nexit 0\n")
        (root / "bin" / name).chmod(0o755)
    return root


def make(tmp: Path, files: Dict[str, object], point: str) -> None:
    for name, content in files.items():
        path = tmp / name.replace("{tmp}", str(tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is FIFO:
            os.mkfifo(path)
        elif content is DIR:
            path.mkdir(exist_ok=True)
        elif isinstance(content, Link):
            path.symlink_to(content.target.replace("{tmp}", str(tmp)))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(point if content == POINT else str(content).replace("{tmp}", str(tmp)))


def snapshot(tmp: Path, skip: Tuple[Path, ...]) -> Dict[str, tuple]:
    """Every path under tmp (not followed through links) with its type, size and mtime; ``skip`` subtrees left out."""
    seen = {}
    for top, dirs, names in os.walk(tmp):
        dirs[:] = [d for d in dirs if Path(top, d) not in skip]
        for name in dirs + names:
            st = os.lstat(Path(top, name))  # a directory's own times change when an allowed child is made
            kept = (st.st_mode,) if os.path.isdir(Path(top, name)) else (st.st_mode, st.st_size, st.st_mtime_ns)
            seen[str(Path(top, name).relative_to(tmp))] = kept
    return seen


def run_printed(tmp: Path, tools: Path, stdout: str, stderr: str) -> subprocess.CompletedProcess:
    """The commands a build printed (stdout, and the srun example on stderr), run by bash with stub runtimes."""
    lines = [ln for ln in stdout.splitlines() if ln and not ln.startswith("#")]
    lines += [ln.strip() for ln in stderr.splitlines() if ln.startswith("  srun ")]
    env = {"PATH": f"{tools / 'bin'}:/usr/bin:/bin", "HOME": str(tmp / "home"), "USER": "u",
           "CINECA_SCRATCH": str(tmp / "scratch")}
    return subprocess.run(["bash", "-c", "\n".join(lines)], cwd=tmp / "cwd", env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tools: Path, point_config: str) -> None:
    tmp = tmp_path
    for name in ("cwd", "home", "tmpdir", "empty-bin"):
        (tmp / name).mkdir()
    make(tmp, case.files, point_config)
    skip = tuple(tmp / w for w in case.writes)
    before = snapshot(tmp, skip)
    module = {"status": "launcher.status", "scaling": "launcher.scaling", "container": "launcher.container"}[case.cli]
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    env = {"PATH": str(tmp / "empty-bin"), "HOME": str(tmp / "home"), "TMPDIR": str(tmp / "tmpdir"),
           "PYTHONPATH": f"{tools / 'hide'}{os.pathsep}{REPO}", "LANG": "C.UTF-8", "USER": "u"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp / "cwd", env=env, capture_output=True,
                          text=True, errors="replace", timeout=30)
    out = done.stdout + done.stderr
    assert done.returncode == case.rc, out
    assert "Traceback" not in out
    for needle in case.says:
        assert needle.replace("{tmp}", str(tmp)) in out, out
    for name in case.lists:
        assert name in done.stdout, out
    if case.rc == 2:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("launcher: error: "), done.stderr
    assert not CONTROL.search(out), repr(out)
    assert snapshot(tmp, skip) == before, "files written outside the run directories"
    assert not list((tmp / "tmpdir").iterdir()), "an internal error was logged"
    if case.shell:
        ran = run_printed(tmp, tools, done.stdout, done.stderr)
        assert ran.returncode == 0, ran.stderr
    assert not list(tmp.rglob("pwned")), "an injected command ran"


def test_the_table() -> None:
    """At least 60 cases, every tool and every kind covered; the counts go into the closing note of issue 13."""
    counts: Dict[Tuple[str, str], int] = {}
    for case in CASES:
        counts[case.cli, case.kind] = counts.get((case.cli, case.kind), 0) + 1
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {cli for cli, _ in counts} == {"status", "scaling", "container"}
    assert {kind for _, kind in counts} == {"error", "safe", "refused"}


# -- the shared error path (launcher.cli_errors) ----------------------------------------------------------------------


def test_one_line_for_user_errors_and_a_file_for_bugs(tmp_path, monkeypatch, capsys) -> None:
    import tempfile

    from launcher.cli_errors import EXIT_INTERNAL, EXIT_USER, error_line, run_cli
    from launcher.errors import ConfigError, UserError

    assert error_line("RUN_DIR", "/x\x1b[2J", "not a run directory", "a directory with config.yaml") == (
        "launcher: error: RUN_DIR='/x\\x1b[2J': not a run directory; a directory with config.yaml")

    def raises(error):
        def main(argv):
            raise error
        return main

    assert run_cli(raises(UserError("--job", "../x", "not a job id", "digits"))) == EXIT_USER
    assert run_cli(raises(ConfigError("train.lr", float("nan"), "a finite number > 0", "got NaN")), []) == EXIT_USER
    err = capsys.readouterr().err.splitlines()
    assert err == ["launcher: error: --job=../x: not a job id; digits",
                   "launcher: error: train.lr=nan: got NaN; allowed: a finite number > 0"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run_cli(raises(KeyError("boom")), ["a"]) == EXIT_INTERNAL
    (line,) = capsys.readouterr().err.splitlines()
    (log,) = tmp_path.glob("launcher-internal-error-*.log")
    assert line.startswith("launcher: internal error") and str(log) in line and "Traceback" not in line
    assert "KeyError: 'boom'" in log.read_text() and "argv: ['a']" in log.read_text()


def test_cli_errors_stays_light() -> None:
    code = ("import sys, launcher.cli_errors; heavy = {'hydra', 'omegaconf', 'torch', 'yaml'} & set(sys.modules); "
            "print(sorted(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "[]", done.stderr
