"""The tokenizer part of a GGUF file, written as llama.cpp's converter writes it.

Two tokenizer kinds: byte-level BPE (SmolLM2, Llama 3, Qwen, GPT-2 style) with its merges and
the name of its pre-tokenizer, and SentencePiece BPE with byte fallback (TinyLlama, Llama 2
style) with scores that reproduce the merge order. Special token ids, the add-BOS/EOS flags and
the chat template come from gguf-py's own ``SpecialVocab``.

llama.cpp splits text before BPE with a regex it picks by the name in ``tokenizer.ggml.pre``;
its converter finds that name by tokenizing a probe text and looking the hash of the ids up in a
table (``get_vocab_base_pre`` in llama.cpp's ``convert_hf_to_gguf``). We do the same, with the
entries of that table for the families sft trains.
"""

from __future__ import annotations

import json
import re
import warnings
from hashlib import sha256
from pathlib import Path

import gguf

PRE_TOKENIZER_PROBE = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
    '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= '
    'нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not '
    'sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
"""llama.cpp's ``chktxt``, character for character: the hash of its token ids names the pre-tokenizer."""

PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 .. Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",  # c4ai-command-r-v01
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # OLMo-1.7 (and mpt)
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # dbrx, OLMo 2's cl100k kin
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",  # OLMo2-SuperBPE
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
}
"""sha256 of ``str(tokenizer.encode(PRE_TOKENIZER_PROBE))`` -> llama.cpp's pre-tokenizer name,
copied from llama.cpp's ``get_vocab_base_pre`` for the families sft trains."""


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name of ``tokenizer``'s pre-tokenizer; 'default' with a warning when unknown."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    warnings.warn(f"the tokenizer's pre-tokenizer is not one llama.cpp knows (probe hash {digest[:16]}...): "
                  f"writing 'default', with which llama.cpp may split text differently from training", stacklevel=2)
    return "default"


def tokenizer_kind(backend: dict) -> str | None:
    """gpt2 (byte-level BPE), llama (SentencePiece BPE with byte fallback), or None."""
    model = backend["model"]
    if model["type"] != "BPE":
        return None
    if "ByteLevel" in json.dumps(backend.get("pre_tokenizer")):
        return "gpt2"
    if model.get("byte_fallback") and any("\u2581" in token for token in model["vocab"]):
        return "llama"
    return None


def _adds_space_prefix(backend: dict) -> bool:
    """Whether the tokenizer prepends a space to the text: Metaspace's prepend_scheme in newer
    tokenizer.json files, a Prepend normalizer in older ones (TinyLlama's)."""
    text = json.dumps([backend.get("normalizer"), backend.get("pre_tokenizer")], ensure_ascii=False)
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    schemes = [step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
               for step in steps if step and step.get("type") == "Metaspace"]
    return any(scheme in ("first", "always") for scheme in schemes) or '"Prepend"' in text


def _sentencepiece_scores(tokens: list[str], merges: list) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token has the
    highest score; Hugging Face's BPE applies the merge of lowest rank. A token made by merge
    rank r scores -r, so both pick the same merges; the rest (characters, bytes, special
    tokens, which no merge makes) score below every merge."""
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank_of.setdefault(left + right, rank)
    floor = -float(len(merges))
    return [-float(rank_of[token]) if token in rank_of else floor - index for index, token in enumerate(tokens)]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, model_dir: Path, rows: int) -> str:
    """Write ``tokenizer`` (saved in ``model_dir``), padded to the embedding's ``rows`` with
    unused [PADi] tokens as llama.cpp's converter does; return the pre-tokenizer name ('' for
    SentencePiece, which has none)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = tokenizer_kind(backend)
    vocab = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    special = set(tokenizer.all_special_ids)
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    types = []
    for index, token in enumerate(tokens):
        if index == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif index in special:
            types.append(gguf.TokenType.CONTROL)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        elif token in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    tokens += [f"[PAD{index}]" for index in range(vocab, rows)]
    types += [gguf.TokenType.UNUSED] * (rows - vocab)
    writer.add_tokenizer_model(kind)
    pre = ""
    if kind == "gpt2":
        pre = pre_tokenizer_name(tokenizer)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
    else:
        # As llama.cpp's converter writes a SentencePiece vocabulary: scores, no merges.
        writer.add_token_list(tokens)
        writer.add_token_scores(_sentencepiece_scores(tokens[:vocab], backend["model"]["merges"])
                                + [-1000.0] * (rows - vocab))
        writer.add_add_space_prefix(_adds_space_prefix(backend))
    writer.add_token_types(types)

    special_vocab = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=rows)
    # What the tokenizer does, not what its config claims: tokenizer.json's post-processor decides.
    probe = tokenizer("a").input_ids
    special_vocab.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special_vocab.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            special_vocab.special_token_ids[name] = token_id
    if special_vocab.chat_template is None and tokenizer.chat_template:
        special_vocab.chat_template = tokenizer.chat_template
    special_vocab.add_to_gguf(writer, quiet=True)
    return pre
