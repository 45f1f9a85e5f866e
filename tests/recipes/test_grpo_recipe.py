"""`sft grpo` end to end on the tiny model: sampled answers, verifier and user rewards, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from sft.cli import main as cli_main
from sft.config import GRPOConfig, build_config
from sft.recipes import grpo as grpo_recipe
from sft.recipes.sft import main as sft_main
from sft.training.grpo_trainer import SAMPLES_FILE
from tests.tiny import as_flags, logged, tiny_run_overrides, write_jsonl, write_prepared_split

LENGTH_REWARD = "tests.recipes.grpo_test_rewards:answer_length"
TOPICS = ["the ocean", "a red bicycle", "coffee", "the moon", "winter", "jazz music"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = []
    for i, topic in enumerate(TOPICS):
        ids = ["change_case:english_lowercase", "punctuation:no_comma"][:1 + i % 2]
        records.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"Describe {topic}."}],
                        "instruction_id_list": ids, "kwargs": [{} for _ in ids], "topic": topic})
    return write_jsonl(tmp_path_factory.mktemp("grpo_data") / "constraints.jsonl", records)


def _overrides(tiny_model_dir: Path, prompt_file: Path, output_dir: Path, **changes: object) -> dict:
    overrides = tiny_run_overrides(tiny_model_dir, prompt_file, prompt_file, output_dir, batch_size=2,
                                   max_steps=2, lora_dropout=0.0, learning_rate=5e-2, group_size=3,
                                   max_answer_tokens=8, generation_batch_size=4, lr_scheduler_type="constant")
    overrides.update(changes)
    return overrides


def test_grpo_runs_two_steps_and_logs_its_metrics(tiny_model_dir: Path, prompt_file: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "grpo"
    assert cli_main(["grpo", *as_flags(_overrides(tiny_model_dir, prompt_file, output_dir))]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "sft_config.yaml",
                 "data_report.json", "loss.png", "checkpoint-2/adapter_model.safetensors"):
        assert (output_dir / name).exists(), name
    assert sorted(logged(output_dir)) == [1, 2]
    for key in ("reward", "reward_std", "pass_rate", "answer_tokens", "sampling_tokens_per_s", "clip_fraction"):
        assert sorted(logged(output_dir, key)) == [1, 2], key
    assert all(0.0 <= value <= 1.0 for value in logged(output_dir, "reward").values())
    assert all(value == 0.0 for value in logged(output_dir, "clip_fraction").values())  # one step per sample
    assert all(1 <= value <= 8 for value in logged(output_dir, "answer_tokens").values())
    assert isinstance(build_config(output_dir / "sft_config.yaml"), GRPOConfig)
    report = json.loads((output_dir / "data_report.json").read_text())
    assert report["train"] == {"records": 6, "kept": 6, "dropped_prompt_too_long": 0}
    assert Image.open(output_dir / "loss.png").size == (1440, 480)  # loss beside the rewards
    assert json.loads((output_dir / "adapter_origin.json").read_text())["method"] == "grpo"


def test_one_answer_per_prompt_gives_no_update(tiny_model_dir: Path, prompt_file: Path, tmp_path: Path) -> None:
    """A group of one has advantage 0 whatever its reward: the gradient and the update are zero
    (LoRA's B starts at zero and stays there)."""
    output_dir = tmp_path / "grpo"
    flags = as_flags(_overrides(tiny_model_dir, prompt_file, output_dir, group_size=1))
    assert grpo_recipe.main([*flags, "--reward", LENGTH_REWARD]) == 0
    assert logged(output_dir, "grad_norm") == {1: 0.0, 2: 0.0}
    assert any(value > 0 for value in logged(output_dir, "reward").values())
    weights = load_file(output_dir / "adapter_model.safetensors")
    assert all(not tensor.any() for name, tensor in weights.items() if "lora_B" in name)


def test_a_run_on_top_of_an_sft_adapter_keeps_it_as_the_reference(
        tiny_model_dir: Path, prompt_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sft_dir = tmp_path / "sft"
    train, val = write_prepared_split(tmp_path / "sft_data")
    assert sft_main(as_flags(tiny_run_overrides(tiny_model_dir, train, val, sft_dir, max_steps=2,
                                                learning_rate=5e-2))) == 0
    output_dir = tmp_path / "grpo"
    config = build_config(overrides=_overrides(tiny_model_dir, prompt_file, output_dir, beta=0.1, max_steps=1,
                                               sft_adapter=str(sft_dir)), config_class=GRPOConfig)
    run = grpo_recipe.train(config, rewards=[LENGTH_REWARD])
    assert (output_dir / "sft_adapter" / "adapter_model.safetensors").read_bytes() == \
        (sft_dir / "adapter_model.safetensors").read_bytes()
    assert logged(output_dir, "kl")[1] < 1e-6  # the new adapter starts as the identity on the SFT model
    probe = torch.tensor([[1, 5, 9, 23, 42, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
        sft_logits = PeftModel.from_pretrained(base, str(sft_dir)).merge_and_unload()(input_ids=probe).logits
        model = run.trainer.model.eval()
        with model.disable_adapter():
            reference_logits = model(input_ids=probe).logits
    torch.testing.assert_close(reference_logits, sft_logits, atol=1e-5, rtol=1e-5)  # the reference is the SFT model
    assert not torch.allclose(sft_logits, base_logits, atol=1e-3)
    # a GRPO run is no SFT run to start from
    flags = as_flags(_overrides(tiny_model_dir, prompt_file, tmp_path / "again", sft_adapter=output_dir))
    capsys.readouterr()
    assert grpo_recipe.main(flags) == 2
    assert capsys.readouterr().err.startswith(f"error: grpo.sft_adapter: {output_dir} holds a GRPO adapter, not an "
                                              f"SFT run's; GRPO starts from an SFT run")


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_a_resumed_run_logs_what_the_uninterrupted_one_logs(tiny_model_dir: Path, prompt_file: Path,
                                                            tmp_path: Path) -> None:
    """Inside a cycle of num_iterations = 2 steps too: checkpoint-3 holds step 3's samples, and
    step 4 trains on them (the clip and the KL at work)."""
    overrides = {"max_steps": 4, "save_steps": 3, "num_iterations": 2, "beta": 0.1, "epsilon": 0.05}
    config = build_config(overrides=_overrides(tiny_model_dir, prompt_file, tmp_path / "whole", **overrides),
                          config_class=GRPOConfig)
    grpo_recipe.train(config, rewards=[LENGTH_REWARD])
    split = build_config(overrides=_overrides(tiny_model_dir, prompt_file, tmp_path / "split", **overrides),
                         config_class=GRPOConfig)
    grpo_recipe.train(split, rewards=[LENGTH_REWARD], callbacks=[StopAt(3)])
    assert (tmp_path / "split" / "checkpoint-3" / SAMPLES_FILE).is_file()
    assert sorted(logged(tmp_path / "split")) == [1, 2, 3]
    grpo_recipe.train(split, rewards=[LENGTH_REWARD], resume="latest")
    for key in ("loss", "reward", "kl", "clip_fraction", "answer_tokens", "grad_norm"):
        whole, resumed = logged(tmp_path / "whole", key), logged(tmp_path / "split", key)
        assert sorted(whole) == [1, 2, 3, 4], key
        assert resumed == pytest.approx(whole, abs=1e-6), key
    assert all(value > 0 for value in logged(tmp_path / "whole", "grad_norm").values())
    assert any(value > 0 for value in logged(tmp_path / "whole", "kl").values())  # the adapter moved


def test_a_user_reward_function_is_called_with_prompts_completions_and_records(
        tiny_model_dir: Path, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "calls = []\n"
        "def topic_reward(prompts, completions, records):\n"
        "    calls.append((prompts, completions, records))\n"
        "    return [1.0 if r['topic'] in p[-1]['content'] else 0.0 for p, r in zip(prompts, records)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    output_dir = tmp_path / "grpo"
    flags = as_flags(_overrides(tiny_model_dir, prompt_file, output_dir, verifier="false", max_steps=1))
    assert grpo_recipe.main([*flags, "--reward", "my_rewards:topic_reward"]) == 0
    import my_rewards

    prompts, completions, records = my_rewards.calls[0]
    assert len(prompts) == len(completions) == len(records) == 2 * 3  # 2 prompts x 3 answers
    assert logged(output_dir, "reward") == {1: 1.0}
    assert "pass_rate" not in json.loads((output_dir / "trainer_state.json").read_text())["log_history"][0]


def test_a_reward_function_that_raises_is_a_one_line_error_naming_it(
        tiny_model_dir: Path, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad_rewards.py").write_text("def broken(prompts, completions, records):\n"
                                             "    raise KeyError('score')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = as_flags(_overrides(tiny_model_dir, prompt_file, tmp_path / "grpo", max_steps=1))
    assert grpo_recipe.main([*flags, "--reward", "bad_rewards:broken"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # one line (after the progress bar's carriage return)
    assert err.count("error") == 1 and "error: --reward bad_rewards:broken raised KeyError: 'score'\n" in err
    assert grpo_recipe.main([*flags, "--reward", "bad_rewards:missing"]) == 2
    # refused before any model is loaded
    assert capsys.readouterr().err == "error: --reward bad_rewards:missing: bad_rewards has no function 'missing'\n"


def test_a_record_without_instructions_is_refused_naming_the_line(tiny_model_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}],
                                                "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
                                               {"messages": [{"role": "user", "content": "hello"}]}])
    assert grpo_recipe.main(as_flags(_overrides(tiny_model_dir, bad, tmp_path / "grpo"))) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}:2: field 'instruction_id_list' must be")


def test_accumulated_micro_batches_train_what_one_batch_of_the_step_trains(tiny_model_dir: Path, prompt_file: Path,
                                                                            tmp_path: Path) -> None:
    """The loss is divided by the answer tokens of the whole step, not of each micro-batch: two
    micro-batches of one prompt give the loss and gradient of one micro-batch of two."""
    logs = {}
    for name, batch, accumulation in (("one", 2, 1), ("two", 1, 2)):
        config = build_config(overrides=_overrides(tiny_model_dir, prompt_file, tmp_path / name, max_steps=1,
                                                   batch_size=batch, gradient_accumulation_steps=accumulation),
                              config_class=GRPOConfig)
        grpo_recipe.train(config, rewards=[LENGTH_REWARD])
        logs[name] = {key: logged(tmp_path / name, key)[1] for key in ("loss", "grad_norm", "reward")}
    assert logs["one"]["grad_norm"] > 0
    assert logs["two"] == pytest.approx(logs["one"], rel=1e-4, abs=1e-6)


def test_fewer_prompts_than_a_step_takes_is_refused_before_the_model_loads(
        tiny_model_dir: Path, prompt_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sft.training.stages

    monkeypatch.setattr(sft.training.stages, "load_model", lambda *args, **kwargs: pytest.fail("model loaded"))
    flags = as_flags(_overrides(tiny_model_dir, prompt_file, tmp_path / "grpo", batch_size=4,
                                gradient_accumulation_steps=2))
    assert grpo_recipe.main(flags) == 2
    assert capsys.readouterr().err == (f"error: {prompt_file}: 6 usable prompts, fewer than the 8 one optimizer step "
                                       f"takes (batch_size x gradient_accumulation_steps x processes); lower "
                                       f"--batch-size or --gradient-accumulation-steps\n")


def test_answers_are_sampled_through_merged_weights_and_training_runs_on_the_base(
        tiny_model_dir: Path, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling, the long part of a step, runs each adapted layer as one matmul (the adapter merged
    into a copy of the weights); the gradient steps see the base weights and the adapter apart."""
    from peft.tuners.lora import LoraLayer

    from sft.training import grpo_trainer

    merged_while_sampling, base_pointers = [], []
    real = grpo_trainer.sample_answers

    def recording(model, *args, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        merged_while_sampling.append(all(m.merged for m in layers))
        return real(model, *args, **kwargs)

    real_loss = grpo_trainer.GRPOTrainer.compute_loss

    def recording_loss(self, model, *args, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        base_pointers.append((not any(m.merged for m in layers),
                              tuple(m.base_layer.weight.data_ptr() for m in layers)))
        return real_loss(self, model, *args, **kwargs)

    allocator = []
    monkeypatch.setattr(grpo_trainer, "sample_answers", recording)
    monkeypatch.setattr(grpo_trainer.GRPOTrainer, "compute_loss", recording_loss)
    from sft.training import stages

    monkeypatch.setattr(stages, "keep_freed_cpu_memory", lambda: allocator.append("kept") or True)
    assert cli_main(["grpo", *as_flags(_overrides(tiny_model_dir, prompt_file, tmp_path / "grpo"))]) == 0
    assert allocator == ["kept"]  # on a CPU, as every run
    assert merged_while_sampling == [True, True]
    assert len(base_pointers) == 2 and base_pointers[0] == base_pointers[1] and base_pointers[0][0]  # unmerged


def test_sharing_each_prompt_trains_what_a_copy_per_answer_trains(tiny_model_dir: Path, prompt_file: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """On the CPU a group's answers are packed after one copy of their prompt; the loss, gradient
    norm and rewards of each step (with a KL term and two iterations, so old and reference
    log-probs go through it too) are those of a copy of the prompt per answer."""
    from sft.training import grpo_trainer

    shared_rows = []
    real = grpo_trainer.pack_shared_prompts
    monkeypatch.setattr(grpo_trainer, "pack_shared_prompts", lambda sequences: shared_rows.append(1) or real(sequences))
    logs = {}
    for share in (None, False):
        output_dir = tmp_path / str(share)
        changes = {"beta": 0.1, "num_iterations": 2} | ({} if share is None else {"share_prompts": share})
        config = build_config(overrides=_overrides(tiny_model_dir, prompt_file, output_dir, **changes),
                              config_class=GRPOConfig)
        grpo_recipe.train(config, rewards=[LENGTH_REWARD])
        logs[share] = {key: logged(output_dir, key) for key in ("loss", "grad_norm", "reward", "kl")}
        if share is None:
            assert shared_rows, "the CPU default packs shared prompts"
            shared_rows.clear()
    assert not shared_rows
    assert logs[None]["grad_norm"][1] > 0
    for key, values in logs[False].items():
        assert logs[None][key] == pytest.approx(values, rel=1e-4, abs=1e-6), key


def test_sharing_prompts_without_packing_is_refused(tiny_model_dir: Path, prompt_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    flags = as_flags(_overrides(tiny_model_dir, prompt_file, tmp_path / "grpo", share_prompts=True, packing=False))
    assert grpo_recipe.main(flags) == 2
    assert "grpo.share_prompts: true needs data.packing: true" in capsys.readouterr().err
