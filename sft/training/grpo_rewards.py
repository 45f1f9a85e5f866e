"""Rewards of sampled answers: the built-in instruction verifier plus the user's own functions.

The verifier's reward is the share of a record's instructions the answer follows, judged strictly
by the offline IFEval checkers (sft.verifiers); an empty answer follows nothing. A user's
function is named on the command line, ``--reward mypkg.rewards:fn``, and only there (never read
from data or from a run directory: naming it runs its code). It is called once per batch of
answers as ``fn(prompts, completions, records)``: the prompt messages, the answer texts and the
prompt records (the file's lines, extra fields included), one entry per answer, and returns one
number per answer. Rewards of all functions are added.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sft.errors import ConfigError
from sft.verifiers.instructions import Check, followed

RewardFunction = Callable[[list[Any], list[str], list[dict[str, Any]]], Sequence[float]]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def load_reward_function(spec: str) -> RewardFunction:
    """The function ``module.path:name`` names, imported now (before any model is loaded)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"--reward {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.rewards:fn")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: any failure is theirs to fix
        raise ConfigError(f"--reward {spec}: cannot import {module_name} ({_one_line(exc)})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"--reward {spec}: {module_name} has no function {name!r}")
    return function


@dataclass
class Scores:
    rewards: list[float]
    """Each answer's total reward."""
    passed: list[bool] | None
    """Whether each answer followed all of its record's instructions (None without the verifier)."""


class Rewards:
    """The reward of answers to prompt records, by record index."""

    def __init__(self, records: list[dict[str, Any]], checks: list[list[Check]] | None,
                 functions: dict[str, RewardFunction]) -> None:
        if checks is None and not functions:
            raise ConfigError("no reward: the built-in verifier is off (--verifier false) and no --reward function "
                              "is given")
        self.records, self.checks, self.functions = records, checks, functions

    def __call__(self, indices: list[int], completions: list[str]) -> Scores:
        rewards, passed = [0.0] * len(indices), None
        if self.checks is not None:
            judged = [followed(self.checks[index], text) for index, text in zip(indices, completions, strict=True)]
            rewards = [sum(marks) / len(marks) for marks in judged]
            passed = [all(marks) for marks in judged]
        records = [self.records[index] for index in indices]
        prompts = [record["messages"] for record in records]
        for spec, function in self.functions.items():
            try:
                values = list(function(prompts, list(completions), records))
            except Exception as exc:  # noqa: BLE001 - the user's code: name it and stop
                raise ConfigError(f"--reward {spec} raised {_one_line(exc)}") from None
            if len(values) != len(indices) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and math.isfinite(v) for v in values):
                raise ConfigError(f"--reward {spec} must return one finite number per completion ({len(indices)}), "
                                  f"got {str(values)[:200]}")
            rewards = [total + float(value) for total, value in zip(rewards, values, strict=True)]
        return Scores(rewards, passed)
