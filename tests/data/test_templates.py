"""sft.data.templates: system prompt rule, rendered text per template, fallback template, BOS, end of turn."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from sft.data.templates import (
    FALLBACK_CHAT_TEMPLATE,
    encode_prompt,
    end_of_turn_ids,
    ensure_chat_template,
    render_conversation,
    render_prompt,
    template_name,
    with_system_prompt,
)
from tests.tiny import build_tokenizer

SMOLLM_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n")
USER = {"role": "user", "content": "Name a color."}
ANSWER = {"role": "assistant", "content": "Blue."}
SYSTEM = {"role": "system", "content": "Be brief."}
UNICODE = [{"role": "user", "content": "Übersetze: café 日本語\n\nemoji 🙂"},
           {"role": "assistant", "content": "Straße 🚀 done"}]

# Exact prompt text (what generation sees) and answer text of [USER, ANSWER], per tokenizer kind.
EXPECTED_SPLIT = {
    "chatml": (SMOLLM_SYSTEM + "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n",
               "Blue.<|im_end|>\n"),
    "zephyr": ("<|user|>\nName a color.</s>\n<|assistant|>\n", "Blue.</s>\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "Blue.<|eot_id|>"),
    "plain": ("### Instruction:\nName a color.\n\n### Response:\n", "Blue.</s>"),
}


def chat_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of ``kind``; the base model's gets the fallback template."""
    tokenizer = build_tokenizer(kind)
    ensure_chat_template(tokenizer)
    return tokenizer


@pytest.fixture(scope="module", params=list(EXPECTED_SPLIT))
def kind_and_tokenizer(request: pytest.FixtureRequest) -> tuple[str, PreTrainedTokenizerFast]:
    return request.param, chat_tokenizer(request.param)


def test_with_system_prompt_puts_the_configured_one_first() -> None:
    assert with_system_prompt([USER, ANSWER], "Be brief.") == [SYSTEM, USER, ANSWER]


def test_with_system_prompt_none_adds_nothing() -> None:
    assert with_system_prompt([USER, ANSWER], None) == [USER, ANSWER]


def test_a_conversation_with_its_own_system_turn_keeps_it() -> None:
    own = {"role": "system", "content": "Answer in French."}
    assert with_system_prompt([own, USER, ANSWER], "Be brief.") == [own, USER, ANSWER]
    assert with_system_prompt([own, USER, ANSWER], None) == [own, USER, ANSWER]


def test_with_system_prompt_leaves_its_argument_alone() -> None:
    messages = [USER, ANSWER]
    with_system_prompt(messages, "Be brief.").append(USER)
    assert messages == [USER, ANSWER]


def test_rendered_prompt_and_answer_text(kind_and_tokenizer) -> None:
    kind, tokenizer = kind_and_tokenizer
    prompt, answer = EXPECTED_SPLIT[kind]
    assert render_prompt(tokenizer, [USER]) == prompt
    assert render_conversation(tokenizer, [USER, ANSWER]) == prompt + answer


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
@pytest.mark.parametrize("messages", [[USER, ANSWER], UNICODE, [USER, ANSWER, USER, ANSWER]])
def test_the_prompt_text_is_a_prefix_of_the_conversation(kind_and_tokenizer, messages, system_prompt) -> None:
    _, tokenizer = kind_and_tokenizer
    messages = with_system_prompt(messages, system_prompt)
    full = render_conversation(tokenizer, messages)
    assert full.startswith(render_prompt(tokenizer, messages[:-1]))
    answer = full[len(render_prompt(tokenizer, messages[:-1])):]
    assert answer.startswith(messages[-1]["content"])
    assert tokenizer.eos_token in answer[len(messages[-1]["content"]):]


def test_explicit_system_prompt_replaces_smollm_default(chatml_tokenizer) -> None:
    assert render_prompt(chatml_tokenizer, [SYSTEM, USER]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_zephyr_renders_system_turn_first(zephyr_tokenizer) -> None:
    assert render_prompt(zephyr_tokenizer, [SYSTEM, USER]) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nName a color.</s>\n<|assistant|>\n")


def test_ensure_chat_template_sets_fallback_on_a_base_tokenizer() -> None:
    tokenizer = build_tokenizer("plain")
    assert not tokenizer.chat_template
    assert ensure_chat_template(tokenizer) is True
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    assert ensure_chat_template(tokenizer) is False
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE


@pytest.mark.parametrize("kind", ["chatml", "zephyr"])
def test_ensure_chat_template_keeps_an_existing_template(kind: str) -> None:
    tokenizer = build_tokenizer(kind)
    before = tokenizer.chat_template
    assert ensure_chat_template(tokenizer) is False
    assert tokenizer.chat_template == before


def test_fallback_renders_the_documented_alpaca_layout() -> None:
    tokenizer = chat_tokenizer("plain")
    user = {"role": "user", "content": "Add the numbers.\n\n2 and 3"}
    messages = [SYSTEM, user, {"role": "assistant", "content": "5"}]
    assert render_conversation(tokenizer, messages) == (
        "Be brief.\n\n### Instruction:\nAdd the numbers.\n\n2 and 3\n\n### Response:\n5</s>")
    assert render_prompt(tokenizer, messages[:-1]) == (
        "Be brief.\n\n### Instruction:\nAdd the numbers.\n\n2 and 3\n\n### Response:\n")


def test_fallback_continues_a_conversation_after_a_blank_line() -> None:
    tokenizer = chat_tokenizer("plain")
    follow_up = {"role": "user", "content": "Another one?"}
    assert render_prompt(tokenizer, [USER, ANSWER, follow_up]) == (
        "### Instruction:\nName a color.\n\n### Response:\nBlue.</s>"
        "\n\n### Instruction:\nAnother one?\n\n### Response:\n")


@pytest.mark.parametrize("kind", ["zephyr", "plain"])
def test_encode_prompt_adds_exactly_one_bos_where_the_tokenizer_does(kind: str) -> None:
    tokenizer = chat_tokenizer(kind)
    prompt = EXPECTED_SPLIT[kind][0]
    bos = tokenizer.bos_token_id
    ids = encode_prompt(tokenizer, prompt)
    assert ids == [bos] + tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids == tokenizer(prompt, add_special_tokens=True).input_ids
    assert ids.count(bos) == 1


@pytest.mark.parametrize("kind", ["zephyr", "plain"])
def test_encode_prompt_does_not_double_a_bos_already_in_the_text(kind: str) -> None:
    tokenizer = chat_tokenizer(kind)
    prompt = EXPECTED_SPLIT[kind][0]
    ids = encode_prompt(tokenizer, "<s>" + prompt)
    assert ids == encode_prompt(tokenizer, prompt)
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[0] == tokenizer.bos_token_id
    # What the pitfall looks like: tokenizing the rendered text with special tokens added.
    assert tokenizer("<s>" + prompt).input_ids[:2] == [tokenizer.bos_token_id] * 2


def test_encode_prompt_adds_no_bos_for_chatml(chatml_tokenizer) -> None:
    prompt = EXPECTED_SPLIT["chatml"][0]
    ids = encode_prompt(chatml_tokenizer, prompt)
    assert ids == chatml_tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids == chatml_tokenizer(prompt).input_ids  # SmolLM2 adds nothing either
    im_start = chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == prompt.count("<|im_start|>") == 3


def test_end_of_turn_ids_chatml(chatml_tokenizer) -> None:
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(chatml_tokenizer) == [im_end]
    assert im_end == chatml_tokenizer.eos_token_id


def test_end_of_turn_ids_zephyr(zephyr_tokenizer) -> None:
    assert end_of_turn_ids(zephyr_tokenizer) == [zephyr_tokenizer.convert_tokens_to_ids("</s>")]


def test_end_of_turn_ids_adds_im_end_when_eos_differs() -> None:
    tokenizer = build_tokenizer("chatml")
    tokenizer.eos_token = "<|endoftext|>"
    assert end_of_turn_ids(tokenizer) == sorted({tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                                                 tokenizer.convert_tokens_to_ids("<|im_end|>")})


def test_encode_prompt_keeps_the_one_bos_a_llama3_template_writes() -> None:
    tokenizer = chat_tokenizer("llama3")
    prompt = EXPECTED_SPLIT["llama3"][0]
    bos = tokenizer.bos_token_id
    ids = encode_prompt(tokenizer, prompt)
    assert ids == tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[0] == bos and ids.count(bos) == 1
    assert tokenizer(prompt).input_ids[:2] == [bos, bos]  # the trap: the template and the tokenizer both add it


def test_end_of_turn_ids_llama3() -> None:
    tokenizer = chat_tokenizer("llama3")
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|eot_id|>")]


def test_template_name_says_which_template() -> None:
    assert template_name(chat_tokenizer("plain")) == "the fallback chat template (sft.data.templates)"
    tokenizer = chat_tokenizer("chatml")
    tokenizer.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert template_name(tokenizer) == "the chat template of HuggingFaceTB/SmolLM2-135M-Instruct"
