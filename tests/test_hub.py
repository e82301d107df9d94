"""Hub ids in ``model.pretrained``/``model.tokenizer`` (issue 20): resolved offline on the login node through
huggingface_hub's own cache code, against an HF cache these tests build the way huggingface_hub writes it
(``hub/models--org--name/refs/<revision>``, ``snapshots/<commit>/<file>`` linking into ``blobs/``), and staged by
``python -m launcher.stage`` up to its download call (no network here: the Hub's API is replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import yaml

import launcher.__main__ as cli
from launcher import hub, stage
from launcher.errors import ConfigError
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, REPO, config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"
TOKEN = "hf_" + "Zz9yX8wV7uT6sR5qP4oN3mL2kJ1iH0gFeD"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def write_snapshot(home: Path, repo: str, files: Dict[str, bytes], *, commit: str = COMMIT,
                   refs: Sequence[str] = ("main",)) -> Path:
    """An HF cache entry as huggingface_hub writes it: blobs named by content hash, snapshot files as relative
    symlinks into blobs/, and refs/<revision> holding the commit. Returns the snapshot directory."""
    folder = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def sharded_files(shards: Sequence[str] = SHARDS, *, tokenizer: bool = True) -> Dict[str, bytes]:
    """config.json, a safetensors index over ``SHARDS`` and fake shard files (the login node never opens them)."""
    weight_map = {f"model.layers.{i}.weight": shard for i, shard in enumerate(SHARDS)}
    files = {"config.json": b'{"model_type": "llama"}',
             hub.INDEX: json.dumps({"metadata": {}, "weight_map": weight_map}).encode()}
    files.update({shard: f"fake {shard}".encode() for shard in shards})
    if tokenizer:
        files.update({"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    return files


def run_cli(argv: Sequence[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str, str]:
    """``python -m launcher ARGV`` in-process (the command line's own path), in ``cwd``."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["launcher", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty HF home, the default one ($HF_HOME) of runs without a profile value."""
    path = tmp_path / "hf"
    path.mkdir()
    monkeypatch.setenv("HF_HOME", str(path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


# --- resolution ------------------------------------------------------------------------------------------------


def test_dry_run_resolves_a_hub_id_of_a_saved_tiny_llama_to_its_pinned_snapshot(home, work, monkeypatch, capsys):
    """(a) A real tiny Llama and tokenizer, saved sharded as safetensors, placed in the cache, found offline."""
    transformers = pytest.importorskip("transformers")
    saved = work / "saved"
    model_config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(model_config).save_pretrained(saved, safe_serialization=True, max_shard_size="8KB")
    _tiny_tokenizer(transformers).save_pretrained(saved)
    files = {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}
    shards = json.loads(files[hub.INDEX])["weight_map"].values()
    count = len(set(shards))
    assert count > 1, "the model must be saved in several shards"
    snapshot = write_snapshot(home, "tiny-org/tiny-llama", files)

    code, out, err = run_cli(["+cluster=local_slurm", "model.pretrained=tiny-org/tiny-llama", "dry_run=true"],
                             work, monkeypatch, capsys)
    assert code == 0, err
    assert f"model       tiny from {snapshot}\n" in out
    assert (f"hub         tiny-org/tiny-llama@main -> {snapshot} (config, tokenizer, {count} of {count} shards)"
            in out)
    # The job reads the snapshot, offline, as transformers loads it there.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(snapshot, local_files_only=True)
    assert loaded.config.num_hidden_layers == 2
    assert transformers.AutoTokenizer.from_pretrained(snapshot, local_files_only=True).vocab_size > 0


def _tiny_tokenizer(transformers):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def test_the_typed_config_and_its_config_yaml_get_the_snapshot_path(home, work, monkeypatch):
    snapshot = write_snapshot(home, "org/name", sharded_files())
    monkeypatch.chdir(work)
    cfg = config(["+cluster=local_slurm", "model.pretrained=org/name"])
    assert cfg.model.pretrained == str(snapshot) and cfg.model.tokenizer is None
    assert cfg.cluster.hf_home == str(home)  # resolved on the login node: the job inherits the same $HF_HOME
    from launcher.rundir import write_config

    write_config(work / "run", cfg)
    written = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert written["model"]["pretrained"] == str(snapshot)


def test_the_profile_hf_home_is_what_the_login_node_checks_and_the_job_exports(home, work, tmp_path, monkeypatch):
    profile_home = tmp_path / "scratch-hf"
    snapshot = write_snapshot(profile_home, "org/name", sharded_files())
    monkeypatch.chdir(work)
    base = ["+cluster=lumi", LUMI_ACCOUNT, "model.pretrained=org/name", "dry_run=true"]
    with pytest.raises(ConfigError):  # not in $HF_HOME: the profile's cache is the one that counts
        config([*base, f"cluster.hf_home={home}/elsewhere"])
    cfg = config([*base, f"cluster.hf_home={profile_home}"])
    assert cfg.model.pretrained == str(snapshot)
    from launcher.plan.job import make_plan
    from launcher.slurm.render import render_script

    script = render_script(cfg, make_plan(cfg))
    assert f"export HF_HOME={profile_home}\n" in script
    assert config(["+cluster=lumi", LUMI_ACCOUNT]).cluster.hf_home == "/scratch/project_465000123/.cache/huggingface"
    assert config(["+cluster=leonardo", LEONARDO_ACCOUNT]).cluster.hf_home == (
        "/leonardo_work/EUHPC_D35_189/.cache/huggingface")


def test_a_missing_shard_is_named_with_exit_2(home, work, monkeypatch, capsys):
    """(b)"""
    write_snapshot(home, "org/name", sharded_files(shards=[SHARDS[0], SHARDS[2]]))
    code, out, err = run_cli(["+cluster=local_slurm", "model.pretrained=org/name", "dry_run=true"],
                             work, monkeypatch, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: model.pretrained=org/name: ")
    assert f"shard {SHARDS[1]} missing (2 of 3 shards" in lines[0]
    assert "Traceback" not in err and not (work / "runs").exists()


def test_a_broken_blob_link_counts_as_missing(home, work, monkeypatch):
    snapshot = write_snapshot(home, "org/name", sharded_files())
    (snapshot / SHARDS[2]).resolve().unlink()  # an interrupted download: the link is there, its blob is not
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match=SHARDS[2]):
        config(["model.pretrained=org/name"])


def test_a_revision_picks_its_ref_and_a_commit_its_snapshot(home, work, monkeypatch, capsys):
    """(c)"""
    main = write_snapshot(home, "org/name", sharded_files(), commit=COMMIT, refs=["main"])
    v1 = write_snapshot(home, "org/name", sharded_files(), commit=COMMIT_V1, refs=["v1.0", "refs/pr/3"])
    monkeypatch.chdir(work)
    assert config(["model.pretrained=org/name"]).model.pretrained == str(main)
    assert config(["model.pretrained=org/name@main"]).model.pretrained == str(main)
    assert config(["model.pretrained=org/name@v1.0"]).model.pretrained == str(v1)
    assert config(["model.pretrained=org/name@refs/pr/3"]).model.pretrained == str(v1)
    assert config([f"model.pretrained=org/name@{COMMIT_V1}"]).model.pretrained == str(v1)
    code, out, _ = run_cli(["+cluster=local_slurm", "model.pretrained=org/name@v1.0", "dry_run=true"],
                           work, monkeypatch, capsys)
    assert code == 0 and f"hub         org/name@v1.0 -> {v1} (config, tokenizer, 3 of 3 shards)" in out


def test_an_id_not_in_the_cache_fails_with_the_stage_command(home, work, monkeypatch, capsys):
    """(d)"""
    code, out, err = run_cli(["+cluster=lumi", LUMI_ACCOUNT, "model.pretrained=meta-llama/Llama-3.1-8B@main",
                              f"cluster.hf_home={home}", "dry_run=true"], work, monkeypatch, capsys)
    assert code == 2, out
    line = err.strip()
    assert line.startswith("launcher: error: model.pretrained=meta-llama/Llama-3.1-8B@main: not in the HF cache")
    assert str(home / "hub") in line and "\n" not in line
    assert ("python -m launcher.stage +cluster=lumi cluster.account=project_465000123 "
            "model.pretrained=meta-llama/Llama-3.1-8B@main") in line
    code, _, err = run_cli(["model.pretrained=org/absent"], work, monkeypatch, capsys)
    assert code == 2 and "python -m launcher.stage model.pretrained=org/absent;" in err


def test_pickled_weights_only_are_refused_with_the_reason(home, work, monkeypatch):
    write_snapshot(home, "org/old", {"config.json": b"{}", "tokenizer.json": b"{}", "pytorch_model.bin": b"pickle"})
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError) as error:
        config(["model.pretrained=org/old"])
    assert "pickled weights only (pytorch_model.bin)" in str(error.value) and "safetensors" in str(error.value)


def test_the_tokenizer_files_are_needed_only_where_the_tokenizer_comes_from(home, work, monkeypatch):
    write_snapshot(home, "org/bare", sharded_files(tokenizer=False))
    write_snapshot(home, "org/tok", {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"}, commit=COMMIT_V1)
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        config(["model.pretrained=org/bare"])
    cfg = config(["model.pretrained=org/bare", "model.tokenizer=org/tok"])
    assert cfg.model.tokenizer.endswith(f"models--org--tok/snapshots/{COMMIT_V1}")
    with pytest.raises(ConfigError, match="config.json"):  # a tokenizer repository is no model
        config(["model.pretrained=org/tok"])


def test_a_local_directory_wins_over_the_hub(home, work, monkeypatch):
    write_snapshot(home, "org/name", sharded_files())
    local = work / "org" / "name"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(work)
    assert config(["model.pretrained=org/name"]).model.pretrained == str(local)


@pytest.mark.parametrize("value, shows", [
    ("org/na..me", "na..me"), ("org--x/name", "org--x"), ("org/-name", "-name"), ("org/name@", "@"),
    ("org/name@../../etc", "etc"), ("org/name@a//b", "a//b"), ("org/name@main.lock", "lock"),
    ("org/name@-x", "-x"), ("org/na%me", "na%me"), ("org/" + "n" * 97, "nnn"),
])
def test_hostile_hub_id_shapes_are_refused_naming_the_field(home, work, monkeypatch, capsys, value, shows):
    code, out, err = run_cli([f"model.pretrained='{value}'", "dry_run=true"], work, monkeypatch, capsys)
    assert code == 2, (out, err)
    assert err.startswith("launcher: error: model.pretrained=") and shows in err and "Hub id org/name" in err


def test_an_ambiguous_value_is_refused(home, work, monkeypatch, capsys):
    (work / "models").mkdir()  # ./models exists but ./models/llama does not: a mistyped path, or a Hub id?
    code, _, err = run_cli(["model.pretrained=models/llama", "dry_run=true"], work, monkeypatch, capsys)
    assert code == 2 and "ambiguous: the directory ./models exists here" in err and "./models/llama" in err


def test_other_shapes_stay_local_paths(home, work, monkeypatch):
    for value in ("gpt2", "a/b/c", "./org/name", "/abs/org"):
        assert hub.parse("model.pretrained", value) is None, value
        monkeypatch.chdir(work)
        with pytest.raises(ConfigError, match="existing local directory"):
            config([f"model.pretrained={value}"])


def test_login_node_imports_huggingface_hub_only_for_a_hub_id(home, work):
    code = ("import sys; from launcher.config import validated; validated(sys.argv[1:]); "
            "print('huggingface_hub' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def imported(*overrides: str) -> bool:
        result = subprocess.run([sys.executable, "-c", code, *overrides], cwd=work, env=env, capture_output=True,
                                text=True, timeout=120, check=True)
        return result.stdout.strip() == "True"

    write_snapshot(home, "org/name", sharded_files())
    assert not imported("+cluster=lumi", LUMI_ACCOUNT, "model=llama-8b")
    assert imported("model.pretrained=org/name")


# --- staging ---------------------------------------------------------------------------------------------------


class FakeHub:
    """The Hub's API as the stage command calls it: the file list, and a download that writes into the cache."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, files: Dict[str, bytes], *,
                 list_error: Optional[Exception] = None) -> None:
        import huggingface_hub

        self.files, self.list_error, self.downloads = files, list_error, []
        self.offline_lookup = huggingface_hub.snapshot_download  # the real one: launcher.hub resolves through it
        self.listed: List[tuple] = []
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # whatever the shell exports

    def list_repo_files(self, repo_id, revision=None, **kwargs):  # set on the class: no HfApi self
        self.listed.append((repo_id, revision, kwargs))
        if self.list_error is not None:
            raise self.list_error
        return list(self.files)

    def snapshot_download(self, repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return self.offline_lookup(repo_id, **kwargs)
        self.downloads.append((repo_id, kwargs))
        home = Path(kwargs["cache_dir"]).parent
        from fnmatch import fnmatch

        wanted = {n: c for n, c in self.files.items() if any(fnmatch(n, p) for p in kwargs["allow_patterns"])}
        return str(write_snapshot(home, repo_id, wanted, commit=COMMIT_V1, refs=[kwargs["revision"]]))


def run_stage(argv: Sequence[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    code = stage.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stage_downloads_what_the_run_reads_into_the_profile_cache(home, work, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    files = {**sharded_files(), "consolidated.safetensors": b"x", "pytorch_model.bin": b"x", "README.md": b"x"}
    fake = FakeHub(monkeypatch, files)
    profile_home = tmp_path / "scratch-hf"
    argv = ["+cluster=lumi", LUMI_ACCOUNT, f"cluster.hf_home={profile_home}", "model.pretrained=org/name@v1.0"]
    code, out, err = run_stage(argv, work, monkeypatch, capsys)
    assert code == 0, err
    (repo_id, kwargs), = fake.downloads
    assert repo_id == "org/name" and kwargs["revision"] == "v1.0"
    assert kwargs["cache_dir"] == str(profile_home / "hub")
    assert kwargs["allow_patterns"] == hub.allow_patterns(model=True, tokenizer=True)
    assert "token" not in kwargs and "token" not in fake.listed[0][2]  # huggingface_hub reads HF_TOKEN itself
    snapshot = profile_home / "hub" / "models--org--name" / "snapshots" / COMMIT_V1
    assert f"staged: org/name@v1.0 -> {snapshot} (config, tokenizer, 3 of 3 shards)" in out
    assert not (snapshot / "consolidated.safetensors").exists() and not (snapshot / "pytorch_model.bin").exists()
    assert "HF_TOKEN from the environment" in err
    assert TOKEN not in out + err + caplog.text
    assert not any(TOKEN in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    # What was staged is what the dry run now resolves.
    assert config([*argv, "dry_run=true"]).model.pretrained == str(snapshot)
    code, out, _ = run_stage(argv, work, monkeypatch, capsys)
    assert code == 0 and "staged already" in out and len(fake.downloads) == 1


def test_stage_refuses_a_repository_with_pickled_weights_only_before_downloading(home, work, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, {"config.json": b"{}", "tokenizer.json": b"{}", "pytorch_model.bin": b"x"})
    code, _, err = run_stage(["model.pretrained=org/old"], work, monkeypatch, capsys)
    assert code == 2 and "pickled weights only (pytorch_model.bin)" in err and not fake.downloads


def test_stage_of_a_gated_model_says_how_to_log_in_without_showing_the_token(home, work, monkeypatch, capsys):
    from huggingface_hub import errors

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    gated = errors.GatedRepoError.__new__(errors.GatedRepoError)
    Exception.__init__(gated, "403 Client Error: access to model meta-llama/Llama-3.1-8B is restricted")
    fake = FakeHub(monkeypatch, {}, list_error=gated)
    code, out, err = run_stage(["model.pretrained=meta-llama/Llama-3.1-8B"], work, monkeypatch, capsys)
    assert code == 2 and not fake.downloads
    assert "gated repository" in err and "hf auth login" in err and "huggingface.co/meta-llama/Llama-3.1-8B" in err
    assert TOKEN not in out + err


def test_stage_on_leonardo_prints_the_serial_job_unless_here(home, work, tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, sharded_files())
    profile_home = tmp_path / "work-hf"
    argv = ["+cluster=leonardo", LEONARDO_ACCOUNT, f"cluster.hf_home={profile_home}", "model.pretrained=org/name"]
    code, out, _ = run_stage(argv, work, monkeypatch, capsys)
    assert code == 0 and not fake.downloads
    assert "srun -A EUHPC_D35_189 -p lrd_all_serial --time=04:00:00" in out
    assert "-m launcher.stage +cluster=leonardo cluster.account=EUHPC_D35_189" in out
    assert "model.pretrained=org/name" in out
    code, out, _ = run_stage([*argv, "--here"], work, monkeypatch, capsys)
    assert code == 0 and len(fake.downloads) == 1 and fake.downloads[0][1]["cache_dir"] == str(profile_home / "hub")


def test_stage_refuses_to_download_in_offline_mode(home, work, monkeypatch, capsys):
    import huggingface_hub

    fake = FakeHub(monkeypatch, sharded_files())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_stage(["model.pretrained=org/name"], work, monkeypatch, capsys)
    assert code == 2 and "unset HF_HUB_OFFLINE" in err and not fake.downloads


def test_stage_needs_a_hub_id(home, work, monkeypatch, capsys):
    code, _, err = run_stage(["model=llama-8b"], work, monkeypatch, capsys)
    assert code == 2 and err.startswith("launcher: error: model.pretrained=(none): no Hub id to stage")


def test_stage_runs_as_a_module(home, work):
    result = subprocess.run([sys.executable, "-m", "launcher.stage", "--help"], cwd=work, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and "cluster.hf_home" in result.stdout
