"""sft.data.templates: prompt/response split, fallback template, BOS handling, end-of-turn ids."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from sft.data.templates import (
    FALLBACK_CHAT_TEMPLATE,
    TemplateError,
    encode_prompt,
    end_of_turn_ids,
    ensure_chat_template,
    record_messages,
    render_prompt,
    split_prompt_response,
    user_content,
)
from tests.tiny import build_tokenizer

SMOLLM_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n")
RECORD = {"instruction": "Name a color.", "input": "", "output": "Blue."}
RECORD_WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
UNICODE_RECORD = {"instruction": "Übersetze: café 日本語", "input": "emoji 🙂", "output": "Straße 🚀 done"}

# Exact prompt and response text of RECORD without a system prompt, per tokenizer kind.
EXPECTED_SPLIT = {
    "chatml": (SMOLLM_SYSTEM + "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n",
               "Blue.<|im_end|>\n"),
    "zephyr": ("<|user|>\nName a color.</s>\n<|assistant|>\n", "Blue.</s>\n"),
    "plain": ("### Instruction:\nName a color.\n\n### Response:\n", "Blue.</s>"),
}


def chat_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of ``kind``; the base model's gets the fallback template."""
    tokenizer = build_tokenizer(kind)
    ensure_chat_template(tokenizer)
    return tokenizer


@pytest.fixture(scope="module", params=["chatml", "zephyr", "plain"])
def kind_and_tokenizer(request: pytest.FixtureRequest) -> tuple[str, PreTrainedTokenizerFast]:
    return request.param, chat_tokenizer(request.param)


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
@pytest.mark.parametrize("record", [RECORD, RECORD_WITH_INPUT, UNICODE_RECORD])
def test_prompt_plus_response_is_the_full_rendering(kind_and_tokenizer, record, system_prompt) -> None:
    _, tokenizer = kind_and_tokenizer
    messages = record_messages(record, system_prompt)
    prompt, response = split_prompt_response(tokenizer, messages)
    assert prompt + response == tokenizer.apply_chat_template(messages, tokenize=False)
    assert prompt == render_prompt(tokenizer, messages[:-1])
    assert prompt == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert response.startswith(record["output"])
    assert tokenizer.eos_token in response[len(record["output"]):]


def test_split_gives_the_exact_prompt_and_response_text(kind_and_tokenizer) -> None:
    kind, tokenizer = kind_and_tokenizer
    assert split_prompt_response(tokenizer, record_messages(RECORD, None)) == EXPECTED_SPLIT[kind]


def test_render_prompt_is_what_generation_sees(kind_and_tokenizer) -> None:
    kind, tokenizer = kind_and_tokenizer
    user_turn = record_messages(RECORD, None)[:-1]
    assert render_prompt(tokenizer, user_turn) == EXPECTED_SPLIT[kind][0]


def test_explicit_system_prompt_replaces_smollm_default(chatml_tokenizer) -> None:
    prompt, response = split_prompt_response(chatml_tokenizer, record_messages(RECORD, "Be brief."))
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert response == "Blue.<|im_end|>\n"


def test_zephyr_renders_system_turn_first(zephyr_tokenizer) -> None:
    prompt, _ = split_prompt_response(zephyr_tokenizer, record_messages(RECORD_WITH_INPUT, "Be brief."))
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nAdd the numbers.\n\n2 and 3</s>\n<|assistant|>\n"


def test_user_content_joins_instruction_and_input_with_a_blank_line() -> None:
    assert user_content("Add the numbers.", "2 and 3") == "Add the numbers.\n\n2 and 3"
    assert user_content("Name a color.", "") == "Name a color."
    assert user_content("Name a color.") == "Name a color."


def test_record_messages_without_system_prompt() -> None:
    assert record_messages(RECORD_WITH_INPUT, None) == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_record_messages_with_system_prompt_puts_it_first() -> None:
    assert record_messages(RECORD, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
    ]


def test_record_messages_accepts_a_record_without_input_key() -> None:
    record = {"instruction": "Name a color.", "output": "Blue."}
    assert record_messages(record, None)[0] == {"role": "user", "content": "Name a color."}


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
    messages = record_messages(RECORD_WITH_INPUT, "Be brief.")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == ("Be brief.\n\n"
                    "### Instruction:\nAdd the numbers.\n\n2 and 3\n\n"
                    "### Response:\n5</s>")
    prompt, response = split_prompt_response(tokenizer, messages)
    assert prompt == "Be brief.\n\n### Instruction:\nAdd the numbers.\n\n2 and 3\n\n### Response:\n"
    assert response == "5</s>"


def test_fallback_without_system_prompt_or_input() -> None:
    tokenizer = chat_tokenizer("plain")
    full = tokenizer.apply_chat_template(record_messages(RECORD, None), tokenize=False)
    assert full == "### Instruction:\nName a color.\n\n### Response:\nBlue.</s>"


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


def test_template_whose_prompt_is_not_a_prefix_raises() -> None:
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT> ' }}{% endif %}")
    with pytest.raises(TemplateError, match="renders the prompt differently"):
        split_prompt_response(tokenizer, record_messages(RECORD, None))


def test_last_message_must_be_the_assistant(chatml_tokenizer) -> None:
    messages = record_messages(RECORD, None)
    with pytest.raises(TemplateError, match="last message must be the assistant"):
        split_prompt_response(chatml_tokenizer, messages[:-1])
    with pytest.raises(TemplateError, match="last message must be the assistant"):
        split_prompt_response(chatml_tokenizer, [])
