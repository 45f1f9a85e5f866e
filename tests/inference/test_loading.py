"""One run loader for eval, chat and merge: adapters must fit their base, no code runs from a run
directory, damaged adapters and empty validation sets are named, prompts must fit the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sft.config import RUN_CONFIG_FILE, build_config
from sft.errors import ConfigError, DataError, ModelNotFoundError
from sft.export.merge import main as merge_main
from sft.inference.chat import ChatSession
from sft.inference.evaluate import main as eval_main
from sft.inference.loading import check_prompt_fits, load_run, run_config
from sft.recipes.sft import train
from tests.tiny import build_tiny_model_dir, build_tokenizer, tiny_run_overrides, write_jsonl, write_prepared_split


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_prepared_split(tmp_path_factory.mktemp("data"))
    output_dir = tmp_path_factory.mktemp("run") / "out"
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir, max_steps=2)))
    return output_dir


@pytest.fixture(scope="module")
def three_layer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("three"), build_tokenizer("chatml"), layers=3)


def test_an_adapter_loads_into_the_base_it_was_trained_on(trained: Path) -> None:
    run = load_run(trained, run_config(trained))
    assert run.has_adapter and run.adapter_dir == trained


@pytest.mark.parametrize("direction", ["adapter has fewer layers", "adapter has more layers"])
def test_an_adapter_is_refused_on_a_base_of_another_depth(trained: Path, three_layer_model: Path, tiny_model_dir: Path,
                                                          tmp_path: Path, direction: str) -> None:
    """PEFT alone loads a 2-layer adapter into a 3-layer model (the third layer's LoRA stays at zero)
    and the reverse (extra weights ignored), and the model answers garbage without a word."""
    adapter = trained
    base = three_layer_model
    if direction == "adapter has more layers":
        deep = tmp_path / "deep"
        data = write_prepared_split(tmp_path / "data")
        train(build_config(None, tiny_run_overrides(three_layer_model, *data, deep, max_steps=1)))
        adapter, base = deep, tiny_model_dir
    with pytest.raises(ModelNotFoundError, match=rf"does not fit the base model '{base}'.*trained on .*--model"):
        load_run(adapter, run_config(adapter), model_name=str(base))
    assert eval_main(["--adapter", str(adapter), "--model", str(base)]) == 2


def test_trust_remote_code_is_never_read_from_a_run_directory(trained: Path, tmp_path: Path) -> None:
    """A handed-over run whose config says trust_remote_code: true and whose tokenizer config maps
    to a .py file beside it: loading must not import that file."""
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(trained, hostile, ignore=shutil.ignore_patterns("checkpoint-*"))
    saved = yaml.safe_load((hostile / RUN_CONFIG_FILE).read_text())
    saved["model"]["trust_remote_code"] = True
    (hostile / RUN_CONFIG_FILE).write_text(yaml.safe_dump(saved))
    marker = tmp_path / "code-ran"
    (hostile / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                               "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    tokenizer_config = json.loads((hostile / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (hostile / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = run_config(hostile)
    assert config.model.trust_remote_code is False
    load_run(hostile, config)
    assert not marker.exists()
    # Negative control: the directory is hostile indeed; the command-line flag lets its code run
    # (in another process: imported remote code changes transformers' state for the rest of this one).
    import subprocess
    import sys

    code = ("from sft.inference.loading import load_run, run_config; "
            f"load_run({str(hostile)!r}, run_config({str(hostile)!r}, overrides={{'trust_remote_code': True}}))")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300,
                   cwd=Path(__file__).resolve().parents[2])
    assert marker.exists()


def test_a_truncated_adapter_is_named(trained: Path, tmp_path: Path) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelNotFoundError, match=r"adapter_model\.safetensors: truncated"):
        load_run(damaged, run_config(damaged))


def test_evaluation_with_no_validation_token_is_an_error_not_a_perfect_score(trained: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    assert eval_main(["--output-dir", str(trained), "--max-seq-length", "8"]) == 2
    assert "no validation token to score" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert eval_main(["--output-dir", str(trained), "--val-file", str(empty)]) == 2
    assert f"{empty}: no validation token" in capsys.readouterr().err


def test_a_prompt_longer_than_the_model_reads_is_refused(trained: Path) -> None:
    run = load_run(trained, run_config(trained))
    check_prompt_fits(run, 200, 56)  # 256 positions: fits exactly
    with pytest.raises(ConfigError, match="takes 256 positions"):
        check_prompt_fits(run, 201, 56)
    session = ChatSession(run, None, temperature=0.0, top_p=1.0, max_new_tokens=8)
    with pytest.raises(ConfigError, match="positions"):
        session.reply("word " * 400)
    assert session.history == []


def test_ctrl_c_while_an_answer_streams_stops_it_and_keeps_the_session(trained: Path, monkeypatch) -> None:
    run = load_run(trained, run_config(trained))
    session = ChatSession(run, None, temperature=0.0, top_p=1.0, max_new_tokens=8)
    real_generate = run.model.generate

    def interrupted(**kwargs):  # noqa: ANN003, ANN202
        streamer = kwargs["streamer"]
        streamer.put(kwargs["input_ids"][0])  # the prompt comes first
        streamer.put(run.tokenizer("red", add_special_tokens=False, return_tensors="pt").input_ids[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(run.model, "generate", interrupted)
    assert session.reply("Name a color.", stream=True) == "red"
    monkeypatch.setattr(run.model, "generate", real_generate)
    session.reply("Another?")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]


def test_merge_refuses_a_file_and_never_touches_a_neighbouring_tmp_folder(trained: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "merged"
    a_file.write_text("mine")
    assert merge_main(["--adapter", str(trained), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"
    users = tmp_path / "out.tmp"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    assert merge_main(["--adapter", str(trained), "--out", str(tmp_path / "out")]) == 0
    assert (users / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind
    assert merge_main(["--adapter", str(trained), "--out", str(tmp_path / "missing" / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_data_error_in_eval_names_the_file(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "val.jsonl"
    broken.write_text('{"messages": [}\n')
    assert eval_main(["--output-dir", str(trained), "--val-file", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err
    assert DataError  # the error type the message comes from
