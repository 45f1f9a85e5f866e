"""Reading configuration YAML strictly: UTF-8, no duplicate keys, known sections and keys."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from sft.config.sections import RUN_CONFIG_FILE
from sft.errors import ConfigError


def did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def saved_run_config(adapter_dir: str | Path) -> Path | None:
    """The configuration a training run saved beside its adapter, or beside the run holding a
    checkpoint-N; None for an adapter trained elsewhere."""
    for candidate in (Path(adapter_dir) / RUN_CONFIG_FILE, Path(adapter_dir).parent / RUN_CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the last
    without a word, so a preset edited in two places trains with whichever came later."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: a list or mapping cannot name a field
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name, got a {kind}", key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {first_line[key]}); keep one",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


MAX_YAML_VALUES = 10_000
"""The most values (scalars, lists, mappings) a configuration may hold once its aliases are
expanded. A preset has a few dozen; an alias bomb (`a: &a [x, x]`, `b: &b [*a, *a]`, ...) is a few
hundred bytes that expand ninefold per level, and every later step (validation, the error that
quotes the value, saving the run's configuration) would pay for the expansion."""


def _expands_past(value: Any, budget: int) -> bool:
    """Whether ``value``, with every shared (aliased) part counted each time it appears, holds more
    than ``budget`` values; the walk stops at the budget, so it costs at most that many steps."""
    stack = [value]
    while stack:
        budget -= 1
        if budget < 0:
            return True
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _load_yaml(path: Path) -> Any:
    """The YAML document in ``path``, or a one-line error naming the file, the line and what to do."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; save the file as "
                          f"UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if _expands_past(loaded, MAX_YAML_VALUES):
        raise ConfigError(f"{path}: expands to more than {MAX_YAML_VALUES} values (through aliases, *name, that "
                          f"repeat other parts); a configuration needs a few dozen: write the values out")
    return loaded


def read_sections(path: str | Path, sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """{section: {field: raw value}} of a YAML file, every section and key known to ``sections``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    loaded = _load_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected sections {', '.join(sections)} at the top level")
    owners: dict[str, tuple[str, str]] = {}  # a key as YAML may write it -> (section, field name)
    for group, cls in sections.items():
        for f in dataclasses.fields(cls):
            owners[f.name] = owners[getattr(cls, "FLAG_PREFIX", "") + f.name] = (group, f.name)
    values: dict[str, dict[str, Any]] = {}
    for group, section in loaded.items():
        if group not in sections:
            raise ConfigError(f"{path}: unknown section {group!r}{did_you_mean(str(group), sections)}; "
                              f"sections are {', '.join(sections)}")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {group!r} must be a mapping")
        for key, value in section.items():
            owner = owners.get(key)
            if owner is None or owner[0] != group:
                names = [f.name for f in dataclasses.fields(sections[group])]
                hint = f" (it belongs in section {owner[0]!r})" if owner else did_you_mean(str(key), names)
                raise ConfigError(f"{path}: unknown key {group}.{key}{hint}")
            if owner[1] in values.get(group, {}):
                raise ConfigError(f"{path}: {group}.{owner[1]} is given twice (as {key} too); keep one")
            values.setdefault(group, {})[owner[1]] = value
    return values


def top_level_keys(path: str | Path) -> set[str]:
    """The section names a YAML file holds (to tell which kind of run saved it)."""
    loaded = _load_yaml(Path(path)) if Path(path).is_file() else None
    return set(loaded) if isinstance(loaded, dict) else set()
