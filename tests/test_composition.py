"""Every cluster x strategy x peft composes, validates and renders; the schema rejects bad keys and types."""

from __future__ import annotations

import subprocess

import pytest
from hydra.errors import ConfigCompositionException

from launcher.config.strategies import STRATEGY_NAMES as STRATEGIES
from launcher.plan.job import make_plan
from launcher.slurm.render import render_script
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, REPO, config

CLUSTERS = {"lumi": [LUMI_ACCOUNT], "leonardo": [LEONARDO_ACCOUNT], "local_slurm": [], None: []}


@pytest.mark.parametrize("cluster", list(CLUSTERS))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_every_combination_composes_validates_and_renders(cluster, strategy, peft):
    overrides = [f"strategy={strategy}", f"peft={peft}", "output_dir=/tmp/launcher-compose-test"]
    if cluster:
        overrides += [f"+cluster={cluster}", *CLUSTERS[cluster]]
    cfg = config(overrides)  # composed, validated and typed, as the command line does
    assert cfg.strategy.name == strategy and cfg.peft.name == peft
    if cluster:
        script = render_script(cfg, make_plan(cfg))
        assert script.startswith("#!/bin/bash")
        assert "-m submitit.core._submit" in script
        syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
        assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize("model", ["tiny", "llama-1b", "llama-8b", "mistral-7b"])
def test_model_presets_compose(model):
    cfg = config([f"model={model}"])
    assert cfg.model.name == model
    assert cfg.model.pretrained is None
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("train.max_steps=many", "train.max_steps"),
        ("nodes=two", "nodes"),
        ("model.hidden_sise=4", "model.hidden_sise"),
    ],
)
def test_schema_rejects_misspelled_keys_and_wrong_types(override, key):
    with pytest.raises(ConfigCompositionException) as error:
        config([override])
    assert key in str(error.value) + str(error.value.__cause__)


def test_keys_added_with_plus_are_checked_against_the_schema():
    from launcher.errors import ConfigError
    
    with pytest.raises(ConfigError) as error:
        config(["+train.max_stepz=3"])
    assert error.value.field == "train.max_stepz" and "train.max_steps" in str(error.value)
    # Free-form maps (cluster.env, cluster.sbatch_extra) accept new keys.
    cfg = config(["+cluster=local_slurm", "+cluster.env.MY_FLAG=1", "+cluster.sbatch_extra.constraint=x"])
    assert cfg.cluster.env["MY_FLAG"] == "1" and cfg.cluster.sbatch_extra == {"constraint": "x"}


def test_cluster_key_without_cluster_says_what_to_add():
    from launcher.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        config(["cluster.partition=small-g"])
    assert error.value.field == "cluster.partition" and "+cluster=NAME" in str(error.value)
    assert "lumi" in str(error.value) and "leonardo" in str(error.value)


def test_cluster_key_misspelled_is_named():
    with pytest.raises(ConfigCompositionException) as error:
        config(["+cluster=lumi", "cluster.acount=project_465000123"])
    assert "cluster.acount" in str(error.value)


def test_data_paths_resolve_to_bundled_examples():
    for data in ("corpus", "text", "instruction", "chat"):
        cfg = config([f"data={data}"])
        assert cfg.data.path.startswith("/") and cfg.data.format


def test_run_name_defaults_to_model_strategy_peft():
    assert config(["strategy=zero2", "peft=lora"]).run_name == "tiny-zero2-lora"


def test_every_schema_key_is_documented():
    """docs/configuration.md lists every key of every section: a new field without its line fails here."""
    import dataclasses

    from launcher.config import schema as S

    doc = (REPO / "docs" / "configuration.md").read_text()
    sections = {"cluster": S.ClusterConfig, "model": S.ModelConfig, "data": S.DataConfig, "task": S.TaskConfig,
                "strategy": S.StrategyConfig, "peft": S.PeftConfig, "train": S.TrainConfig, "budget": S.BudgetConfig}
    missing = [f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)
               if f"{name}.{f.name}" not in doc and f"`{f.name}`" not in doc]
    assert not missing, f"not in docs/configuration.md: {missing}"


@pytest.mark.parametrize("overrides", [
    [],
    ["+cluster=lumi", LUMI_ACCOUNT, "model=llama-8b", "strategy=zero3", "nodes=4"],
    ["+cluster=leonardo", LEONARDO_ACCOUNT, "strategy=fsdp", "peft=lora",
     "data.sources=[{path:a.txt,weight:2.0},{path:b.txt,weight:1.0}]"],
])
def test_the_fast_typed_conversion_equals_omegaconfs(overrides):
    """to_typed builds the dataclasses from the resolved tree without a second validation: the same objects as
    OmegaConf.to_object (nested sections, Optional cluster and container, dicts of partitions, lists of sources)."""
    from omegaconf import OmegaConf

    from launcher.config import compose, to_typed
    from launcher.config.schema import as_container

    composed = compose(overrides)
    typed, reference = to_typed(as_container(composed)), OmegaConf.to_object(composed)
    assert typed == reference
    if typed.cluster is not None:
        assert type(next(iter(typed.cluster.partitions.values()))).__name__ == "PartitionLimits"
    assert all(type(source).__name__ == "DataSource" for source in typed.data.sources)
    assert len(typed.data.sources) == (2 if "peft=lora" in overrides else 0)
