"""Per-call options: one frozen dataclass per task, built once per request and passed down.

A task declares its options as a frozen dataclass of `TaskOptions` whose field names are the
request fields' names and whose defaults are transformers' ones. A pipeline builds the value
once per request (`Pipeline.options(overrides)`): the model's LoadModel default_options, then
the fields the request set (None = not set), then the task's checks (normalising values and
raising InvalidParameter with the field's name). From there the value is frozen and hashable,
so the dynamic batcher groups concurrent requests by it and nothing downstream re-validates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from ..errors import InvalidParameter

OptionsT = TypeVar("OptionsT", bound="TaskOptions")


@dataclass(frozen=True)
class TaskOptions:
    """Base of the per-task options dataclasses (each subclass is `@dataclass(frozen=True)`)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def builtin_defaults(cls) -> dict[str, Any]:
        """Each field's declared default (transformers' default for the option)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def check_names(cls, names: Mapping[str, Any], task: str) -> None:
        """LoadModel default_options may only name this task's options."""
        unknown = set(names) - set(cls.names())
        if unknown:
            raise InvalidParameter(f"unknown default options for {task}: {sorted(unknown)}; "
                                   f"known: {sorted(cls.names())}")

    @classmethod
    def merge(cls, defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The model's defaults overridden by the fields a request set (None = not set)."""
        unknown = set(overrides) - set(cls.names())
        if unknown:  # a servicer naming a field its task does not have: a bug, not bad input
            raise TypeError(f"{cls.__name__} has no options {sorted(unknown)}")
        merged = dict(defaults)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return merged

    @classmethod
    def of(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
        """The frozen value of checked `values`; lists become tuples so that it is hashable."""
        return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
