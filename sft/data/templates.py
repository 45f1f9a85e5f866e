"""The one place that turns a conversation into the text a model sees.

Training, evaluation and chat all build prompts here, so the model is asked at inference exactly
the way it was taught. A conversation is rendered with the tokenizer's own chat template; a
tokenizer without one (a base model) gets FALLBACK_CHAT_TEMPLATE, an Alpaca-style layout, which
is then saved with the adapter so every later tool renders the same text (each further turn
follows after a blank line):

    {system prompt, if any}

    ### Instruction:
    {user turn}

    ### Response:
    {assistant turn}</s>
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from sft.data.template_render import render_chat_template
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


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """The conversation with the configured system prompt as its first turn.

    A conversation that brings its own system turn keeps it: that turn was written for its
    exchange (a persona, a format the answers follow), and replacing it would train answers
    under instructions they were not written for. None adds nothing, leaving the template's
    default (SmolLM2's inserts one of its own).
    """
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False)``, under a time and size limit
    (the template is someone else's program), failures as one-line TemplateErrors."""
    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:  # no template, or a named set without a default
        raise TemplateError(f"{template_name(tokenizer)}: {exc}") from None
    return render_chat_template(template, messages, add_generation_prompt, tokenizer.special_tokens_map,
                                template_name(tokenizer))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The text generation starts from: the conversation so far plus the assistant header."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The text of the whole conversation, each assistant turn with its end-of-turn marker."""
    return _render(tokenizer, messages, add_generation_prompt=False)


def template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """Which chat template a tokenizer renders with, for error messages."""
    if tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE:
        return "the fallback chat template (sft.data.templates)"
    return f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"


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


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: generation stops at any of them."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
