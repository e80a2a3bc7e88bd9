"""config.json -> a family's frozen config dataclass, the one way every family reads it.

transformers' configs carry many fields a family's forward pass never reads; the dataclass
declares the ones it does. A null in config.json means "not set" (transformers writes the
default's None), so the dataclass default applies; a JSON list becomes a tuple where the field is
declared as one, so that frozen configs stay hashable and compare equal however they were saved.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

Config = TypeVar("Config")


def config_from_dict(cls: type[Config], raw: Mapping[str, Any], **computed: Any) -> Config:
    """cls from the config.json fields it declares; `computed` fields (e.g. labels a family
    derives from several keys) replace whatever config.json holds under their names."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in computed or raw.get(f.name) is None:
            continue
        value = raw[f.name]
        if isinstance(value, list) and "tuple" in str(f.type):
            value = tuple(value)
        values[f.name] = value
    return cls(**values, **computed)
