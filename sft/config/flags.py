"""Command-line flags for a configuration: one per field, documented by the field's docstring."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from typing import Any

from sft.config.build import build_config, fields_of, flat_name
from sft.config.sections import SFTConfig
from sft.config.yaml_io import did_you_mean


class StrictArgumentParser(argparse.ArgumentParser):
    """An argument parser that takes no abbreviations (``--learning-rat 3`` must not quietly set
    the learning rate) and answers an unknown flag with the closest known one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: typing.Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [flag for action in self._actions for flag in action.option_strings]
            flag = unknown[0].split("=")[0]
            self.error(f"unrecognized argument {unknown[0]!r}{did_you_mean(flag, known)}")
        return parsed

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[SFTConfig] = SFTConfig,
                         flag_options: dict[str, dict[str, Any]] | None = None) -> None:
    """Add ``--config`` and one flag per field; flags left out do not override the YAML.
    ``flag_options`` gives some flags, by field name (``loss_type``), ``choices`` and a ``help`` of
    their own, from a registry the configuration does not import (the recipe's)."""
    parser.add_argument("--config", metavar="YAML", help="preset to start from (configs/*.yaml)")
    for group, cls in config_class.sections().items():
        section = parser.add_argument_group(f"{group} options")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            annotation = typing.get_type_hints(cls)[f.name]
            metavar = "A,B,..." if typing.get_origin(annotation) is list else None
            name = flat_name(cls, f.name)
            options = dict((flag_options or {}).get(name, {}))
            text = options.pop("help").replace("%", "%%") if "help" in options else docs.get(f.name, "")
            section.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                                 metavar=metavar, help=f"{text} (default: {default})", **options)


def config_from_args(args: argparse.Namespace, config_class: type[SFTConfig] = SFTConfig) -> SFTConfig:
    overrides = {name: getattr(args, name) for name in fields_of(config_class) if hasattr(args, name)}
    return build_config(args.config, overrides, config_class)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a section, so --help and the code say the same thing."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs
