"""After training: the loss plot and the merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.config import ConfigError, build_config
from sft.export.merge import main as merge_main
from sft.inference.loading import attach_adapter
from sft.recipes.sft import train
from sft.training.plots import main as plot_main
from tests.tiny import tiny_run_overrides, write_prepared_split


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_prepared_split(tmp_path_factory.mktemp("data"))
    output_dir = tmp_path_factory.mktemp("run") / "out"
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir, eval_steps=3)))
    return output_dir


def test_training_writes_a_loss_plot_and_sft_plot_redraws_it(run_dir: Path, tmp_path: Path) -> None:
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert plot_main([str(run_dir), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")
    assert plot_main([str(tmp_path)]) == 2  # not a run directory: a clear error


def test_merged_model_gives_the_logits_of_base_plus_adapter(run_dir: Path, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(run_dir), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapted = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir, "tiny").eval()
    ids = tokenizer("Describe the ocean in one sentence.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        with adapted.disable_adapter():
            assert (adapted(ids).logits - merged(ids).logits).abs().max() > 1e-4
    assert tokenizer.chat_template and merged.generation_config.eos_token_id == [tokenizer.eos_token_id]
    assert merge_main(["--adapter", str(run_dir), "--out", str(out)]) == 2  # never overwrites


def test_tensorboard_without_the_package_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    import importlib.util


    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    data = write_prepared_split(tmp_path / "data")
    config = build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "out", report_to="tensorboard"))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(config)


def test_chat_keeps_the_conversation_in_the_training_format(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import argparse

    from sft.data import tokenize
    from sft.data.templates import render_prompt
    from sft.inference import chat

    args = argparse.Namespace(adapter=str(run_dir), model=None, system_prompt="Be brief.", temperature=0.0,
                              top_p=1.0, max_new_tokens=5, device="cpu", trust_remote_code=False)
    session = chat.open_session(args)
    prompts = []
    monkeypatch.setattr(tokenize, "render_prompt", lambda tok, messages, tools=None: prompts.append(messages)
                        or render_prompt(tok, messages, tools))
    first = session.reply("Name a color.")
    session.reply("And another one?")
    assert prompts[1] == [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Name a color."},
                          {"role": "assistant", "content": first},
                          {"role": "user", "content": "And another one?"}]
    assert render_prompt(session.run.tokenizer, prompts[1]).endswith("<|im_start|>assistant\n")

    lines = iter(["hello", "/reset", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    chat.interact(session)
    assert session.history == [] and "(conversation forgotten)" in capsys.readouterr().out


def test_chat_prompt_prints_one_answer(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from sft.inference.chat import main as chat_main

    assert chat_main(["--adapter", str(run_dir), "--prompt", "Hi", "--temperature", "0",
                      "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert chat_main(["--adapter", str(run_dir.parent), "--prompt", "Hi"]) == 2


@pytest.mark.parametrize("precision", ["f16", "q8_0"])
def test_exported_gguf_loads_in_transformers_with_the_same_greedy_answer(run_dir: Path, tmp_path: Path,
                                                                        precision: str) -> None:
    from sft.export.gguf import main as export_main

    merged_dir = tmp_path / "merged"
    assert merge_main(["--adapter", str(run_dir), "--out", str(merged_dir)]) == 0
    gguf_file = tmp_path / f"model-{precision}.gguf"
    assert export_main(["--model", str(merged_dir), "--gguf", str(gguf_file), "--precision", precision]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    text = "Describe the ocean in one sentence."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert exported_tokenizer(text).input_ids == ids[0].tolist()
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        expected = merged.generate(ids, max_new_tokens=8, do_sample=False)
        actual = exported.generate(ids, max_new_tokens=8, do_sample=False)
    assert actual.tolist() == expected.tolist()
    assert export_main(["--model", str(run_dir), "--gguf", str(tmp_path / "x.gguf")]) == 2  # an adapter dir


TOKENIZER_PROBES = [
    "Describe the ocean in one sentence.",
    " leading space, then  two spaces and a tab\there",
    "Straße, naïve café; wörld (not in the training text) and emoji 🙂🚀🦜",
    "line one\nline two\n\n",
    "<s> and </s> written in the text",
    "日本語 中文 русский",
]


@pytest.mark.parametrize("precision", ["f32", "f16"])
def test_sentencepiece_tokenizer_exports_with_scores_that_reproduce_its_merges(tmp_path: Path,
                                                                             precision: str) -> None:
    """TinyLlama's tokenizer kind: a SentencePiece BPE with byte fallback, written as llama.cpp
    writes it (tokens, scores, types, no merges). Rebuilt from the file, it must split every probe
    exactly as the original does, bytes included, and the model must give the same greedy answer."""
    import gguf

    from sft.export.gguf import main as export_main
    from tests.tiny import build_tiny_model_dir, build_tokenizer

    tokenizer = build_tokenizer("llama-spm")
    model_dir = build_tiny_model_dir(tmp_path / "spm-model", tokenizer)
    gguf_file = tmp_path / f"spm-{precision}.gguf"
    assert export_main(["--model", str(model_dir), "--gguf", str(gguf_file), "--precision", precision]) == 0

    reader = gguf.GGUFReader(gguf_file)
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert "tokenizer.ggml.merges" not in reader.fields
    token_types = reader.fields["tokenizer.ggml.token_type"]
    types = [int(token_types.parts[i][0]) for i in token_types.data]
    assert types.count(gguf.TokenType.BYTE) == 256 and types[0] == gguf.TokenType.UNKNOWN
    assert types[1] == types[2] == gguf.TokenType.CONTROL
    assert bool(reader.fields["tokenizer.ggml.add_space_prefix"].parts[-1][0])
    assert bool(reader.fields["tokenizer.ggml.add_bos_token"].parts[-1][0])

    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    for text in TOKENIZER_PROBES:
        expected = tokenizer(text).input_ids
        assert exported_tokenizer(text).input_ids == expected, text
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in tokenizer(TOKENIZER_PROBES[2]).input_ids)
    assert exported_tokenizer.chat_template == tokenizer.chat_template

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name).eval()
    ids = tokenizer(TOKENIZER_PROBES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits,
                                   atol=1e-5 if precision == "f32" else 2e-2, rtol=0)
        if precision == "f32":
            assert exported.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
                model.generate(ids, max_new_tokens=8, do_sample=False).tolist()


ZEPHYR_PROMPT = "<|user|>\nDescribe the ocean.</s>\n<|assistant|>\n"


@pytest.mark.parametrize("kind", ["chatml", "llama-spm", "llama-spm-legacy"])
def test_llama_cpp_runs_the_exported_file(tmp_path: Path, kind: str) -> None:
    """llama.cpp itself (through llama-cpp-python, where it is installed) reads the file: same
    token ids and the same logits as transformers. llama.cpp tokenizes a SentencePiece vocabulary
    as SentencePiece does, prepending a space to every piece of text, also to text that starts
    with one or follows a special token: so does a Llama-2-style tokenizer.json (legacy), while
    the newer Metaspace layout prepends it only at the start, and those probes are left out."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from sft.export.gguf import export_gguf
    from tests.tiny import build_tiny_model_dir, build_tokenizer

    tokenizer = build_tokenizer(kind)
    model_dir = build_tiny_model_dir(tmp_path / kind, tokenizer)
    gguf_file = export_gguf(model_dir, tmp_path / f"{kind}.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    probes = [*TOKENIZER_PROBES, ZEPHYR_PROMPT]
    if kind == "llama-spm":
        probes = [text for text in probes if not text.startswith(" ") and "</s>" not in text]
    for text in probes:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text
    ids = tokenizer(TOKENIZER_PROBES[0]).input_ids
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model_dir)(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    np.testing.assert_allclose(np.asarray(llm.scores[:len(ids)]), expected, atol=1e-3, rtol=0)
    llm.close()


def test_q4_0_export_keeps_weights_within_a_quantization_step(tmp_path: Path) -> None:
    """q4_0: every 2-D weight read back from the file is within one 4-bit step of the model's
    (the side opposite a block's largest magnitude reaches only 7 of 8 steps), and the embedding,
    kept at q8_0, within half an 8-bit step; norms stay exact; transformers loads the file."""
    import gguf
    import numpy as np
    from gguf import quants

    from sft.export.gguf import export_gguf
    from tests.tiny import build_tiny_model_dir, build_tokenizer

    tokenizer = build_tokenizer("chatml")
    model_dir = build_tiny_model_dir(tmp_path / "model", tokenizer, hidden_size=64)
    gguf_file = export_gguf(model_dir, tmp_path / "model-q4_0.gguf", "q4_0")
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    original = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()

    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    for hf_name, gguf_name, levels, steps in (
            ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", 8, 1.0),
            ("model.layers.1.mlp.gate_proj.weight", "blk.1.ffn_gate.weight", 8, 1.0),
            ("model.embed_tokens.weight", "token_embd.weight", 127, 0.5)):
        weight = original[hf_name].numpy()
        read = quants.dequantize(tensors[gguf_name].data, tensors[gguf_name].tensor_type).reshape(weight.shape)
        blocks = np.abs(weight).reshape(weight.shape[0], -1, 32).max(axis=-1, keepdims=True)
        step = np.repeat(blocks / levels, 32, axis=-1).reshape(weight.shape)  # one quantization step per block
        # + 1e-3 relative: the block scale is stored as float16
        assert np.all(np.abs(read - weight) <= steps * step + 1e-3 * np.abs(weight) + 1e-7), hf_name
        assert np.abs(read - weight).max() > 0  # it was quantized
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    ids = tokenizer("Describe the ocean.", return_tensors="pt").input_ids
    assert exported.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize("kind", ["chatml", "llama-spm"])
def test_an_embedding_padded_beyond_the_tokenizer_gets_unused_pad_tokens(tmp_path: Path, kind: str) -> None:
    """Models often pad their embedding to a round number of rows; the file then lists one token
    per row, the extra ones unused, and reads back with the same tokenization and logits."""
    import gguf

    from sft.export.gguf import export_gguf
    from tests.tiny import build_tiny_model_dir, build_tokenizer

    tokenizer = build_tokenizer(kind)
    model_dir = build_tiny_model_dir(tmp_path / "model", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = len(tokenizer) + 13
    model.resize_token_embeddings(rows)
    model.save_pretrained(model_dir)
    gguf_file = export_gguf(model_dir, tmp_path / "padded.gguf", "f32")

    reader = gguf.GGUFReader(gguf_file)
    token_types = reader.fields["tokenizer.ggml.token_type"]
    types = [int(token_types.parts[i][0]) for i in token_types.data]
    assert len(types) == rows and types[-13:] == [gguf.TokenType.UNUSED] * 13
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    ids = tokenizer(TOKENIZER_PROBES[0], return_tensors="pt").input_ids
    assert exported_tokenizer(TOKENIZER_PROBES[0]).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=1e-5, rtol=0)

    small = tmp_path / "small"
    model.resize_token_embeddings(len(tokenizer) - 1)
    model.save_pretrained(small)
    tokenizer.save_pretrained(small)
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but the model's embedding only"):
        export_gguf(small, tmp_path / "small.gguf")
