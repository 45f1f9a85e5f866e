"""The chat templates people ship, trained turn by turn with every answer masked exactly.

The official templates come from the installed ``trl`` (``trl/chat_templates/``, a dev dependency;
each test skips without it); SmolLM2's and TinyLlama's are the ones ``tests.tiny`` reproduces, and
Mistral-Instruct's (v0.1/v0.2) layout is written out below. Each tokenizer is a tiny byte-level BPE
whose special tokens are the family's markers. The expected labels are built by hand from each
family's layout, each piece tokenized on its own: they do not come from the code under test.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from sft.data.templates import encode_prompt, render_prompt
from sft.data.tokenize import (
    IGNORE_INDEX,
    LAST_ASSISTANT_TURN,
    encode_conversation,
    encode_records,
    encode_turns,
)
from sft.errors import TemplateError
from tests.tiny import CHATML_TEMPLATE, ZEPHYR_TEMPLATE, build_chat_tokenizer, trl_chat_template

MISTRAL_TEMPLATE = (
    # Mistral-7B-Instruct-v0.1's layout: no system role (a system turn breaks the alternation check).
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
        "<tool_response>", "</tool_response>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|eom_id|>", "<|python_tag|>"]
GEMMA = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PHI3 = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPM = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]

QWEN_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_PROMPT = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n{}Cutting Knowledge Date: December 2023\nToday Date: {}\n\n{}<|eot_id|>"
GEMMA_PROMPT = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
PHI3_PROMPT = "<|user|>\n{}<|end|>\n<|assistant|>\n"


@dataclass(frozen=True)
class Family:
    """A template, its tokenizer's special tokens, and its layout written out by hand: the text
    before the first turn (given the system prompt, or None), a user turn with the assistant header,
    and an answer (an earlier one, the last one)."""

    template: str  # a trl/chat_templates name, or the template itself
    specials: list[str]
    tokens: dict[str, Any]
    start: Any  # (system prompt or None) -> text
    prompt: str
    answer: str
    last_answer: str = ""
    system_in_first_user: bool = False
    tools: bool = False

    def layout(self, system: str | None, user: str, first: bool) -> str:
        if first and self.system_in_first_user and system is not None:
            user = f"{system}\n\n{user}"
        return (self.start(system) if first else "") + self.prompt.format(user)


def _llama3_start(date: str):
    return lambda system: "<|begin_of_text|>" + LLAMA3_SYSTEM.format("", date, system or "")


FAMILIES = {
    "qwen2_5": Family("qwen2_5", QWEN, {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
                      lambda system: "<|im_start|>system\n" + (
                          system or "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") + "<|im_end|>\n",
                      QWEN_PROMPT, "{}<|im_end|>\n", tools=True),
    "qwen3": Family("qwen3", QWEN, {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
                    lambda system: "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n",
                    QWEN_PROMPT, "<think>\n\n</think>\n\n{}<|im_end|>\n", tools=True),
    "llama3_1": Family("llama3_1", LLAMA3, {"eos": "<|eot_id|>", "bos": "<|begin_of_text|>", "adds_bos": True},
                       _llama3_start("26 Jul 2024"), LLAMA3_PROMPT, "{}<|eot_id|>", tools=True),
    "llama3_2": Family("llama3_2", LLAMA3, {"eos": "<|eot_id|>", "bos": "<|begin_of_text|>", "adds_bos": True},
                       _llama3_start(datetime.datetime.now().strftime("%d %b %Y")), LLAMA3_PROMPT, "{}<|eot_id|>",
                       tools=True),
    "gemma2": Family("gemma", GEMMA, {"eos": "<eos>", "bos": "<bos>", "pad": "<pad>", "unk": "<unk>", "adds_bos": True},
                     lambda system: "<bos>", GEMMA_PROMPT, "{}<end_of_turn>\n", system_in_first_user=True),
    "gemma3": Family("gemma3", GEMMA, {"eos": "<eos>", "bos": "<bos>", "pad": "<pad>", "unk": "<unk>", "adds_bos": True},
                     lambda system: "<bos>", GEMMA_PROMPT, "{}<end_of_turn>\n", system_in_first_user=True),
    "phi3": Family("phi3", PHI3, {"eos": "<|endoftext|>", "bos": "<s>", "pad": "<|endoftext|>", "unk": "<unk>",
                                  "adds_bos": True},
                   lambda system: "<s>" + ("" if system is None else f"<|system|>\n{system}<|end|>\n"),
                   PHI3_PROMPT, "{}<|end|>\n", "{}<|end|>\n<|endoftext|>"),
    "phi3_5": Family("phi3_5", PHI3, {"eos": "<|endoftext|>", "bos": "<s>", "pad": "<|endoftext|>", "unk": "<unk>",
                                      "adds_bos": True},
                     lambda system: "<s>" + ("" if system is None else f"<|system|>\n{system}<|end|>\n"),
                     PHI3_PROMPT, "{}<|end|>\n", "{}<|end|>\n<|endoftext|>"),
    "mistral": Family(MISTRAL_TEMPLATE, SPM, {"eos": "</s>", "bos": "<s>", "unk": "<unk>", "adds_bos": True},
                      lambda system: "<s>", "[INST] {} [/INST]", "{}</s>", system_in_first_user=True),
    "smollm2": Family(CHATML_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      {"eos": "<|im_end|>", "bos": "<|im_start|>", "pad": "<|im_end|>", "unk": "<|endoftext|>"},
                      lambda system: "<|im_start|>system\n" + (
                          system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face") + "<|im_end|>\n",
                      QWEN_PROMPT, "{}<|im_end|>\n"),
    "tinyllama": Family(ZEPHYR_TEMPLATE, ["<unk>", "<s>", "</s>"],
                        {"eos": "</s>", "bos": "<s>", "pad": "</s>", "unk": "<unk>", "adds_bos": True},
                        lambda system: "<s>" + ("" if system is None else f"<|system|>\n{system}</s>\n"),
                        "<|user|>\n{}</s>\n<|assistant|>\n", "{}</s>\n"),
}
TOOL_FAMILIES = [name for name, family in FAMILIES.items() if family.tools]

TURNS = [("Name a color.", "Blue."), ("Another one?", "Red, of course."),
         ("And a third one, please.", "Green is fine.")]


def conversation(turns: int, system: str | None = None) -> list[dict[str, Any]]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [message for user, answer in TURNS[:turns]
                       for message in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, Family, PreTrainedTokenizerFast]:
    return request.param, FAMILIES[request.param], tokenizer_of(request.param)


def tokenizer_of(name: str) -> PreTrainedTokenizerFast:
    family = FAMILIES[name]
    template = family.template
    if "{" not in template:
        template = trl_chat_template(template)
        if template is None:
            pytest.skip("trl is not installed (pip install -e '.[dev]'): its chat templates are the test data")
    return build_chat_tokenizer(template, family.specials, name=f"tiny/{name}", **family.tokens)


def ids_of(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def trained(labels: list[int]) -> list[int]:
    return [label for label in labels if label != IGNORE_INDEX]


def expected(tokenizer: PreTrainedTokenizerFast, family: Family, turns: int, system: str | None = None,
             train_on_last: bool = False) -> dict[str, list[int]]:
    """input_ids and labels from the family's layout, each prompt and answer tokenized on its own."""
    input_ids: list[int] = []
    labels: list[int] = []
    for number, (user, answer) in enumerate(TURNS[:turns], 1):
        prompt = ids_of(tokenizer, family.layout(system, user, number == 1))
        layout = family.last_answer if number == turns and family.last_answer else family.answer
        answer_ids = ids_of(tokenizer, layout.format(answer))
        input_ids += prompt + answer_ids
        train = not train_on_last or number == turns
        labels += [IGNORE_INDEX] * len(prompt) + (answer_ids if train else [IGNORE_INDEX] * len(answer_ids))
    return {"input_ids": input_ids, "labels": labels}


# --- every answer of 1, 2 and 3 turns -----------------------------------------------------------

@pytest.mark.parametrize("turns", [1, 2, 3])
def test_every_answer_is_trained_exactly(family, turns: int) -> None:
    _, spec, tokenizer = family
    example, truncated = encode_conversation(tokenizer, conversation(turns), 512)
    assert truncated is False
    assert example == expected(tokenizer, spec, turns)
    answers = [(spec.last_answer if n == turns and spec.last_answer else spec.answer).format(answer)
               for n, (_, answer) in enumerate(TURNS[:turns], 1)]
    assert len(trained(example["labels"])) == sum(len(ids_of(tokenizer, text)) for text in answers)


def test_last_assistant_turn_trains_only_the_last_answer(family) -> None:
    _, spec, tokenizer = family
    example, _ = encode_conversation(tokenizer, conversation(3), 512, LAST_ASSISTANT_TURN)
    assert example == expected(tokenizer, spec, 3, train_on_last=True)


def test_the_example_is_the_templates_final_rendering_where_it_keeps_earlier_answers(family) -> None:
    """Every family but Qwen3 (which drops the earlier <think> blocks) renders history as trained."""
    name, _, tokenizer = family
    example, _ = encode_conversation(tokenizer, conversation(3), 512)
    final = tokenizer.apply_chat_template(conversation(3), tokenize=False)
    final_ids = tokenizer(final, add_special_tokens=False).input_ids
    if final_ids[:1] != [tokenizer.bos_token_id] and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]:
        final_ids = [tokenizer.bos_token_id, *final_ids]
    assert (example["input_ids"] == final_ids) is (name != "qwen3")


def test_the_system_prompt_per_template(family) -> None:
    """Gemma 2 and Mistral have no system role: it opens the first user turn, as Gemma 3's own template puts it."""
    _, spec, tokenizer = family
    example, _ = encode_conversation(tokenizer, conversation(2, "Be brief."), 512)
    assert example == expected(tokenizer, spec, 2, "Be brief.")
    prompt = encode_prompt(tokenizer, render_prompt(tokenizer, conversation(1, "Be brief.")[:-1]))
    assert prompt == ids_of(tokenizer, spec.layout("Be brief.", TURNS[0][0], True))  # what chat and eval ask


def test_gemma2_without_a_system_role_renders_as_gemma3() -> None:
    messages = conversation(2, "Be brief.")
    gemma2, gemma3 = tokenizer_of("gemma2"), tokenizer_of("gemma3")
    with pytest.raises(Exception, match="System role not supported"):
        gemma2.apply_chat_template(messages, tokenize=False)
    assert encode_conversation(gemma2, messages, 512) == encode_conversation(gemma3, messages, 512)


# --- Qwen3: thinking and not ---------------------------------------------------------------------

REASONING = ["The user wants a color. Blue is simple.", "Another color, not blue.", "A third: green."]


def test_qwen3_trains_each_answers_reasoning_and_think_block() -> None:
    """Earlier turns keep their <think> block (the final rendering would drop it): each answer is
    trained as the model writes it when that turn is generated."""
    tokenizer, spec = tokenizer_of("qwen3"), FAMILIES["qwen3"]
    messages = conversation(3)
    for message, reasoning in zip(messages[1::2], REASONING, strict=True):
        message["reasoning"] = reasoning
    messages[3] = {"role": "assistant", "content": f"<think>\n{REASONING[1]}\n</think>\n\n{TURNS[1][1]}"}
    encoded = encode_turns(tokenizer, messages, 512)
    answers = [f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n"
               for reasoning, (_, answer) in zip(REASONING, TURNS, strict=True)]
    prompts = [spec.layout(None, user, number == 1) for number, (user, _) in enumerate(TURNS, 1)]
    assert encoded.example["input_ids"] == [t for p, a in zip(prompts, answers, strict=True)
                                            for t in ids_of(tokenizer, p) + ids_of(tokenizer, a)]
    assert trained(encoded.example["labels"]) == [t for a in answers for t in ids_of(tokenizer, a)]
    assert encoded.reasoning_dropped == 0


def test_reasoning_a_template_drops_is_counted() -> None:
    records = [{"id": "r", "messages": [{"role": "user", "content": "Name a color."},
                                        {"role": "assistant", "content": "Blue.", "reasoning": REASONING[0]}]}]
    for name, dropped in (("qwen3", 0), ("qwen2_5", 1), ("llama3_1", 1), ("smollm2", 1)):
        examples, stats = encode_records(tokenizer_of(name), records, 512, None, progress=False)
        assert (stats.kept, stats.reasoning_dropped_turns) == (1, dropped), name
        plain, _ = encode_records(tokenizer_of(name), [{"id": "r", "messages": conversation(1)}], 512, None,
                                  progress=False)
        assert (examples == plain) is (dropped == 1), name


# --- tool calls ------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
RESULT = '{"temperature": 21}'


def tool_conversation() -> list[dict[str, Any]]:
    return [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": RESULT},
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."}]


TOOL_ANSWERS = {  # each family's answers to tool_conversation(), written out by hand
    "qwen2_5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
                "It is 21 degrees in Paris.<|im_end|>\n", "You are welcome.<|im_end|>\n"],
    "qwen3": [('<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call><|im_end|>\n'), "<think>\n\n</think>\n\nIt is 21 degrees in Paris.<|im_end|>\n",
              "<think>\n\n</think>\n\nYou are welcome.<|im_end|>\n"],
    "llama3_1": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                 "It is 21 degrees in Paris.<|eot_id|>", "You are welcome.<|eot_id|>"],
}
TOOL_ANSWERS["llama3_2"] = TOOL_ANSWERS["llama3_1"]


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_a_tool_call_conversation_trains_the_calls_and_masks_the_results(name: str) -> None:
    tokenizer = tokenizer_of(name)
    example, truncated = encode_conversation(tokenizer, tool_conversation(), 1024, tools=[WEATHER_TOOL])
    assert truncated is False
    assert trained(example["labels"]) == [t for text in TOOL_ANSWERS[name] for t in ids_of(tokenizer, text)]
    masked = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                               if label == IGNORE_INDEX], skip_special_tokens=False)
    assert "The weather in a city now." in masked  # the tool list, in the prompt as the template writes it
    assert RESULT in masked or json.dumps(RESULT) in masked
    if name != "qwen3":  # the rest are prefix-preserving: the example is the template's own rendering
        final = tokenizer.apply_chat_template(tool_conversation(), tools=[WEATHER_TOOL], tokenize=False)
        assert tokenizer.decode(example["input_ids"], skip_special_tokens=False) == final


@pytest.mark.parametrize("name", [name for name in FAMILIES if name not in TOOL_FAMILIES])
def test_templates_without_tool_support_reject_tool_records_by_reason(name: str) -> None:
    records = [{"id": "tools", "messages": tool_conversation(), "tools": [WEATHER_TOOL]},
               {"id": "plain", "messages": conversation(2)}]
    _, stats = encode_records(tokenizer_of(name), records, 1024, None, progress=False)
    assert (stats.read, stats.kept, stats.dropped_unsupported, stats.dropped_ids) == (
        2, 1, {"template_drops_tools": 1}, ["tools"])
    # Without the tool list, the first answer is a call the template does not write.
    _, stats = encode_records(tokenizer_of(name), [{"id": "calls", "messages": tool_conversation()}], 1024, None,
                              progress=False)
    assert stats.dropped_unsupported == {"template_drops_tool_calls": 1}


def test_tool_calls_without_a_tool_list_train_where_the_template_writes_them() -> None:
    example, _ = encode_conversation(tokenizer_of("qwen2_5"), tool_conversation(), 1024)
    assert trained(example["labels"]) == [t for text in TOOL_ANSWERS["qwen2_5"] for t in ids_of(tokenizer_of("qwen2_5"), text)]


def test_llama3_refuses_two_calls_in_one_turn_as_a_rejected_record() -> None:
    messages = tool_conversation()
    messages[1]["tool_calls"] = [CALL, CALL]
    messages.insert(3, {"role": "tool", "content": RESULT})
    _, stats = encode_records(tokenizer_of("llama3_1"), [{"id": "two", "messages": messages, "tools": [WEATHER_TOOL]}],
                              1024, None, progress=False)
    assert stats.dropped_unsupported == {"template_refused_tools": 1}
    example, _ = encode_conversation(tokenizer_of("qwen2_5"), messages, 1024, tools=[WEATHER_TOOL])
    assert tokenizer_of("qwen2_5").decode(trained(example["labels"])).count("<tool_call>") == 2


def test_a_template_error_without_tools_is_still_an_error() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}]
    with pytest.raises(TemplateError, match="tiny/mistral refused the conversation: Conversation roles must alternate"):
        encode_conversation(tokenizer_of("mistral"), messages, 512)


def test_llamafactory_tool_demo_trains_on_qwen_and_is_rejected_where_tools_are_not_rendered(tmp_path) -> None:
    from pathlib import Path

    from sft.data.prepare import TRAIN_FILE, prepare
    from sft.data.prepared import read_conversations

    src = Path(__file__).resolve().parents[3] / "shared" / "data" / "llamafactory" / "glaive_toolcall_en_demo.json.gz"
    if not src.is_file():
        pytest.skip(f"{src} is not on this machine")
    prepare([src], tmp_path)
    rows = read_conversations(tmp_path / TRAIN_FILE)[:60]
    with_tools = sum("tools" in row for row in rows)
    calls = [m for row in rows for m in row["messages"] if m.get("tool_calls")]
    assert 0 < with_tools < 60 and calls
    tokenizer = tokenizer_of("qwen2_5")
    examples, stats = encode_records(tokenizer, rows, 8192, None, progress=False)
    assert (stats.kept, stats.dropped_unsupported) == (60, {})
    text = "".join(tokenizer.decode(trained(e["labels"]), skip_special_tokens=False) for e in examples)
    assert text.count("<tool_call>") == len(calls) and "<tool_response>" not in text and "<tools>" not in text
    _, stats = encode_records(tokenizer_of("smollm2"), rows, 8192, None, progress=False)
    assert (stats.kept, stats.dropped_unsupported) == (60 - with_tools, {"template_drops_tools": with_tools})


def test_a_template_that_drops_tool_results_rejects_the_record() -> None:
    tokenizer = tokenizer_of("qwen2_5")
    tokenizer.chat_template = tokenizer.chat_template.replace('message.role == "tool"', 'message.role == "tool_"')
    _, stats = encode_records(tokenizer, [{"id": "t", "messages": tool_conversation(), "tools": [WEATHER_TOOL]}],
                              1024, None, progress=False)
    assert stats.dropped_unsupported == {"template_drops_tool_results": 1}


def test_think_in_the_content_is_trained_as_text_where_the_template_keeps_the_content() -> None:
    tokenizer = tokenizer_of("llama3_1")
    content = f"<think>\n{REASONING[0]}\n</think>\n\nBlue."
    encoded = encode_turns(tokenizer, [{"role": "user", "content": "Name a color."},
                                       {"role": "assistant", "content": content}], 512)
    assert trained(encoded.example["labels"]) == ids_of(tokenizer, content + "<|eot_id|>")
    assert encoded.reasoning_dropped == 0


def test_a_template_that_moves_the_tool_list_trains_one_exchange_and_rejects_more() -> None:
    """Like Mistral-Instruct v0.3, which writes the tools before the last user turn."""
    tokenizer = tokenizer_of("smollm2")
    tokenizer.chat_template = (
        "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
        "{% endif %}{% endfor %}{% for m in messages %}{% if m.role == 'user' %}{% if tools and loop.index0 == ns.last %}"
        "{{ 'TOOLS ' + tools | tojson + '\\n' }}{% endif %}{{ 'user: ' + m.content + '\\n' }}"
        "{% elif m.role == 'assistant' %}{{ 'assistant: ' + m.content }}{% for c in m.tool_calls or [] %}"
        "{{ 'CALL ' + c.function.name }}{% endfor %}{{ '\\n' }}{% elif m.role == 'tool' %}{{ 'tool: ' + m.content + '\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    one_exchange = tool_conversation()[:4]
    example, _ = encode_conversation(tokenizer, one_exchange, 1024, tools=[WEATHER_TOOL])
    assert tokenizer.decode(trained(example["labels"])) == "CALL get_weather\nIt is 21 degrees in Paris.\n"
    records = [{"id": "one", "messages": one_exchange, "tools": [WEATHER_TOOL]},
               {"id": "two", "messages": tool_conversation(), "tools": [WEATHER_TOOL]}]
    _, stats = encode_records(tokenizer, records, 1024, None, progress=False)
    assert (stats.kept, stats.dropped_unsupported, stats.dropped_ids) == (1, {"template_refused_tools": 1}, ["two"])


def test_qwen3_reasoning_before_a_tool_call_is_trained_with_the_call() -> None:
    """After the last user turn Qwen3 keeps the reasoning of every turn: the call's and the answer's."""
    tokenizer = tokenizer_of("qwen3")
    messages = tool_conversation()[:4]
    messages[1] = messages[1] | {"reasoning": "I need the weather tool."}
    messages[3] = messages[3] | {"reasoning": "The tool says 21."}
    encoded = encode_turns(tokenizer, messages, 1024, tools=[WEATHER_TOOL])
    answers = ['<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris"}}\n</tool_call><|im_end|>\n',
               "<think>\nThe tool says 21.\n</think>\n\nIt is 21 degrees in Paris.<|im_end|>\n"]
    assert trained(encoded.example["labels"]) == [t for text in answers for t in ids_of(tokenizer, text)]
    assert encoded.reasoning_dropped == 0
    final = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)
    assert tokenizer.decode(encoded.example["input_ids"], skip_special_tokens=False) == final
