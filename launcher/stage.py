"""``python -m launcher.stage [+cluster=NAME] [key=value ...] [--here]``: download the Hub ids of ``model.pretrained``
and ``model.tokenizer`` into the HF cache the run resolves them in (the profile's ``cluster.hf_home``; without one,
``$HF_HOME`` or ``~/.cache/huggingface``), on the login node (docs/models.md).

The overrides are those of the run: the config is composed the same way, so the files land where the dry run and the
job look. Only what the run reads is fetched: ``config.json``, the tokenizer files when the tokenizer comes from the
repository, and safetensors weights (the repository's file list is checked first: pickled ``.bin`` weights only is
refused). A gated model needs a token: ``HF_TOKEN`` in the environment, or ``hf auth login`` on the login node;
huggingface_hub reads it, this command never writes or prints it.

On Leonardo, whose login nodes end a process after 10 minutes of CPU time, the download runs as a ``lrd_all_serial``
job (it has internet): the command prints the ``srun`` line to run, unless inside a job or given ``--here``.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from launcher import hub
from launcher.cli_errors import ArgumentParser, run_cli
from launcher.errors import ConfigError, UserError

# Machines whose login node must not run a long download: the Slurm job to run it in (shared/reference/clusters.md).
STAGE_JOBS: Dict[str, str] = {
    "leonardo": "srun -A {account} -p lrd_all_serial --time=04:00:00 --cpus-per-task=4 --mem=30000M {command}",
}


@dataclass(frozen=True)
class Target:
    """One Hub id to stage and the files the run reads from it."""

    field: str
    hub_id: hub.HubId
    model: bool
    tokenizer: bool

    @property
    def patterns(self) -> List[str]:
        return hub.allow_patterns(model=self.model, tokenizer=self.tokenizer)


def targets(cfg: Mapping[str, Any]) -> List[Target]:
    """The Hub ids of the model section, with what the run reads of each (as ``check_inputs`` checks them)."""
    model = cfg["model"]
    found = []
    for key in ("pretrained", "tokenizer"):
        value = model[key]
        hub_id = hub.parse(f"model.{key}", value) if value is not None else None
        if hub_id is not None:
            pretrained = key == "pretrained"
            found.append(Target(f"model.{key}", hub_id, model=pretrained,
                                tokenizer=not pretrained or model["tokenizer"] is None))
    if not found:
        raise UserError("model.pretrained", model["pretrained"], "no Hub id to stage (a local path, or none)",
                        "model.pretrained=org/name[@revision] and/or model.tokenizer=org/name[@revision]")
    return found


def check_repo_files(target: Target, files: Sequence[str]) -> None:
    """The repository's own file list holds what the run reads, as safetensors (UserError naming what lacks)."""
    names = set(files)
    field, value = target.field, target.hub_id.text
    if target.model and "config.json" not in names:
        raise UserError(field, value, "the repository has no config.json", "a transformers model repository")
    if target.model and not ({"model.safetensors", hub.INDEX} & names):
        pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        why = (f"the repository has pickled weights only ({', '.join(pickled[:3])}); the launcher loads safetensors "
               "only, since loading a pickle can run code" if pickled else "the repository has no safetensors weights")
        raise UserError(field, value, why, "a revision with model.safetensors or model.safetensors.index.json "
                                           "(the Hub's conversion PRs: @refs/pr/N)")
    tokenizer_files = bool({"tokenizer.json", "tokenizer.model"} & names) or {"vocab.json", "merges.txt"} <= names
    if target.tokenizer and not tokenizer_files:
        raise UserError(field, value, "the repository has no tokenizer files",
                        "model.tokenizer=<a Hub id or directory with tokenizer.json>")


def token_source() -> str:
    """Where huggingface_hub takes a token from: said, never shown."""
    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN from the environment"
    return "the login of `hf auth login`" if get_token() else "none (public repositories only)"


def download(target: Target, home: Path, *, stage: str) -> hub.Snapshot:
    """Check the repository's file list, download what the run reads into ``home``'s cache, and check the snapshot."""
    from huggingface_hub import HfApi, snapshot_download

    hub_id = target.hub_id
    try:
        check_repo_files(target, HfApi().list_repo_files(hub_id.repo_id, revision=hub_id.revision))
        snapshot_download(hub_id.repo_id, revision=hub_id.revision, cache_dir=str(hub.hub_cache(home)),
                          allow_patterns=target.patterns)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - the Hub's answers become one line naming the id
        raise _hub_error(target, error) from None
    return hub.resolve(target.field, hub_id, home, model=target.model, tokenizer=target.tokenizer, stage=stage)


def _hub_error(target: Target, error: Exception) -> Exception:
    """A UserError for what the Hub answered (gated, missing repository or revision, no network), else ``error``."""
    from huggingface_hub import errors

    field, value, repo = target.field, target.hub_id.text, target.hub_id.repo_id
    if isinstance(error, errors.GatedRepoError):
        return UserError(field, value, "a gated repository: this account may not download it yet",
                         f"accept its terms on https://huggingface.co/{repo}, then export HF_TOKEN or run "
                         "`hf auth login` in this shell (never put the token into a config)")
    if isinstance(error, errors.RevisionNotFoundError):
        return UserError(field, value, f"the repository has no revision {target.hub_id.revision}",
                         "a branch, a tag or a commit of it")
    if isinstance(error, errors.RepositoryNotFoundError):
        return UserError(field, value, "no such repository on the Hub, or a private one this token cannot read",
                         "org/name as the Hub spells it; a token (HF_TOKEN or `hf auth login`) for a private one")
    if isinstance(error, (OSError, errors.HfHubHTTPError)) or _network_error(error):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return UserError(field, value, f"the download failed: {type(error).__name__}: {first}",
                         "a login node with internet; run the same command again to resume")
    return error


def _network_error(error: Exception) -> bool:
    """An error of the HTTP client huggingface_hub uses (httpx, or requests in older releases): no network."""
    return any(cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
               for cls in type(error).__mro__)


def job_command(cluster: Mapping[str, Any], argv: Sequence[str]) -> Optional[str]:
    """The Slurm job to stage in on a machine whose login node would kill the download; None elsewhere."""
    template = STAGE_JOBS.get(str(cluster.get("name")))
    if template is None or os.environ.get("SLURM_JOB_ID"):
        return None
    command = " ".join(shlex.quote(w) for w in [sys.executable, "-m", "launcher.stage", *argv])
    return template.format(account=shlex.quote(str(cluster.get("account") or "<account>")), command=command)


def compose_plain(overrides: Sequence[str]) -> Dict[str, Any]:
    """The config of these overrides, composed and checked as the run's is (cluster and interpolations)."""
    from omegaconf import OmegaConf

    from launcher.config import compose
    from launcher.config.check_cluster import check_cluster
    from launcher.config.schema import as_container
    from launcher.config.validation import check_interpolations

    composed = compose(list(overrides))
    check_interpolations(OmegaConf.to_container(composed, resolve=False))
    plain = as_container(composed)
    if plain.get("cluster"):
        check_cluster(plain["cluster"], nodes=plain["nodes"])
    return plain


def _main(argv: List[str]) -> int:
    parser = ArgumentParser(prog="python -m launcher.stage",
                            description="Download the Hub ids of model.pretrained/model.tokenizer into the HF cache "
                                        "of the profile (cluster.hf_home).")
    parser.add_argument("overrides", nargs="*", help="the run's overrides: +cluster=NAME, model.pretrained=org/name")
    parser.add_argument("--here", action="store_true", help="download in this shell even where a job is advised")
    args = parser.parse_intermixed_args(argv)
    cfg = compose_plain(args.overrides)
    cluster = cfg.get("cluster") or {}
    home = hub.hf_home(cluster.get("hf_home"))
    todo = []
    for target in targets(cfg):
        stage = hub.stage_command(cfg, target.field, target.hub_id.text)
        try:
            print(f"launcher: staged already: {_resolve(target, home, stage).describe()}")
        except ConfigError:
            todo.append((target, stage))
    if not todo:
        return 0
    job = None if args.here else job_command(cluster, args.overrides)
    if job is not None:
        print(f"launcher: {cluster['name']} login nodes end processes after 10 minutes of CPU time: stage in a job "
              f"(or add --here):\n  {job}")
        return 0
    _check_online()
    print(f"launcher: HF cache {hub.hub_cache(home)}; token: {token_source()}", file=sys.stderr)
    for target, stage in todo:
        print(f"launcher: downloading {target.hub_id.repo_id}@{target.hub_id.revision} ({', '.join(target.patterns)})",
              file=sys.stderr)
        print(f"launcher: staged: {download(target, home, stage=stage).describe()}")
    return 0


def _resolve(target: Target, home: Path, stage: str) -> hub.Snapshot:
    return hub.resolve(target.field, target.hub_id, home, model=target.model, tokenizer=target.tokenizer, stage=stage)


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE"), "offline mode is on in this shell",
                        "unset HF_HUB_OFFLINE to download (the job sets it itself)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 staged (or the job to stage in printed), 2 bad input or a refusal (one line), 1 a bug."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
