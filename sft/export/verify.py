"""`sft export --verify`: read the GGUF file back with readers that share no code with the
writer and check that it computes what the merged model computes.

- Tokens: the file's tokenizer, rebuilt by transformers from the file's vocabulary and merges,
  gives the training tokenizer's ids on probe texts (digits, whitespace runs, emoji, every
  special token, a rendered multi-turn chat).
- Logits: the file loaded by transformers' GGUF loader (its own tensor names, rotary reordering
  and dequantization) gives logits within the precision's tolerance of the merged model, and
  the same greedy reply to three prompts; llama.cpp itself (llama-cpp-python) where installed.

A failure names the probe and the first differing token or logit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sft.errors import UserError

LOGIT_TOLERANCE = {"f32": 1e-5, "f16": 0.05, "bf16": 0.25, "q8_0": 0.5, "q4_0": 4.0,
                   "q4_k_m": 3.5, "q5_k_m": 2.0, "q6_k": 1.5}
"""Largest difference allowed between a logit of the file and of the merged model, in standard
deviations of the model's logits at that position set: f32 is exact up to float rounding; the
others are twice the worst measured on the tiny random models of every family (f16 0.03, bf16
0.14, q8_0 0.36, q4_0 3.3: weights drawn at 0.3 and rows of two 32-wide blocks make them far more
sensitive to rounding than a trained model); the k-quants twice the worst on a tiny Llama with
256-wide rows, as their blocks are, and weights drawn at 0.1 (q4_k_m 1.76, q5_k_m 0.95, q6_k 0.76,
by either reader; another random model of that shape differs by 5.2)."""

LLAMA_CPP_TOLERANCE = {precision: max(tolerance, 0.02) for precision, tolerance in LOGIT_TOLERANCE.items()}
"""llama.cpp's own kernels round differently from transformers' (0.008 measured on the f32 files)."""

GREEDY_PRECISIONS = {"f32", "f16"}
"""The precisions held to the same greedy reply. bf16, q8_0, q4_0 and the k-quants flip near
ties (bf16 on the tiny random models within 12 tokens; on the demo model llama.cpp's q8_0 reply
takes another wording after 11 tokens): they are held to their logit tolerances only."""

REPLY_PROMPTS = ["Describe the ocean in one sentence.", "List the planets of the solar system.",
                 "What is the capital of France?"]
GREEDY_TOKENS = 12

TRANSFORMERS_ARCHITECTURES = {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}
"""llama.cpp architectures whose files transformers' GGUF loader reads."""


class VerificationError(UserError):
    """The exported file does not compute what the merged model computes."""


def tokenizer_probes(tokenizer) -> dict[str, tuple[str, bool]]:
    """{probe name: (text, whether the tokenizer adds its special tokens)}."""
    specials = [*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())]
    probes = {
        "digits": ("0 1 12 123 1234 12345 3.14159 1,000,000 2024-01-31 0x1F", True),
        "whitespace runs": ("a  b   c\t\td \n\n\n e    f\n", True),
        "leading space": ("  starts with two spaces", True),
        "emoji": ("emoji 🙂🚀🦜 and 😶\u200d🌫️ joined", True),
        "accents and scripts": ("Straße, naïve café, русский, 日本語", True),
        "special tokens": ("x".join(["", *dict.fromkeys(specials), ""]), False),
    }
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a color."},
                    {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "And 2 more?  Thanks 🙂"}]
        try:
            chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates without a system role (Gemma) raise their own errors
            chat = tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
        probes["multi-turn chat"] = (chat, False)
    return probes


def _first_difference(expected: list, actual: list) -> int:
    return next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))


def check_tokens(tokenizer, exported) -> None:
    for name, (text, add_special) in tokenizer_probes(tokenizer).items():
        expected = tokenizer(text, add_special_tokens=add_special).input_ids
        actual = exported(text, add_special_tokens=add_special).input_ids
        if expected != actual:
            at = _first_difference(expected, actual)
            want, got = (repr(tokenizer.convert_ids_to_tokens(ids[at]) if at < len(ids) else "(end)")
                         for ids in (expected, actual))
            raise VerificationError(f"tokens differ on probe {name!r} at token {at}: the model's tokenizer gives "
                                    f"{want}, the GGUF's {got}")
    if (exported.chat_template or None) != (tokenizer.chat_template or None):
        raise VerificationError("the GGUF's chat template differs from the model's")


def check_logits(model, exported, tokenizer, precision: str) -> float:
    """The largest logit difference over the prompts; raises past the tolerance or on a different
    greedy reply."""
    tolerance = LOGIT_TOLERANCE[precision]
    worst = 0.0
    for prompt in REPLY_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected, actual = model(ids).logits[0], exported(ids).logits[0]
        difference = (expected - actual).abs() / expected.std()
        worst = max(worst, difference.max().item())
        if difference.max() > tolerance:
            position, token = divmod(int(difference.argmax()), difference.shape[-1])
            raise VerificationError(
                f"logits differ on prompt {prompt!r} at position {position}, token {token}: model "
                f"{expected[position, token]:.4f}, GGUF {actual[position, token]:.4f}: {difference.max():.2e} standard "
                f"deviations, tolerance {tolerance} for {precision}")
        if precision in GREEDY_PRECISIONS:
            with torch.no_grad():
                want = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
                got = exported.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
            if want != got:
                at = _first_difference(want, got)
                raise VerificationError(f"greedy replies to {prompt!r} differ at new token {at}: model "
                                        f"{tokenizer.decode(want[:at + 1])!r}, GGUF {tokenizer.decode(got[:at + 1])!r}")
    return worst


def byte_level_tokenizer_from_gguf(gguf_file: Path):
    """A tokenizer built from nothing but the file's tokens, merges, token types and flags, for
    the architectures whose files transformers does not read (olmo2, granite, command-r, smollm3)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(gguf_file)

    def field(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    if field("tokenizer.ggml.model") != "gpt2":
        raise VerificationError(f"{gguf_file}: only byte-level BPE vocabularies are read back for this architecture")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    backend = Tokenizer(models.BPE({token: index for index, token in enumerate(tokens)},
                                   [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types)
                                if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)])
    bos = field("tokenizer.ggml.bos_token_id")
    if field("tokenizer.ggml.add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                               special_tokens=[(tokens[bos], bos)])
    named = {f"{name}_token": tokens[index] for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"),
                                                               ("unk", "unknown"))
             if (index := field(f"tokenizer.ggml.{key}_token_id")) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=field("tokenizer.chat_template"), **named)


def prefix_every_piece(tokenizer) -> None:
    """A SentencePiece file's add_space_prefix as llama.cpp reads it: a space before every piece of
    text between special tokens, also one that starts with a space (transformers' reader prepends
    one only at the start, which is not what llama.cpp runs)."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None


def verify_gguf(model_dir: str | Path, gguf_file: str | Path, precision: str,
                log: Callable[[str], None] = print) -> None:
    """Check ``gguf_file`` against the merged model in ``model_dir``; raise VerificationError."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.export.gguf import arch_name, llama_cpp_config, llama_cpp_gaps
    from sft.modeling.models import load_model, load_tokenizer

    model_dir, gguf_file = Path(model_dir), Path(gguf_file)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), torch.float32, attn_implementation="eager").eval()
    arch = arch_name(model.config)
    # transformers picks the text-splitting regex by architecture, not by the file's pre-tokenizer
    # name: a file whose pre-tokenizer is GPT-2's, or unknown ('default'), is rebuilt from its
    # vocabulary and merges alone, split with GPT-2's regex.
    file_fields = gguf.GGUFReader(gguf_file).fields
    pre = file_fields.get("tokenizer.ggml.pre")
    if arch in TRANSFORMERS_ARCHITECTURES and (pre is None or pre.contents() not in ("default", "gpt-2")):
        exported_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    else:
        exported_tokenizer = byte_level_tokenizer_from_gguf(gguf_file)
    space_prefix = file_fields.get("tokenizer.ggml.add_space_prefix")
    if space_prefix is not None and space_prefix.contents():
        prefix_every_piece(exported_tokenizer)
    check_tokens(tokenizer, exported_tokenizer)
    log(f"verify: tokens match on {len(tokenizer_probes(tokenizer))} probes")
    for gap in llama_cpp_gaps(model.config):
        log(f"verify: not checked: {gap}")
    if arch in TRANSFORMERS_ARCHITECTURES:
        # The model as llama.cpp runs it (no sliding window where its architecture has none), its
        # weights read from the file by transformers' own GGUF loader.
        config = llama_cpp_config(model.config)
        exported = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, config=config,
                                                        dtype=torch.float32, attn_implementation="eager").eval()
        worst = check_logits(model, exported, tokenizer, precision)
        replies = ", same greedy replies" if precision in GREEDY_PRECISIONS else ""
        log(f"verify: transformers' GGUF reader: logits within {worst:.2e} standard deviations of the "
            f"model's (tolerance {LOGIT_TOLERANCE[precision]}){replies}")
    else:
        log(f"verify: logits not checked by transformers, whose GGUF reader has no {arch} architecture")
    check_with_llama_cpp(model, tokenizer, gguf_file, precision, log)


def check_with_llama_cpp(model, tokenizer, gguf_file: Path, precision: str, log: Callable[[str], None]) -> None:
    """llama.cpp itself (llama-cpp-python, where installed) reads the file: the training tokenizer's
    ids on every probe, and logits within the precision's tolerance of the model's."""
    try:
        import llama_cpp
    except ImportError:
        log("verify: llama.cpp not checked: llama-cpp-python is not installed (pip install llama-cpp-python)")
        return
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, logits_all=True, verbose=False, n_threads=1)
    try:
        adds_bos = tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
        for name, (text, add_special) in tokenizer_probes(tokenizer).items():
            expected = tokenizer(text, add_special_tokens=add_special).input_ids
            actual = llm.tokenize(text.encode(), add_bos=add_special and adds_bos, special=True)
            if expected != actual:
                at = _first_difference(expected, actual)
                want, got = (repr(llm.detokenize(ids[at:at + 1]).decode(errors="replace")) if at < len(ids)
                             else "(end)" for ids in (expected, actual))
                raise VerificationError(f"llama.cpp's tokens differ on probe {name!r} at token {at}: the model's "
                                        f"tokenizer gives {want}, llama.cpp {got}")
        tolerance = LLAMA_CPP_TOLERANCE[precision]
        worst = max(_llama_cpp_logit_difference(llm, model, tokenizer, prompt, tolerance, precision)
                    for prompt in REPLY_PROMPTS)
        log(f"verify: llama.cpp: same tokens on {len(tokenizer_probes(tokenizer))} probes; logits within {worst:.2e} "
            f"standard deviations of the model's (tolerance {tolerance})")
    finally:
        llm.close()


def _llama_cpp_logit_difference(llm, model, tokenizer, prompt: str, tolerance: float, precision: str) -> float:
    """The largest logit difference on ``prompt``, in standard deviations of the model's logits."""
    import numpy as np

    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm.reset()
    llm.eval(ids)
    difference = np.abs(np.asarray(llm.scores[:len(ids)]) - expected) / expected.std()
    if difference.max() > tolerance:
        position, token = np.unravel_index(int(difference.argmax()), difference.shape)
        raise VerificationError(f"llama.cpp's logits differ on prompt {prompt!r} at position {position}, token "
                                f"{token}: {difference.max():.2e} standard deviations, tolerance {tolerance} for "
                                f"{precision}")
    return float(difference.max())
