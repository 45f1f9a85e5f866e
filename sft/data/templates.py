"""The one place that turns a record into prompt text and response text.

Training, evaluation and chat all build prompts here, so the model is asked at inference exactly
the way it was taught. A conversation is rendered with the tokenizer's own chat template; a
tokenizer without one (a base model) gets FALLBACK_CHAT_TEMPLATE, an Alpaca-style layout, which
is then saved with the adapter so every later tool renders the same text:

    {system prompt, if any}

    ### Instruction:
    {instruction}

    {input, if any}

    ### Response:
    {output}</s>
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from sft.errors import TemplateError

FALLBACK_CHAT_TEMPLATE = (
    # Turns are separated by a blank line placed before each turn, so an answer ends at its EOS
    # and nothing after the EOS is trained.
    "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)

Message = dict[str, str]




def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a tokenizer without a chat template the fallback one; True if it was missing."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def user_content(instruction: str, input_text: str = "") -> str:
    """The user turn of an Alpaca record: the instruction, then its input after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def record_messages(record: dict[str, Any], system_prompt: str | None) -> list[Message]:
    """The conversation of a prepared record: optional system, user, assistant."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": user_content(record["instruction"], record.get("input", ""))})
    messages.append({"role": "assistant", "content": record["output"]})
    return messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The text generation starts from: the conversation so far plus the assistant header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def split_prompt_response(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[str, str]:
    """Prompt text (all turns but the last, plus the assistant header) and the final assistant
    turn's text including its end-of-turn marker, such that prompt + response is the template's
    rendering of the whole conversation."""
    if not messages or messages[-1]["role"] != "assistant":
        raise TemplateError("the last message must be the assistant's answer")
    prompt = render_prompt(tokenizer, messages[:-1])
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise TemplateError(
            "the chat template renders the prompt differently with and without the answer, so the "
            f"answer cannot be separated from it.\nprompt: {prompt!r}\nfull:   {full!r}")
    return prompt, full[len(prompt):]


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer prepends BOS on its own (Llama/TinyLlama do, SmolLM2 does not)."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True).input_ids[:1] == [tokenizer.bos_token_id]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt_text: str) -> list[int]:
    """Token ids of a rendered prompt with exactly one BOS where the model expects one.

    Rendered templates may already contain the BOS text; tokenizing them with special tokens
    added would then give two. So tokenize without, and add BOS only if it is not there yet.
    """
    ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a continuation (a response): no special tokens added."""
    return tokenizer(text, add_special_tokens=False).input_ids


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: generation stops at any of them."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
