"""Config schema, Hydra registration and composition helpers (login-node safe)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from launcher.paths import CONF_DIR, example_file

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from launcher.config.schema import LauncherConfig

__all__ = ["compose", "setup_hydra", "check_overrides"]
# Imports of omegaconf/hydra stay inside the functions: launcher.config.strategies is read by the job and the
# planner, which must not pay for them.


def setup_hydra() -> None:
    """Register the schema and the resolvers the YAML files use. Safe to call more than once."""
    from omegaconf import OmegaConf

    from launcher.config.schema import register_schema

    register_schema()
    if not OmegaConf.has_resolver("examples"):
        OmegaConf.register_new_resolver("examples", example_file)


def check_overrides(overrides: Sequence[str]) -> None:
    """Catch a cluster key given without a cluster (OmegaConf fails there with an internal assertion)."""
    from launcher.errors import ConfigError
    from launcher.paths import CONF_DIR

    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides if not o.startswith("hydra")]
    if "cluster" in keys:
        return
    for key in keys:
        if key.startswith("cluster."):
            names = ", ".join(sorted(p.stem for p in (CONF_DIR / "cluster").glob("*.yaml")))
            raise ConfigError(key, "(no cluster selected)", f"cluster keys need +cluster=NAME first ({names})")


def compose(overrides: Sequence[str] = ()) -> "DictConfig":
    """Compose the config as the command line would, without starting a process (tests, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    setup_hydra()
    check_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def to_typed(plain: "Mapping[str, Any]", **replace: object) -> "LauncherConfig":
    """The composed config, resolved into a plain tree (``schema.as_container``), as the schema's dataclasses
    (``replace`` sets top-level fields). Convert once, after validation, then pass sections (``cfg.cluster``,
    ``cfg.train``) on."""
    from launcher.config.schema import LauncherConfig
    from launcher.config.typed import build

    return build(LauncherConfig, {**plain, **replace})


def validated(overrides: Sequence[str] = ()) -> "LauncherConfig":
    """Compose, check and validate as the command line does, then convert: the config a run really gets."""
    from omegaconf import OmegaConf

    from launcher.config.schema import as_container
    from launcher.config.validation import check_interpolations, validate

    composed = compose(overrides)
    check_interpolations(OmegaConf.to_container(composed, resolve=False))
    plain = as_container(composed)
    data_format = validate(plain)
    return with_resolved_inputs(to_typed(plain), data_format)


def with_resolved_inputs(cfg: "LauncherConfig", data_format: str) -> "LauncherConfig":
    """The config with the data format the login node detected (or the user named) and absolute input paths: the job
    reads the same files, whatever directory it starts in. A Hub id in ``model.pretrained``/``model.tokenizer``
    becomes its pinned snapshot in the HF cache, and ``cluster.hf_home`` the absolute directory the job exports as
    HF_HOME (``launcher.hub``): what the login node checked is what the job reads."""
    import dataclasses
    from pathlib import Path

    from launcher import hub

    def absolute(path: "str | None") -> "str | None":
        return str(Path(path).expanduser().absolute()) if path else path

    home = hub.hf_home(cfg.cluster.hf_home if cfg.cluster else None)

    def model_input(field: str, value: "str | None") -> "str | None":
        if value and hub.parse(field, value) is not None:
            return hub.pinned_path(field, value, home)
        return absolute(value)

    sources = [dataclasses.replace(source, path=absolute(source.path)) for source in cfg.data.sources]
    data = dataclasses.replace(cfg.data, format=data_format, path=absolute(cfg.data.path),
                               cache_dir=absolute(cfg.data.cache_dir), sources=sources)
    model = dataclasses.replace(cfg.model, pretrained=model_input("model.pretrained", cfg.model.pretrained),
                                tokenizer=model_input("model.tokenizer", cfg.model.tokenizer))
    cluster = dataclasses.replace(cfg.cluster, hf_home=str(home)) if cfg.cluster else None
    return dataclasses.replace(cfg, data=data, model=model, cluster=cluster)
