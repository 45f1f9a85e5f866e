"""Bad export requests are one `error:` line and leave no file behind (read-only and missing
folders, bad model directories: tests/reliability/test_errors.py)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from sft.config import ConfigError
from sft.export.gguf import main as export_main
from tests.reliability.helpers import assert_user_error, run_python
from tests.tiny import build_tokenizer


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_an_unknown_family_is_one_line_listing_the_exported_ones(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer("chatml")
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    out.mkdir()
    status = export_main(["--model", str(model_dir), "--gguf", str(out / "m.gguf")])
    assert_user_error(status, capsys.readouterr().err, "model type 'gpt2' has no GGUF export", "llama", "gemma2",
                      "cohere")
    assert leftovers(out) == []


def test_an_unsupported_precision_is_refused_before_the_model_loads(tiny_model_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    status = export_main(["--model", str(tiny_model_dir), "--gguf", str(tmp_path / "m.gguf"), "--precision", "q3_k_s"])
    assert_user_error(status, capsys.readouterr().err, "--precision q3_k_s", "f32, f16, bf16, q8_0, q4_0",
                      "q4_k_m, q5_k_m, q6_k")
    assert leftovers(tmp_path) == []


def test_k_quants_without_llama_cpp_name_the_package_and_the_alternatives(tiny_model_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    status = export_main(["--model", str(tiny_model_dir), "--gguf", str(tmp_path / "m.gguf"), "--precision", "q4_k_m"])
    assert_user_error(status, capsys.readouterr().err, "--precision q4_k_m", "llama-cpp-python is not installed",
                      "`pip install llama-cpp-python`", "20 minutes", "q8_0 or q4_0")
    assert leftovers(tmp_path) == []


def test_a_failing_quantizer_leaves_neither_the_f16_file_nor_a_partial_output(tiny_model_dir: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              capsys: pytest.CaptureFixture) -> None:
    import sft.export.gguf as exporter

    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))  # importable; quantize replaced
    seen = []

    def fail_midway(source: Path, out: Path, precision: str) -> list[str]:
        seen.append(source.stat().st_size)  # the f16 file is written first
        out.write_bytes(b"GGUF, half written")
        raise ConfigError(f"--precision {precision}: llama.cpp's quantizer failed on {source.name} (status 1)")

    monkeypatch.setattr(exporter, "quantize", fail_midway)
    status = export_main(["--model", str(tiny_model_dir), "--gguf", str(tmp_path / "m.gguf"), "--precision", "q6_k"])
    assert_user_error(status, capsys.readouterr().err, "llama.cpp's quantizer failed on model-f16.gguf")
    assert seen and seen[0] > 0
    assert leftovers(tmp_path) == []


def test_a_write_failing_midway_is_one_line_and_leaves_no_partial_file(tiny_model_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    import errno

    import gguf

    def fill_the_disk(writer, *args, **kwargs):
        writer.fout[0].write(b"\0" * 1000)  # part of the file is on disk when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fill_the_disk)
    status = export_main(["--model", str(tiny_model_dir), "--gguf", str(tmp_path / "m.gguf"), "--no-verify"])
    assert_user_error(status, capsys.readouterr().err, "No space left on device")
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_no_room_on_disk_is_one_line_and_leaves_no_partial_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Writes beyond 20 kB fail as on a full disk (the file is about 60 kB); a fresh process, as
    a user runs it (about 20 s of imports on a busy machine)."""
    done = run_python("-m", "sft.cli", "export", "--model", str(tiny_model_dir), "--gguf", str(tmp_path / "m.gguf"),
                      "--precision", "f32", "--no-verify", file_size_limit=20_000)
    assert_user_error(done.returncode, done.stderr, str(tmp_path))
    assert leftovers(tmp_path) == []


def test_an_unrecognized_chat_template_with_ollama_removes_the_exported_file(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    from tests.families import build_family_model_dir

    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    model_dir = build_family_model_dir(tmp_path / "model", "llama", tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    status = export_main(["--model", str(model_dir), "--gguf", str(out / "m.gguf"), "--ollama", "--no-verify"])
    assert_user_error(status, capsys.readouterr().err, "--ollama", "TEMPLATE by hand", f"({out / 'm.gguf'} removed)")
    assert leftovers(out) == []
