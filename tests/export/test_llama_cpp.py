"""llama.cpp itself, through llama-cpp-python where it is installed (it compiles llama.cpp from
source and is not a dependency, so these are skipped without it): it runs every family's f32 file
with the merged model's logits, its quantizer writes the k-quants, which `--verify` reads back
with transformers and llama.cpp, and its check names what differs."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sft.config import ConfigError
from sft.export import gguf_vocab
from sft.export.gguf import main as export_main
from sft.export.quantize import quantize
from sft.export.verify import REPLY_PROMPTS, VerificationError, check_with_llama_cpp
from tests.export.conftest import probe_hash
from tests.export.test_gguf_families import export_quietly, family_dir
from tests.families import FAMILIES, build_family_model, build_family_model_dir
from tests.tiny import build_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                    "llama-cpp-python; it compiles for about 20 minutes): llama.cpp "
                                                    "parity and k-quants are not checked")

Q = gguf.GGMLQuantizationType


def llama_cpp_last_logits(gguf_file: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=128, logits_all=True, vocab_only=False, verbose=False,
                          n_threads=1)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[len(ids) - 1])
    finally:
        llm.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_every_familys_f32_file_with_the_models_logits(tmp_path: Path, family: str) -> None:
    """The last token's logits from llama.cpp's own kernels, within 0.02 standard deviations of
    transformers' (0.008 measured), and the same next token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = family_dir(tmp_path, family)
    gguf_file = export_quietly(model_dir, tmp_path / f"{family}.gguf", "f32")
    ids = AutoTokenizer.from_pretrained(model_dir)(REPLY_PROMPTS[0]).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    actual = llama_cpp_last_logits(gguf_file, ids)
    assert np.abs(actual - expected).max() <= 0.02 * expected.std(), np.abs(actual - expected).max() / expected.std()
    assert actual.argmax() == expected.argmax()


@pytest.mark.parametrize("precision, types", [("q4_k_m", {Q.Q4_K, Q.Q6_K}), ("q5_k_m", {Q.Q5_K, Q.Q6_K}),
                                              ("q6_k", {Q.Q6_K})])
def test_k_quants_are_written_by_llama_cpp_and_pass_verify(tmp_path: Path, precision: str, types: set,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A Llama whose rows are 256 wide, as k-quant blocks are: llama.cpp's mix of types (q4_k_m
    keeps the tied embedding and half the attention value and down projections at q6_k), read back
    within the k-quant's tolerance by transformers and llama.cpp; only the quantized file is left."""
    model_dir = build_family_model_dir(tmp_path / "model", "llama", build_tokenizer("chatml"), hidden_size=256,
                                       intermediate_size=512, initializer_range=0.1)
    out = tmp_path / "out"
    out.mkdir()
    assert export_main(["--model", str(model_dir), "--gguf", str(out / "m.gguf"), "--precision", precision,
                        "--verify"]) == 0
    printed = capsys.readouterr().out
    assert f"quantizing to {precision} with llama.cpp" in printed and "verify: passed" in printed
    assert "verify: transformers' GGUF reader: logits within" in printed and "verify: llama.cpp: same tokens" in printed
    assert sorted(path.name for path in out.iterdir()) == ["m.gguf"]
    written = {tensor.tensor_type for tensor in gguf.GGUFReader(out / "m.gguf").tensors}
    assert written == types | {Q.F32}  # norms and biases stay f32


def test_llama_cpps_quantizer_failing_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match=r"--precision q6_k: llama.cpp's quantizer failed on bad.gguf: .*fail"):
        quantize(tmp_path / "bad.gguf", tmp_path / "out.gguf", "q6_k")


def test_the_llama_cpp_check_names_the_first_difference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another model's logits, and a file whose unknown pre-tokenizer ('default') llama.cpp splits
    with another regex than training's."""
    from transformers import AutoTokenizer

    model_dir = family_dir(tmp_path, "llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gguf_file = export_quietly(model_dir, tmp_path / "m.gguf", "f32")
    other = build_family_model("llama", build_tokenizer("chatml"), seed=1)
    with pytest.raises(VerificationError, match=r"llama.cpp's logits differ on prompt 'Describe the ocean in one "
                                                r"sentence\.' at position \d+, token \d+: "):
        check_with_llama_cpp(other, tokenizer, gguf_file, "f32", log=lambda line: None)
    monkeypatch.delitem(gguf_vocab.PRE_TOKENIZERS, probe_hash(build_tokenizer("chatml")))
    default_file = export_quietly(model_dir, tmp_path / "default.gguf", "f32")
    with pytest.raises(VerificationError, match=r"llama.cpp's tokens differ on probe 'digits' at token \d+: the "
                                                r"model's tokenizer gives '.+', llama.cpp '.+'"):
        check_with_llama_cpp(other, tokenizer, default_file, "f32", log=lambda line: None)
