"""A resolved plain tree of a composed config -> the schema dataclasses (``LauncherConfig``).

The composed tree is a structured config: Hydra has already type-checked and converted every value against the
schema, and ``as_container`` has resolved it and refused missing values. What is left is building the dataclasses,
which this does directly; ``OmegaConf.to_object`` would validate every node a second time (a fifth of the dry run's
own work). Trees that were not composed against the schema (a saved config.yaml) go through
``launcher.config.load.from_plain``, which validates.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Dict, Mapping, Type, TypeVar

T = TypeVar("T")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _value(hint: Any, value: Any) -> Any:
    """``value`` built as ``hint`` says: dataclasses (also inside Optional, List and Dict) become instances."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return build(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value) if len(inner) == 1 else value
    if origin is list:
        return [_value(args[0], item) for item in value]
    if origin is dict:
        return {key: _value(args[1], item) for key, item in value.items()}
    return value


def build(cls: Type[T], tree: Mapping[str, Any]) -> T:
    """``cls`` from ``tree`` (keys absent from the tree keep their defaults)."""
    types = _field_types(cls)
    return cls(**{name: _value(types[name], tree[name]) for name in types if name in tree})  # type: ignore[call-arg]
