"""The recipes' one skeleton: the stages in one order, the hooks where methods differ, the shared flags.

The stages themselves are replaced by recorders here, so these tests run in milliseconds and say
only what the skeleton decides; tests/recipes/test_*_recipe.py run the real stages end to end.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sft.config import DPOConfig, GRPOConfig, build_config
from sft.errors import ConfigError, DataError
from sft.recipes import skeleton
from sft.recipes.dpo import DPO
from sft.recipes.grpo import GRPO
from sft.recipes.sft import SFT
from sft.recipes.skeleton import Encoded, Recipe

STAGES = ("setup_runtime", "prepare_output_dir", "load_run_tokenizer", "describe_layout", "load_lora_model",
          "save_run_files", "run_guarded", "final_metrics", "finish")


class Recording(Recipe):
    """A method whose hooks note when they run (into ``calls``, with the stages')."""

    command, description, epilog = "record", "A recipe that records its stages.", ""
    next_step = "Look at {output_dir}."

    def __init__(self, config: Any, calls: list[str], fail_in: str | None = None) -> None:
        self.calls, self.fail_in = calls, fail_in
        super().__init__(config)

    def note(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_in:
            raise ConfigError(f"{name} failed")

    def check(self) -> None:
        self.note("check")

    def encode(self, tokenizer: Any, runtime: Any) -> Encoded:
        self.note("encode")
        return Encoded([{"id": 1}], [], {"train": {"kept": 1}})

    def describe(self, layout: str) -> str:
        self.note("describe")
        return layout + " (recorded)"

    def with_reference(self, runtime: Any, model: Any, tokenizer: Any, sft_adapter: Path | None,
                       data: Encoded) -> Encoded:
        self.note("with_reference")
        return Encoded(data.train + [{"id": 2}], data.val, data.report)

    def build_trainer(self, runtime: Any, model: Any, tokenizer: Any, data: Encoded, resumed: bool,
                      callbacks: Any) -> Any:
        self.note("build_trainer")
        return SimpleNamespace(data=data, resumed=resumed)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[Any]]:
    """Every stage of the skeleton replaced by a recorder; (the calls in order, what was said)."""
    calls: list[str] = []
    said: list[Any] = []
    runtime = SimpleNamespace(say=said.append, main_process=True,
                              state=SimpleNamespace(main_process_first=contextlib.nullcontext))
    answers = {"setup_runtime": contextlib.nullcontext(runtime), "prepare_output_dir": None,
               "load_run_tokenizer": "tokenizer", "describe_layout": "layout", "load_lora_model": "model",
               "run_guarded": "result", "final_metrics": {"train_loss": 1.0}}
    for stage in STAGES:
        def record(*args: Any, stage: str = stage) -> Any:
            calls.append(stage)
            said.append((stage, args))
            return answers.get(stage)
        monkeypatch.setattr(skeleton, stage, record)
    return calls, said


def stage_args(said: list[Any], stage: str) -> tuple:
    """The arguments the skeleton passed to ``stage``."""
    return next(entry[1] for entry in said if isinstance(entry, tuple) and entry[0] == stage)


def test_the_stages_and_hooks_run_in_one_order(recorded: tuple[list[str], list[Any]], tmp_path: Path) -> None:
    calls, said = recorded
    config = build_config(None, {"output_dir": str(tmp_path / "run")})
    run = Recording(config, calls).train()
    assert calls == ["check", "setup_runtime", "prepare_output_dir", "load_run_tokenizer", "encode",
                     "describe_layout", "describe", "load_lora_model", "with_reference", "build_trainer",
                     "save_run_files", "run_guarded", "final_metrics", "finish"]
    assert run.metrics == {"train_loss": 1.0} and run.trainer.data.train == [{"id": 1}, {"id": 2}]
    assert not run.trainer.resumed
    assert stage_args(said, "save_run_files")[2] == {"train": {"kept": 1}}  # the data report the hook made
    assert "layout (recorded)" in said
    assert said[-1] == f"Adapter saved to {tmp_path / 'run'}. Look at {tmp_path / 'run'}."


def test_a_recipe_without_an_sft_adapter_loads_the_plain_base(recorded: tuple[list[str], list[Any]],
                                                              tmp_path: Path) -> None:
    calls, said = recorded
    Recording(build_config(None, {"output_dir": str(tmp_path)}), calls).train()
    assert stage_args(said, "load_lora_model")[2] is None  # no step folds an adapter into the base


@pytest.mark.parametrize("hook", ["encode", "with_reference", "build_trainer"])
def test_a_failing_hook_stops_the_run_before_it_trains(hook: str, recorded: tuple[list[str], list[Any]],
                                                       tmp_path: Path) -> None:
    calls, _ = recorded
    with pytest.raises(ConfigError, match=f"{hook} failed"):
        Recording(build_config(None, {"output_dir": str(tmp_path)}), calls, fail_in=hook).train()
    assert "run_guarded" not in calls and "save_run_files" not in calls


def test_the_configuration_is_checked_when_the_run_is_made(recorded: tuple[list[str], list[Any]],
                                                          tmp_path: Path) -> None:
    calls, _ = recorded
    with pytest.raises(ConfigError, match="check failed"):
        Recording(build_config(None, {"output_dir": str(tmp_path)}), calls, fail_in="check")
    assert calls == ["check"]


@pytest.mark.parametrize(("recipe", "config_class", "changes", "message"), [
    (DPO, DPOConfig, {"group_by_length": True}, "training.group_by_length: not used by DPO"),
    (GRPO, GRPOConfig, {"group_by_length": True}, "training.group_by_length: not used by GRPO"),
    (GRPO, GRPOConfig, {"max_answer_tokens": 64, "max_seq_length": 64}, "grpo.max_answer_tokens: 64 leaves no room"),
    (DPO, DPOConfig, {"sft_adapter": "no/such/run"}, "no/such/run: no such directory"),
    (GRPO, GRPOConfig, {"sft_adapter": "no/such/run"}, "no/such/run: no such directory"),
])
def test_each_method_refuses_what_it_cannot_run_before_reading_anything(
        recipe: type[Recipe], config_class: type, changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    config = build_config(None, {"output_dir": str(tmp_path), "train_file": str(tmp_path / "absent.jsonl"),
                                 **changes}, config_class)
    with pytest.raises(ConfigError, match=message):
        recipe(config)


@pytest.mark.parametrize(("recipe", "own"), [(SFT, []), (DPO, []), (GRPO, ["--reward"])])
def test_each_command_has_its_own_flags_then_resume_and_overwrite(recipe: type[Recipe], own: list[str]) -> None:
    parser = recipe.build_parser()
    flags = [action.option_strings[0] for action in parser._actions if action.option_strings]
    assert flags[-2 - len(own):] == [*own, "--resume", "--overwrite-output-dir"]
    assert "--output-dir" in flags and parser.prog == recipe.command
    args = parser.parse_args(["--resume", *(["--reward", "m:f"] if own else [])])
    assert args.resume == "latest" and not args.overwrite_output_dir
    assert parser.parse_args(["--resume", "checkpoint-4"]).resume == "checkpoint-4"


def test_grpo_loads_the_reward_functions_its_command_line_names_before_reading_the_prompts(tmp_path: Path) -> None:
    parser = GRPO.build_parser()
    flags = ["--output-dir", str(tmp_path), "--train-file", str(tmp_path / "absent.jsonl")]
    good = parser.parse_args([*flags, "--reward", "tests.recipes.grpo_test_rewards:answer_length"])
    assert good.reward == ["tests.recipes.grpo_test_rewards:answer_length"]
    with pytest.raises(DataError, match="absent.jsonl not found"):  # the function loaded; then the prompts
        GRPO.from_args(good)
    with pytest.raises(ConfigError, match="--reward tests.recipes.no_such_module:f: cannot import"):
        GRPO.from_args(parser.parse_args([*flags, "--reward", "tests.recipes.no_such_module:f"]))
