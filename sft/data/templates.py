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

Messages may carry more than role and content (see ``sft.data.prepared``): an assistant's
``reasoning`` and ``tool_calls``, ``tool`` turns with a tool's result, and a conversation may come
with a list of ``tools``. Rendering hands the reasoning to the template under each name templates
read it by (Qwen3 reads ``reasoning_content``, others ``reasoning`` or ``thinking``) and the tool
list as ``apply_chat_template(..., tools=...)``; what the template does with them is its own
affair (``sft.data.tokenize`` checks what it kept).

A template without a system role (Gemma 2 and Mistral-Instruct v0.1 raise on one; a template that
renders nothing for it would drop it), or one that moves it as turns are added (Mistral-Instruct
v0.3 writes it into the last user turn, so every earlier answer's context changes), gets the
system prompt folded into the first user turn, followed by a blank line: what Gemma 3's own
template does. A one-turn conversation renders as the template itself would render it. Training,
evaluation and chat all render through here, so the model sees the system prompt the same way in
each.
"""

from __future__ import annotations

import functools
from typing import Any

from jinja2.exceptions import TemplateError as JinjaTemplateError
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

Message = dict[str, Any]

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
"""The names chat templates read an assistant's reasoning by: Qwen3 ``reasoning_content``,
LFM2.5 ``thinking`` then ``reasoning``, gpt-oss ``thinking``."""

_SYSTEM_PROBE = "sft-system-probe-7f3a"


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


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message],
                  tools: list[dict[str, Any]] | None = None) -> str:
    """The text generation starts from: the conversation so far plus the assistant header."""
    return _render(tokenizer, messages, tools, add_generation_prompt=True)


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message],
                        tools: list[dict[str, Any]] | None = None) -> str:
    """The text of the whole conversation, each assistant turn with its end-of-turn marker."""
    return _render(tokenizer, messages, tools, add_generation_prompt=False)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], tools: list[dict[str, Any]] | None,
            add_generation_prompt: bool) -> str:
    """apply_chat_template of the messages as templates read them; a template's own error
    (``raise_exception``) becomes a TemplateError naming the template."""
    if (len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user"
            and not has_system_role(tokenizer, tokenizer.chat_template)):
        messages = fold_system_turn(messages)
    try:
        return tokenizer.apply_chat_template(template_messages(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except JinjaTemplateError as exc:
        raise TemplateError(f"{template_name(tokenizer)} refused the conversation: {exc}") from None


def template_messages(messages: list[Message]) -> list[Message]:
    """The messages with an assistant's ``reasoning`` also under every name in REASONING_KEYS."""
    return [message | dict.fromkeys(REASONING_KEYS, message["reasoning"]) if message.get("reasoning") else message
            for message in messages]


def fold_system_turn(messages: list[Message]) -> list[Message]:
    """A conversation opening with a system turn, that turn put in front of the first user turn
    after a blank line (as Gemma 3's template does, for templates with no system role)."""
    system, first, *rest = messages
    return [first | {"content": f"{system['content']}\n\n{first['content']}"}, *rest]


@functools.lru_cache(maxsize=16)
def has_system_role(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> bool:
    """Whether the template renders a system turn's text where it stays as turns are added
    (``chat_template`` keys the cache, so a template set later is probed again)."""
    one_turn = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
    two_turns = [*one_turn, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    try:
        first, later = (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                        for messages in (one_turn, two_turns))
    except JinjaTemplateError:
        return False
    through_system = first[:first.find(_SYSTEM_PROBE) + len(_SYSTEM_PROBE)]
    return _SYSTEM_PROBE in first and later.startswith(through_system)


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
