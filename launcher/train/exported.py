"""What a finished run exported, for the tools that use it (``launcher.generate``, ``.evaluate``, ``.export``).

Login-light: stdlib and the run's config (omegaconf) only; the heavy loading lives in ``launcher.train.inference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.errors import UserError
from launcher.rundir import CONFIG_FILE, EXPORT_DIR, MERGED_DIR

ADAPTER_CONFIG = "adapter_config.json"  # peft's file: the export holds an adapter, not a whole model
MODEL_CHOICES = ("auto", "adapter", "merged")


@dataclass(frozen=True)
class Export:
    run_dir: Path
    directory: Path  # <run_dir>/export
    task: str  # task.name of the run
    data_format: Optional[str]  # data.format of the run (chat: prompts go through the chat template)
    config: Any  # the run's LauncherConfig

    @property
    def is_adapter(self) -> bool:
        return (self.directory / ADAPTER_CONFIG).is_file()

    @property
    def merged(self) -> Path:
        return self.directory / MERGED_DIR

    def has_merged(self) -> bool:
        return (self.merged / "config.json").is_file()

    def weights(self, choice: str = "auto") -> str:
        """Which weights ``choice`` loads: "full" (no adapter), "adapter" or "merged"; UserError when absent."""
        if choice not in MODEL_CHOICES:
            raise UserError("--model", choice, "not a choice", f"one of {', '.join(MODEL_CHOICES)}")
        if not self.is_adapter:
            if choice != "auto":
                raise UserError("--model", choice, f"{self.run_dir} is a full fine-tune: it has no adapter",
                                "leave --model out")
            return "full"
        if choice == "merged" and not self.has_merged():
            raise UserError("--model", choice, f"{self.merged} does not exist",
                            f"python -m launcher.export {self.run_dir} --merge writes it")
        if choice == "auto":
            return "merged" if self.has_merged() else "adapter"
        return choice


def find_export(run_dir: str | Path) -> Export:
    """The run's export and config; UserError naming what is missing."""
    run = Path(run_dir).expanduser().absolute()
    if not (run / CONFIG_FILE).is_file():
        raise UserError("RUN_DIR", str(run), f"not a run directory (no {CONFIG_FILE})",
                        "give <output_dir>/<run_name> of a finished run")
    directory = run / EXPORT_DIR
    if not (directory / "config.json").is_file() and not (directory / ADAPTER_CONFIG).is_file():
        raise UserError("RUN_DIR", str(run), f"no export in {directory}",
                        "train to the end with train.export=true, or run it again with export_only=true")
    from launcher.config.load import read_run_config

    cfg = read_run_config(run)
    return Export(run_dir=run, directory=directory, task=cfg.task.name, data_format=_data_format(cfg), config=cfg)


def _data_format(cfg: Any) -> Optional[str]:
    """data.format as the login node resolved it; detected again for a config written without it."""
    if cfg.data.format or cfg.task.name != "causal_lm":
        return cfg.data.format
    from launcher.train.data_formats import detect_format

    try:
        return detect_format(cfg.data.path)
    except (OSError, ValueError):  # the training data is gone: prompts are then used as they are
        return None
