"""A run's configuration in three layers, later ones winning: the defaults of the sections, a
YAML preset (``--config configs/NAME.yaml``, one mapping per section), and overrides named after
the fields (the command-line flags: ``--max-steps 2`` sets training.max_steps)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any

from sft.config.sections import CONFIG_CLASSES, SFTConfig
from sft.config.values import coerce
from sft.config.yaml_io import did_you_mean, read_sections, top_level_keys
from sft.errors import ConfigError


def flat_name(section: type, field_name: str) -> str:
    """A field's name as a flag and an override: the section's prefix (lora_) and the field's name."""
    return getattr(section, "FLAG_PREFIX", "") + field_name


@functools.cache
def fields_of(config_class: type[SFTConfig]) -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat name (``max_steps``, ``lora_r``) -> (its section, the field) for a kind of configuration."""
    owners: dict[str, tuple[str, dataclasses.Field]] = {}
    for group, cls in config_class.sections().items():
        for f in dataclasses.fields(cls):
            name = flat_name(cls, f.name)
            assert name not in owners, f"field {name} is defined twice"
            owners[name] = (group, f)
    return owners


FIELDS = fields_of(SFTConfig)


def config_class_of(path: str | Path | None) -> type[SFTConfig]:
    """The kind of configuration a YAML file holds: the first whose sections cover its own."""
    keys = top_level_keys(path) if path else set()
    for config_class in CONFIG_CLASSES:
        if keys <= config_class.sections().keys():
            return config_class
    return SFTConfig  # unknown sections: reading it as SFT names them


def build_config(config_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 config_class: type[SFTConfig] | None = None) -> SFTConfig:
    """Defaults, then the YAML file, then overrides (flat field names), validated. Without
    ``config_class`` the kind follows the file (a DPO run's saved configuration has ``dpo``)."""
    config_class = config_class or config_class_of(config_path)
    sections = config_class.sections()
    fields = fields_of(config_class)
    values = read_sections(config_path, sections) if config_path else {}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"unknown option {key!r}{did_you_mean(key, fields)}")
        group, owner = fields[key]
        values.setdefault(group, {})[owner.name] = value
    groups = {}
    for group, cls in sections.items():
        hints = typing.get_type_hints(cls)
        kwargs = {key: coerce(value, hints[key], f"{group}.{key}") for key, value in values.get(group, {}).items()}
        try:
            groups[group] = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{group}.{exc}") from None
    return config_class(**groups)
