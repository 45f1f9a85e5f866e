"""GGUF export per family: the file read back by readers that share no code with the writer
gives the model's tokens, logits and greedy replies; the hyper-parameters llama.cpp reads are
written under its keys; a file that does not match is caught by `--verify` with the probe named."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sft.export import gguf_vocab
from sft.export.gguf import export_gguf, llama3_rope_factors
from sft.export.verify import VerificationError, verify_gguf
from tests.families import FAMILIES, build_family_model_dir
from tests.tiny import build_tokenizer

LLAMA_CPP_SHAPE = {
    "mistral": {"sliding_window": None},  # as Mistral 7B v0.2+; llama.cpp's llama has no window
    "qwen2": {"use_sliding_window": False},  # as every released Qwen2/2.5/3 config
    "qwen3": {"use_sliding_window": False},
    "gemma2": {"query_pre_attn_scalar": 16},  # head_dim, as Gemma 2 2B/9B; llama.cpp scales by head_dim
    "gemma3_text": {"query_pre_attn_scalar": 16},
    "smollm3": {"use_sliding_window": False, "no_rope_layer_interval": 4},  # as SmolLM3-3B
    "phi3": {"sliding_window": 64},  # longer than every probe (Phi-3-mini: 2047)
    "cohere": {"use_qk_norm": False},  # llama.cpp reads q/k norms only with 64 layers or more (Command R+)
}
"""Each family's tiny model as the released models are configured where llama.cpp can only
express that (the export warns about the rest: see test_what_llama_cpp_cannot_express_is_warned)."""


def family_dir(tmp_path: Path, family: str) -> Path:
    """The family's tiny model, saved under a name that is not its family's: the directory's name
    is the file's general.name, and llama.cpp looks up Phi-3's own special tokens ('</s>', '<s>',
    '<unk>') in every model whose name contains 'phi3', which the tiny vocabulary lacks."""
    return build_family_model_dir(tmp_path / f"tiny-{family}".replace("phi3", "phi"), family,
                                  build_tokenizer("chatml"), **LLAMA_CPP_SHAPE.get(family, {}))


def export_quietly(model_dir: Path, out: Path, precision: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer's pre-tokenizer is unknown to llama.cpp
        return export_gguf(model_dir, out, precision)


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_and_reads_back_with_its_tokens_logits_and_greedy_replies(
        tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = family_dir(tmp_path, family)
    if family == "qwen2":
        # transformers loads this tokenizer as Qwen2's, with Qwen2's digit-splitting regex: the tiny
        # vocabulary's hash then stands for a real Qwen tokenizer, written as llama.cpp's 'qwen2'.
        from transformers import AutoTokenizer
        digest = gguf_vocab.sha256(str(AutoTokenizer.from_pretrained(model_dir).encode(
            gguf_vocab.PRE_TOKENIZER_PROBE)).encode()).hexdigest()
        monkeypatch.setitem(gguf_vocab.PRE_TOKENIZERS, digest, "qwen2")
    gguf_file = export_quietly(model_dir, tmp_path / f"{family}.gguf", "f32")
    lines: list[str] = []
    verify_gguf(model_dir, gguf_file, "f32", log=lines.append)
    assert lines[0] == "verify: tokens match on 7 probes"
    logits = next(line for line in lines if "GGUF reader" in line or "logits not checked" in line)
    if family in ("olmo2", "granite", "cohere", "smollm3"):
        assert "logits not checked by transformers" in logits
    else:
        assert "same greedy replies" in logits and "within 0.00e+00" in logits, lines


@pytest.mark.parametrize("family, precision", [("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"), ("llama", "q4_0"),
                                               ("gemma2", "f16"), ("phi3", "q8_0"), ("qwen3", "q4_0")])
def test_reduced_precisions_stay_within_their_own_tolerances(tmp_path: Path, family: str, precision: str) -> None:
    model_dir = family_dir(tmp_path, family)
    gguf_file = export_quietly(model_dir, tmp_path / f"{family}-{precision}.gguf", precision)
    lines: list[str] = []
    verify_gguf(model_dir, gguf_file, precision, log=lines.append)
    worst = float(next(line for line in lines if "GGUF reader" in line).split("within ")[1].split(" ")[0])
    assert 0 < worst, lines  # it was rounded, and the rounding stayed within the tolerance


def test_llama_biases_get_bias_names_and_norms_stay_f32(tmp_path: Path) -> None:
    """A Llama with attention_bias and mlp_bias: each bias under llama.cpp's `.bias` name,
    permuted as its weight for q and k, kept at f32 in a q4_0 file."""
    from transformers import AutoModelForCausalLM
    model_dir = family_dir(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(2)
    with torch.no_grad():  # biases start at zero: random ones show a misplaced or unpermuted bias
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape))
    model.save_pretrained(model_dir)
    gguf_file = export_quietly(model_dir, tmp_path / "b.gguf", "q4_0")
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        assert tensors[f"blk.1.{name}.bias"].tensor_type == gguf.GGMLQuantizationType.F32
        assert tensors[f"blk.1.{name}.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert "output.weight" not in tensors  # tied: the embedding is the output layer
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    bias = model.model.layers[1].self_attn.q_proj.bias.detach().numpy()
    written = np.asarray(tensors["blk.1.attn_q.bias"].data)
    assert not np.array_equal(written, bias) and np.array_equal(np.sort(written), np.sort(bias))  # permuted
    verify_gguf(model_dir, gguf_file, "q4_0", log=lambda line: None)  # transformers un-permutes it back


@pytest.mark.parametrize("family, expected", [
    ("gemma2", {"general.architecture": "gemma2", "gemma2.attn_logit_softcapping": 3.0,
                "gemma2.final_logit_softcapping": 5.0, "gemma2.attention.sliding_window": 4,
                "gemma2.attention.key_length": 16, "gemma2.attention.sliding_window_pattern": [True, False]}),
    ("gemma3_text", {"general.architecture": "gemma3", "gemma3.final_logit_softcapping": 5.0,
                     "gemma3.attention.sliding_window": 4, "gemma3.attention.sliding_window_pattern": [True, False],
                     "gemma3.rope.freq_base_swa": 10000.0}),
    ("granite", {"general.architecture": "granite", "granite.logit_scale": 4.0, "granite.embedding_scale": 3.0,
                 "granite.residual_scale": 0.5, "granite.attention.scale": 0.4}),
    ("cohere", {"general.architecture": "command-r", "command-r.logit_scale": 0.3,
                "command-r.attention.layer_norm_epsilon": 1e-5}),
    ("phi3", {"general.architecture": "phi3", "phi3.attention.sliding_window": 64, "phi3.rope.dimension_count": 16}),
    ("mistral", {"general.architecture": "llama", "llama.attention.key_length": 16, "llama.rope.dimension_count": 16}),
    ("olmo2", {"general.architecture": "olmo2", "olmo2.attention.layer_norm_rms_epsilon": 1e-5}),
    ("qwen3", {"general.architecture": "qwen3", "qwen3.attention.key_length": 16}),
])
def test_family_hyper_parameters_are_written_under_llama_cpp_keys(tmp_path: Path, family: str,
                                                                   expected: dict) -> None:
    written = fields(export_quietly(family_dir(tmp_path, family), tmp_path / "f.gguf", "f16"))
    for key, value in expected.items():
        assert written[key] == pytest.approx(value), key


def test_gemma_norms_are_written_as_llama_cpp_multiplies_them(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    model_dir = family_dir(tmp_path, "gemma2")
    tensors = {t.name: t for t in gguf.GGUFReader(export_quietly(model_dir, tmp_path / "g.gguf", "f32")).tensors}
    weight = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"].data, weight + 1.0, rtol=0, atol=0)


def test_llama3_rope_scaling_is_written_as_the_frequencies_transformers_uses(tmp_path: Path) -> None:
    """Llama 3.x: the rope_freqs tensor divides each base frequency down to transformers' own
    llama3-scaled frequency (computed here by transformers, not by our code)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    tokenizer = build_tokenizer("llama3")
    config = AutoConfig.for_model("llama", hidden_size=256, num_attention_heads=2, rope_parameters=rope,
                                  max_position_embeddings=512)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = llama3_rope_factors(config)
    assert factors.shape == (64,) and factors.min() == 1.0 and factors.max() == 8.0
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-4)

    model_dir = build_family_model_dir(tmp_path / "llama3", "llama", tokenizer, rope_parameters=rope)
    gguf_file = export_quietly(model_dir, tmp_path / "llama3.gguf", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    assert tensors["rope_freqs.weight"].data.shape == (8,)  # head_dim 16: 8 rotary pairs
    verify_gguf(model_dir, gguf_file, "f32", log=lambda line: None)


def test_verify_names_the_probe_and_the_first_difference(tmp_path: Path) -> None:
    model_dir = family_dir(tmp_path, "llama")
    gguf_file = export_quietly(model_dir, tmp_path / "m.gguf", "f32")
    other = build_family_model_dir(tmp_path / "other", "llama", build_tokenizer("chatml"), seed=1)
    with pytest.raises(VerificationError, match=r"logits differ on prompt 'Describe the ocean in one sentence\.' "
                                                r"at position \d+, token \d+: model -?\d+\.\d+, GGUF"):
        verify_gguf(other, gguf_file, "f32", log=lambda line: None)
    retokenized = build_family_model_dir(tmp_path / "retok", "llama", build_tokenizer("llama3"))
    with pytest.raises(VerificationError, match=r"tokens differ on probe 'digits' at token 0"):
        verify_gguf(retokenized, gguf_file, "f32", log=lambda line: None)


def test_what_llama_cpp_cannot_express_is_warned(tmp_path: Path) -> None:
    """The tiny models as the training tests use them (windows shorter than any example, Gemma's
    query scale apart from head_dim): exported with a warning that says what differs, and
    --verify, running the file as llama.cpp runs it, catches the difference."""
    tokenizer = build_tokenizer("chatml")
    mistral = build_family_model_dir(tmp_path / "mistral", "mistral", tokenizer)
    with pytest.warns(UserWarning, match="llama.cpp's llama has no sliding window: the file matches the model on "
                                         "contexts up to 4 tokens only"):
        gguf_file = export_gguf(mistral, tmp_path / "mistral.gguf", "f32")
    with pytest.raises(VerificationError, match="logits differ"):
        verify_gguf(mistral, gguf_file, "f32", log=lambda line: None)
    gemma = build_family_model_dir(tmp_path / "gemma", "gemma2", tokenizer)
    with pytest.warns(UserWarning, match="query_pre_attn_scalar"):
        export_gguf(gemma, tmp_path / "gemma.gguf", "f32")


def test_an_unknown_pre_tokenizer_is_written_as_default_with_a_warning(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.export.conftest import probe_hash

    monkeypatch.delitem(gguf_vocab.PRE_TOKENIZERS, probe_hash(build_tokenizer("chatml")))
    model_dir = family_dir(tmp_path, "llama")
    with pytest.warns(UserWarning, match=r"not one llama.cpp knows \(probe hash [0-9a-f]{16}\.\.\.\): writing "
                                         "'default'"):
        gguf_file = export_gguf(model_dir, tmp_path / "m.gguf", "f16")
    assert fields(gguf_file)["tokenizer.ggml.pre"] == "default"


@pytest.mark.slow
def test_the_bundled_model_is_written_with_llama_cpps_smollm_pre_tokenizer_and_verifies(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.modeling.models import BUNDLED_MODELS, resolve_model_path

    source = resolve_model_path(next(iter(BUNDLED_MODELS)))
    model_dir = tmp_path / "smollm2"
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    for precision in ("q8_0", "q4_0"):
        gguf_file = export_gguf(model_dir, tmp_path / f"smollm2-{precision}.gguf", precision)
        assert fields(gguf_file)["tokenizer.ggml.pre"] == "smollm"
        verify_gguf(model_dir, gguf_file, precision, log=print)


@pytest.mark.parametrize("kind", ["llama-spm-legacy", "llama-spm", "zephyr", "llama3", "plain"])
def test_sentencepiece_and_llama_tokenizers_verify_as_llama_cpp_reads_them(tmp_path: Path, kind: str) -> None:
    """llama.cpp prepends a space to every piece of a SentencePiece text, also to one that starts
    with a space or follows a special token: so does the Llama-2-style tokenizer.json (legacy),
    which verifies; the newer Metaspace layout prepends it at the start only, and --verify names
    the first probe where llama.cpp will tokenize differently from training."""
    from tests.tiny import build_tiny_model_dir

    model_dir = build_tiny_model_dir(tmp_path / kind, build_tokenizer(kind))
    gguf_file = export_quietly(model_dir, tmp_path / f"{kind}.gguf", "f16")
    if kind == "llama-spm":
        with pytest.raises(VerificationError, match=r"tokens differ on probe 'leading space' at token 2: the "
                                                    r"model's tokenizer gives '▁s', the GGUF's '▁'"):
            verify_gguf(model_dir, gguf_file, "f16", log=lambda line: None)
    else:
        verify_gguf(model_dir, gguf_file, "f16", log=lambda line: None)


def test_a_cohere_with_qk_norms_under_64_layers_is_refused_in_one_line(tmp_path: Path) -> None:
    from sft.config import ConfigError

    model_dir = build_family_model_dir(tmp_path / "cohere", "cohere", build_tokenizer("chatml"))
    with pytest.raises(ConfigError, match="reads q/k norms exactly when a model has 64 layers or more"):
        export_gguf(model_dir, tmp_path / "c.gguf", "f16")
    assert not (tmp_path / "c.gguf").exists()
