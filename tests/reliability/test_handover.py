"""Adapters and checkpoints handed from one command to another are verified by content: an adapter
records its base's fingerprint and is refused on another base of the same shapes (naming both),
``--sft-adapter`` must be an SFT run, a resume must keep the method (SFT or DPO) and the data's
content, and a DPO run refused at its start leaves no copy of the SFT adapter behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sft.errors import ResourceError
from sft.inference.chat import main as chat_main
from sft.modeling.fingerprint import ADAPTER_ORIGIN
from sft.recipes import dpo as dpo_recipe
from sft.recipes.sft import main as sft_main
from sft.training.checkpoints import SFT_ADAPTER_DIR
from tests.reliability.helpers import assert_user_error
from tests.tiny import as_flags, build_tiny_model_dir, build_tokenizer, tiny_run_overrides, write_prepared_split
from tests.training.tiny_pairs import write_preference_split


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_prepared_split(tmp_path_factory.mktemp("sft_data"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_preference_split(tmp_path_factory.mktemp("pairs"), n_train=8, n_val=2)


def sft_flags(model: Path, data: tuple[Path, Path], output_dir: Path, **changes: object) -> list[str]:
    return as_flags(tiny_run_overrides(model, *data, output_dir, **{"max_steps": 2, "save_steps": 1, **changes}))


def dpo_flags(model: Path, pairs: tuple[Path, Path], output_dir: Path, **changes: object) -> list[str]:
    return as_flags(tiny_run_overrides(model, *pairs, output_dir, **{
        "max_steps": 2, "save_steps": 1, "max_seq_length": 128, "batch_size": 2, "eval_batch_size": 2,
        **changes}))


@pytest.fixture(scope="module")
def base_run(tiny_model_dir: Path, sft_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "base"
    assert sft_main(sft_flags(tiny_model_dir, sft_data, run)) == 0
    return run


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, base_run: Path, pairs: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "dpo1"
    assert dpo_recipe.main(dpo_flags(tiny_model_dir, pairs, run, sft_adapter=base_run)) == 0
    return run


@pytest.fixture(scope="module")
def other_weights(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's shapes and tokenizer with other weights (another random init)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("other_weights")
    model.save_pretrained(path)
    build_tokenizer("chatml").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's shapes and weights (same seed) with another tokenizer of the same size."""
    tokenizer = build_tokenizer("zephyr")
    assert len(tokenizer) == len(build_tokenizer("chatml"))
    return build_tiny_model_dir(tmp_path_factory.mktemp("tinyz"), tokenizer)


@pytest.mark.parametrize("other, difference", [("other_weights", "input embeddings have other weights"),
                                               ("other_vocabulary", "another vocabulary")])
def test_an_adapter_is_refused_on_another_base_of_the_same_shapes_naming_both(
        base_run: Path, tiny_model_dir: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
        other: str, difference: str) -> None:
    other_base = request.getfixturevalue(other)
    status = chat_main(["--adapter", str(base_run), "--model", str(other_base), "--device", "cpu",
                        "--prompt", "hi", "--max-new-tokens", "2"])
    assert_user_error(status, capsys.readouterr().err, str(base_run), f"base model {str(other_base)!r}",
                      difference, f"trained on {str(tiny_model_dir)!r}")


def test_an_adapter_loads_on_its_own_base_and_one_saved_before_fingerprints_loads_with_a_note(
        base_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for adapter in (base_run, base_run / "checkpoint-1"):
        assert (adapter / ADAPTER_ORIGIN).is_file()
        assert chat_main(["--adapter", str(adapter), "--device", "cpu", "--prompt", "hi",
                          "--max-new-tokens", "2"]) == 0
    assert "unchecked" not in capsys.readouterr().err
    old = tmp_path / "old"
    shutil.copytree(base_run, old)
    (old / ADAPTER_ORIGIN).unlink()
    assert chat_main(["--adapter", str(old), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and f"{old} does not record which base" in err


@pytest.mark.parametrize("given", ["run", "checkpoint"])
def test_sft_adapter_must_be_an_sft_run(dpo_run: Path, tiny_model_dir: Path, pairs: tuple[Path, Path],
                                        tmp_path: Path, capsys: pytest.CaptureFixture, given: str) -> None:
    adapter = dpo_run if given == "run" else dpo_run / "checkpoint-1"
    status = dpo_recipe.main(dpo_flags(tiny_model_dir, pairs, tmp_path / "x", sft_adapter=adapter))
    assert_user_error(status, capsys.readouterr().err, f"dpo.sft_adapter: {adapter} holds a DPO adapter",
                      str(dpo_run / SFT_ADAPTER_DIR))
    assert not (tmp_path / "x").exists() or list((tmp_path / "x").iterdir()) == []


def test_a_dpo_run_refused_at_its_start_leaves_no_sft_adapter_copy(
        other_weights: Path, sft_data: tuple[Path, Path], tiny_model_dir: Path, pairs: tuple[Path, Path],
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    foreign = tmp_path / "foreign"  # an SFT run on another base of the same shapes
    assert sft_main(sft_flags(other_weights, sft_data, foreign)) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    status = dpo_recipe.main(dpo_flags(tiny_model_dir, pairs, out, sft_adapter=foreign))
    assert_user_error(status, capsys.readouterr().err, str(foreign), "other weights")
    assert not (out / SFT_ADAPTER_DIR).exists()


def test_a_resume_across_methods_is_refused(base_run: Path, dpo_run: Path, tiny_model_dir: Path,
                                            sft_data: tuple[Path, Path], pairs: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    status = sft_main([*sft_flags(tiny_model_dir, sft_data, tmp_path / "a", max_steps=3), "--resume",
                       str(dpo_run / "checkpoint-1")])
    assert_user_error(status, capsys.readouterr().err, "--resume: the method is 'SFT'", "with 'DPO'")
    status = dpo_recipe.main([*dpo_flags(tiny_model_dir, pairs, tmp_path / "b", max_steps=3), "--resume",
                              str(base_run / "checkpoint-1")])
    assert_user_error(status, capsys.readouterr().err, "--resume: the method is 'DPO'", "with 'SFT'")
    for output_dir in (tmp_path / "a", tmp_path / "b"):
        assert not output_dir.exists() or list(output_dir.iterdir()) == []


def test_a_dpo_resume_after_the_pairs_were_edited_is_refused(tiny_model_dir: Path, base_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    pairs = write_preference_split(tmp_path / "pairs", n_train=8, n_val=2)
    run = tmp_path / "run"
    assert dpo_recipe.main(dpo_flags(tiny_model_dir, pairs, run, max_steps=1, sft_adapter=base_run)) == 0
    lines = pairs[0].read_text(encoding="utf-8").splitlines()
    pairs[0].write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    capsys.readouterr()
    status = dpo_recipe.main([*dpo_flags(tiny_model_dir, pairs, run, max_steps=2, sft_adapter=base_run),
                              "--resume"])
    assert_user_error(status, capsys.readouterr().err, f"data.train_file {pairs[0]} is not the file")


def test_a_new_dpo_run_that_fails_before_its_first_checkpoint_removes_its_sft_adapter_copy(
        tiny_model_dir: Path, base_run: Path, pairs: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> None:
        assert (tmp_path / "out" / SFT_ADAPTER_DIR / "adapter_config.json").is_file()  # copied by now
        raise ResourceError("out of memory while scoring the reference")

    monkeypatch.setattr(dpo_recipe, "with_reference_logps", out_of_memory)
    status = dpo_recipe.main(dpo_flags(tiny_model_dir, pairs, tmp_path / "out", sft_adapter=base_run))
    assert_user_error(status, capsys.readouterr().err, "out of memory")
    assert not (tmp_path / "out" / SFT_ADAPTER_DIR).exists()
