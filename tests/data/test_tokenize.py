"""sft.data.tokenize: exact label masks per template and turn count, truncation, dropping, bounded work."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from sft.data.templates import encode_prompt, ensure_chat_template, render_conversation, render_prompt
from sft.data.tokenize import (
    ALL_ASSISTANT_TURNS,
    IGNORE_INDEX,
    LAST_ASSISTANT_TURN,
    encode_conversation,
    encode_record,
    encode_records,
    message_char_limit,
)
from sft.errors import TemplateError
from tests.tiny import alpaca_records, build_tokenizer, conversation_records

SMOLLM_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n")
TURNS = [("Name a color.", "Blue."), ("Another one?", "Red, of course."),
         ("And a third one, please.", "Green is fine.")]

# Each template's text, written out by hand: what opens the conversation, the prompt of the first
# and of every later turn around the user's text, and the answer around the assistant's text.
CHATML_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
ZEPHYR_PROMPT = "<|user|>\n{}</s>\n<|assistant|>\n"
LLAMA3_PROMPT = ("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
FALLBACK_PROMPT = "### Instruction:\n{}\n\n### Response:\n"
LAYOUTS = {
    "chatml": (SMOLLM_SYSTEM, CHATML_PROMPT, CHATML_PROMPT, "{}<|im_end|>\n"),
    "zephyr": ("<s>", ZEPHYR_PROMPT, ZEPHYR_PROMPT, "{}</s>\n"),
    "llama3": ("<|begin_of_text|>", LLAMA3_PROMPT, LLAMA3_PROMPT, "{}<|eot_id|>"),
    "plain": ("<s>", FALLBACK_PROMPT, "\n\n" + FALLBACK_PROMPT, "{}</s>"),
}

# (tokens, trained with all_assistant_turns, trained with last_assistant_turn) per number of turns.
LABEL_COUNTS = {
    "chatml": {1: (55, 6, 6), 2: (82, 17, 11), 3: (114, 27, 10)},
    "zephyr": {1: (25, 6, 6), 2: (54, 17, 11), 3: (88, 27, 10)},
    "llama3": {1: (25, 5, 5), 2: (54, 15, 10), 3: (88, 24, 9)},
    "plain": {1: (28, 5, 5), 2: (62, 15, 10), 3: (101, 24, 9)},
}


def conversation(turns: int) -> list[dict[str, str]]:
    return [message for user, answer in TURNS[:turns]
            for message in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    """One tokenizer per layout; the base model's gets the fallback template."""
    built = {kind: build_tokenizer(kind) for kind in LAYOUTS}
    ensure_chat_template(built["plain"])
    return built


def ids_of(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def expected_example(tokenizer: PreTrainedTokenizerFast, kind: str, turns: int,
                     train_on: str = ALL_ASSISTANT_TURNS) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
    """input_ids and labels from the hand-written layout, each piece tokenized on its own, and the
    [start, end) span of every answer."""
    start, first, following, answer_layout = LAYOUTS[kind]
    input_ids: list[int] = []
    labels: list[int] = []
    spans = []
    for number, (user, answer) in enumerate(TURNS[:turns], 1):
        prompt = ids_of(tokenizer, (start + first if number == 1 else following).format(user))
        answer_ids = ids_of(tokenizer, answer_layout.format(answer))
        trained = train_on == ALL_ASSISTANT_TURNS or number == turns
        input_ids += prompt
        spans.append((len(input_ids), len(input_ids) + len(answer_ids)))
        input_ids += answer_ids
        labels += [IGNORE_INDEX] * len(prompt) + (answer_ids if trained else [IGNORE_INDEX] * len(answer_ids))
    return {"input_ids": input_ids, "labels": labels}, spans


def n_supervised(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


# --- exact masks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("train_on", [ALL_ASSISTANT_TURNS, LAST_ASSISTANT_TURN])
@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_labels_are_exactly_the_answers(tokenizers, kind: str, turns: int, train_on: str) -> None:
    tokenizer = tokenizers[kind]
    example, truncated = encode_conversation(tokenizer, conversation(turns), 256, train_on)
    assert truncated is False
    assert example == expected_example(tokenizer, kind, turns, train_on)[0]
    tokens, trained_all, trained_last = LABEL_COUNTS[kind][turns]
    assert len(example["input_ids"]) == len(example["labels"]) == tokens
    assert n_supervised(example["labels"]) == (trained_all if train_on == ALL_ASSISTANT_TURNS else trained_last)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_every_answer_is_trained_through_its_end_of_turn(tokenizers, kind: str) -> None:
    tokenizer = tokenizers[kind]
    example, _ = encode_conversation(tokenizer, conversation(3), 256)
    _, spans = expected_example(tokenizer, kind, 3)
    _, _, _, answer_layout = LAYOUTS[kind]
    for (start, end), (_, answer) in zip(spans, TURNS, strict=True):
        assert example["labels"][start:end] == example["input_ids"][start:end]
        assert tokenizer.decode(example["labels"][start:end]) == answer_layout.format(answer)
        assert example["labels"][start - 1] == IGNORE_INDEX


def test_chatml_trains_im_end_and_the_newline_after_each_answer(chatml_tokenizer) -> None:
    example, _ = encode_conversation(chatml_tokenizer, conversation(3), 256)
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    (newline,) = ids_of(chatml_tokenizer, "\n")
    _, spans = expected_example(chatml_tokenizer, "chatml", 3)
    for _, end in spans:
        assert example["labels"][end - 2:end] == [im_end, newline]
    # The default SmolLM2 system prompt is part of the first (masked) prompt.
    system = ids_of(chatml_tokenizer, SMOLLM_SYSTEM)
    assert example["input_ids"][:len(system)] == system
    assert example["labels"][:len(system)] == [IGNORE_INDEX] * len(system)


def test_zephyr_trains_each_answers_eos_though_pad_is_eos(zephyr_tokenizer) -> None:
    eos = zephyr_tokenizer.eos_token_id
    assert zephyr_tokenizer.pad_token_id == eos
    example, _ = encode_conversation(zephyr_tokenizer, conversation(3), 256)
    _, spans = expected_example(zephyr_tokenizer, "zephyr", 3)
    eos_positions = [i for i, token in enumerate(example["input_ids"]) if token == eos]
    in_answers = [i for i in eos_positions if any(start <= i < end for start, end in spans)]
    assert len(eos_positions) == 6 and len(in_answers) == 3  # the end of every user turn and of every answer
    assert [example["labels"][i] for i in eos_positions] == [IGNORE_INDEX, eos] * 3


@pytest.mark.parametrize("kind", ["zephyr", "plain", "llama3"])
def test_exactly_one_bos_at_position_0(tokenizers, kind: str) -> None:
    tokenizer = tokenizers[kind]
    example, _ = encode_conversation(tokenizer, [{"role": "system", "content": "Be brief."}, *conversation(3)], 256)
    bos = tokenizer.bos_token_id
    assert example["input_ids"].count(bos) == 1
    assert example["input_ids"][0] == bos
    assert example["labels"][0] == IGNORE_INDEX


def test_chatml_has_no_added_bos(chatml_tokenizer) -> None:
    example, _ = encode_conversation(chatml_tokenizer, conversation(3), 256)
    im_start = chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert example["input_ids"].count(im_start) == 7  # system, then user and assistant headers of 3 turns


@pytest.mark.parametrize("kind", ["llama-spm", "llama-spm-legacy"])
def test_sentencepiece_tokenizers_split_at_every_turn(kind: str) -> None:
    """TinyLlama's own kind of tokenizer: the conversation tokenizes as a chain of token prefixes."""
    tokenizer = build_tokenizer(kind)
    example, _ = encode_conversation(tokenizer, conversation(3), 256)
    trained = [token for token in example["labels"] if token != IGNORE_INDEX]
    text = tokenizer.decode(trained)
    assert all(answer in text for _, answer in TURNS)
    assert trained.count(tokenizer.eos_token_id) == 3
    assert "user" not in text


# --- system prompt ------------------------------------------------------------------------------

def test_the_configured_system_prompt_opens_a_record_without_one(chatml_tokenizer) -> None:
    record = {"id": "r", "messages": conversation(1)}
    example, _ = encode_record(chatml_tokenizer, record, 256, "Be brief.")
    system = ids_of(chatml_tokenizer, "<|im_start|>system\nBe brief.<|im_end|>\n")
    assert example["input_ids"][:len(system)] == system
    assert example["input_ids"] == encode_conversation(
        chatml_tokenizer, [{"role": "system", "content": "Be brief."}, *conversation(1)], 256)[0]["input_ids"]


def test_a_records_own_system_turn_wins(chatml_tokenizer) -> None:
    messages = [{"role": "system", "content": "Answer in French."}, *conversation(2)]
    example, _ = encode_record(chatml_tokenizer, {"id": "r", "messages": messages}, 256, "Be brief.")
    assert example == encode_conversation(chatml_tokenizer, messages, 256)[0]
    assert "Be brief." not in chatml_tokenizer.decode(example["input_ids"])


# --- templates that cannot be trained on by position --------------------------------------------

def role_lines_tokenizer(name: str, tail: str) -> PreTrainedTokenizerFast:
    """A tokenizer called ``name`` whose template writes a "role: content" line per message, then ``tail``."""
    tokenizer = build_tokenizer("chatml")
    tokenizer.name_or_path = name
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" + tail
    return tokenizer


def test_a_prompt_that_is_not_a_prefix_of_its_answer_is_an_error_naming_the_template() -> None:
    tokenizer = role_lines_tokenizer("acme/odd-chat", "{% if add_generation_prompt %}{{ 'ASSISTANT> ' }}{% endif %}")
    with pytest.raises(TemplateError, match="the chat template of acme/odd-chat cannot be trained on by position: "
                                            "the prompt of assistant turn 1 .* is not a token prefix"):
        encode_conversation(tokenizer, conversation(1), 256)


def test_a_template_that_closes_only_the_last_turn_trains_the_final_rendering() -> None:
    """Like Phi-3's EOS: what is written after the end of the last turn only is trained once, at the end."""
    tokenizer = role_lines_tokenizer(
        "acme/closing-chat", "{% if add_generation_prompt %}{{ 'assistant: ' }}{% else %}{{ 'END' }}{% endif %}")
    example, truncated = encode_conversation(tokenizer, conversation(2), 256)
    final = render_conversation(tokenizer, conversation(2))
    assert truncated is False
    assert example["input_ids"] == ids_of(tokenizer, final)
    trained = [token for token in example["labels"] if token != IGNORE_INDEX]
    assert trained == ids_of(tokenizer, "Blue.\n") + ids_of(tokenizer, "Red, of course.\nEND")


def test_a_template_that_moves_the_system_prompt_gets_it_in_the_first_user_turn() -> None:
    """Like Mistral-Instruct v0.3, which writes the system prompt into the last user turn: every
    earlier answer's context would change as turns are added."""
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'user: ' }}{% if loop.last or loop.revindex == 2 %}"
        "{{ messages[0]['content'] + ' ' if messages[0]['role'] == 'system' }}{% endif %}{{ m['content'] + '\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ 'assistant: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    messages = [{"role": "system", "content": "Be brief."}, *conversation(2)]
    example, _ = encode_conversation(tokenizer, messages, 256)
    assert example["input_ids"] == ids_of(tokenizer, "user: Be brief.\n\nName a color.\nassistant: Blue.\n"
                                                     "user: Another one?\nassistant: Red, of course.\n")
    # One turn renders as the template itself renders it.
    assert render_prompt(tokenizer, messages[:2]) == tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True).replace("Be brief. ", "Be brief.\n\n")


def test_a_template_that_rewrites_the_conversation_before_an_answer_is_an_error() -> None:
    tokenizer = role_lines_tokenizer("acme/counting-chat", "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tokenizer.chat_template = ("{{ messages | selectattr('role', 'equalto', 'user') | list | length }} questions\n"
                               + tokenizer.chat_template)
    encode_conversation(tokenizer, conversation(1), 256)
    with pytest.raises(TemplateError, match="acme/counting-chat cannot be trained on by position: the prompt of "
                                            "assistant turn 1 is not a token prefix of the prompt of assistant turn 2"):
        encode_conversation(tokenizer, conversation(2), 256)


def test_the_last_message_must_be_the_assistants(chatml_tokenizer) -> None:
    for messages in (conversation(2)[:-1], []):
        with pytest.raises(TemplateError, match="last message .* must be the assistant's answer"):
            encode_conversation(chatml_tokenizer, messages, 256)


def test_an_unknown_train_on_is_refused(chatml_tokenizer) -> None:
    with pytest.raises(ValueError, match="train_on: expected one of all_assistant_turns, last_assistant_turn"):
        encode_conversation(chatml_tokenizer, conversation(1), 256, "every_turn")


# --- truncation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_truncation_keeps_the_prompt_and_cuts_the_answer(tokenizers, kind: str) -> None:
    tokenizer = tokenizers[kind]
    full, _ = expected_example(tokenizer, kind, 1)
    max_len = len(full["input_ids"]) - 3
    example, truncated = encode_conversation(tokenizer, conversation(1), max_len)
    assert truncated is True
    assert example == {key: value[:max_len] for key, value in full.items()}
    assert n_supervised(example["labels"]) == LABEL_COUNTS[kind][1][1] - 3


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_exact_fit_is_not_truncated(tokenizers, kind: str) -> None:
    tokenizer = tokenizers[kind]
    full, _ = expected_example(tokenizer, kind, 3)
    example, truncated = encode_conversation(tokenizer, conversation(3), len(full["input_ids"]))
    assert truncated is False
    assert example == full


@pytest.mark.parametrize("cut", [0, 5])
@pytest.mark.parametrize("kind", ["chatml", "zephyr"])
def test_prompt_filling_max_length_leaves_no_supervised_token(tokenizers, kind: str, cut: int) -> None:
    tokenizer = tokenizers[kind]
    _, [(answer_start, _)] = expected_example(tokenizer, kind, 1)
    max_len = answer_start - cut
    example, truncated = encode_conversation(tokenizer, conversation(1), max_len)
    assert truncated is True
    assert len(example["input_ids"]) == max_len
    assert example["labels"] == [IGNORE_INDEX] * max_len


@pytest.mark.parametrize("kind", ["chatml", "zephyr"])
def test_a_prompt_whose_answer_was_cut_away_is_dropped_with_it(tokenizers, kind: str) -> None:
    """Cut anywhere in the second turn's prompt (or right after it): the example ends after the first answer."""
    tokenizer = tokenizers[kind]
    full, [(_, first_end), (second_start, _), _] = expected_example(tokenizer, kind, 3)
    for max_len in (first_end + 1, second_start - 1, second_start):
        example, truncated = encode_conversation(tokenizer, conversation(3), max_len)
        assert truncated is True
        assert example == {key: value[:first_end] for key, value in full.items()}
        assert example["labels"][-1] != IGNORE_INDEX
    example, _ = encode_conversation(tokenizer, conversation(3), second_start + 1)
    assert example == {key: value[:second_start + 1] for key, value in full.items()}
    assert n_supervised(example["labels"][second_start:]) == 1


def test_truncation_at_every_length_ends_on_an_answer_token(chatml_tokenizer) -> None:
    full, spans = expected_example(chatml_tokenizer, "chatml", 3)
    for max_len in range(1, len(full["input_ids"]) + 2):
        example, truncated = encode_conversation(chatml_tokenizer, conversation(3), max_len)
        ends = [min(max_len, end) for start, end in spans if start < max_len]
        length = ends[-1] if ends else max_len
        assert example == {key: value[:length] for key, value in full.items()}, max_len
        assert truncated is (max_len < len(full["input_ids"]))
        assert not ends or example["labels"][-1] != IGNORE_INDEX


def test_last_assistant_turn_whose_answer_is_cut_away_is_dropped(chatml_tokenizer) -> None:
    _, spans = expected_example(chatml_tokenizer, "chatml", 2)
    record = {"id": "two-turns", "messages": conversation(2)}
    example, truncated = encode_record(chatml_tokenizer, record, spans[1][0], None, LAST_ASSISTANT_TURN)
    assert truncated is True and n_supervised(example["labels"]) == 0
    examples, stats = encode_records(chatml_tokenizer, [record], spans[1][0], None, train_on=LAST_ASSISTANT_TURN)
    assert examples == [] and stats.dropped_no_supervised_tokens == 1 and stats.dropped_ids == ["two-turns"]
    examples, stats = encode_records(chatml_tokenizer, [record], spans[1][0], None)
    assert stats.kept == 1 and stats.truncated == 1 and stats.supervised_tokens == spans[0][1] - spans[0][0]


# --- huge records -------------------------------------------------------------------------------

@pytest.fixture()
def characters_tokenized(monkeypatch: pytest.MonkeyPatch, chatml_tokenizer) -> list[int]:
    """The length of every text handed to the (chatml) tokenizer during the test."""
    seen: list[int] = []
    cls = type(chatml_tokenizer)
    original = cls.__call__

    def counting_call(self, text, *args, **kwargs):
        seen.append(len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting_call)
    return seen


@pytest.mark.parametrize("role", ["assistant", "user"])
def test_a_huge_message_is_cut_before_tokenizing(chatml_tokenizer, characters_tokenized, role: str) -> None:
    max_len = 64
    limit = message_char_limit(chatml_tokenizer, max_len)
    words = "the quick brown fox jumps over the lazy dog "
    huge = (words * (20_000_000 // len(words) + 1))[:20_000_000]  # a 20 MB message
    messages = conversation(1)
    messages[0 if role == "user" else 1] = {"role": role, "content": huge}
    example, truncated = encode_conversation(chatml_tokenizer, messages, max_len)
    assert truncated is True and len(example["input_ids"]) == max_len
    assert sum(characters_tokenized) < 4 * limit < 40_000
    # Tokenizing the whole conversation, as before, gives the same kept tokens.
    longer = (words * (3 * limit // len(words)))
    messages[0 if role == "user" else 1]["content"] = longer
    whole = encode_prompt(chatml_tokenizer, render_conversation(chatml_tokenizer, messages))
    assert example["input_ids"] == whole[:max_len]
    prompt = encode_prompt(chatml_tokenizer, SMOLLM_SYSTEM + CHATML_PROMPT.format("Name a color."))
    assert n_supervised(example["labels"]) == (0 if role == "user" else max_len - len(prompt))


def test_message_char_limit_grows_with_the_budget_and_the_longest_token(chatml_tokenizer) -> None:
    longest = max(len(token) for token in chatml_tokenizer.get_vocab())
    assert message_char_limit(chatml_tokenizer, 64) == (64 + 64) * longest
    assert message_char_limit(chatml_tokenizer, 512) == (512 + 64) * longest


# --- encode_records -----------------------------------------------------------------------------

def test_encode_records_drops_and_counts_on_a_designed_set(zephyr_tokenizer) -> None:
    tokenizer, max_len = zephyr_tokenizer, 64
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)

    def record(record_id: str, user: str, answer: str) -> dict:
        return {"id": record_id, "messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": answer}]}

    short = [record(f"short{i}", f"Say {i}.", "Okay.") for i in range(3)]
    long_answer = [record(f"answer{i}", f"Tell {i}.", long_text) for i in range(2)]
    long_prompt = [record(f"prompt{i}", f"Read {i}.\n\n{long_text}", "Done.") for i in range(2)]
    records = [short[0], long_prompt[0], long_answer[0], short[1], long_prompt[1], short[2], long_answer[1]]
    # The design holds for this tokenizer: shorts fit, long answers overflow, long prompts fill.
    assert len(tokenizer("<|user|>\nSay 0.</s>\n<|assistant|>\nOkay.</s>\n").input_ids) < max_len
    assert len(tokenizer("<|user|>\nTell 0.</s>\n<|assistant|>\n").input_ids) < max_len
    assert len(tokenizer(long_text, add_special_tokens=False).input_ids) > max_len
    examples, stats = encode_records(tokenizer, records, max_len, None)
    assert (stats.read, stats.kept, stats.dropped_no_supervised_tokens, stats.truncated) == (7, 5, 2, 2)
    assert stats.read == stats.kept + stats.dropped_no_supervised_tokens
    assert stats.dropped_ids == ["prompt0", "prompt1"]
    assert [len(e["input_ids"]) for e in examples][1] == max_len  # answer0, cut to max_len
    assert [len(e["input_ids"]) for e in examples][4] == max_len  # answer1
    assert stats.supervised_tokens == sum(n_supervised(e["labels"]) for e in examples)
    assert stats.prompt_tokens == sum(e["labels"].count(IGNORE_INDEX) for e in examples)
    kept_in_order = [r for r in records if not r["id"].startswith("prompt")]
    assert examples == [encode_record(tokenizer, r, max_len, None)[0] for r in kept_in_order]
    assert stats.as_dict()["dropped_ids"] == ["prompt0", "prompt1"]


def test_encode_records_keeps_everything_that_fits(chatml_tokenizer) -> None:
    examples, stats = encode_records(chatml_tokenizer, conversation_records(12), 256, None)
    assert (stats.read, stats.kept, stats.dropped_no_supervised_tokens, stats.truncated) == (12, 12, 0, 0)
    assert stats.dropped_ids == []
    assert all(e["labels"][-2] == chatml_tokenizer.eos_token_id for e in examples)


@pytest.mark.parametrize("train_on, trained", [(ALL_ASSISTANT_TURNS, 27), (LAST_ASSISTANT_TURN, 10)])
def test_encode_records_passes_train_on(chatml_tokenizer, train_on: str, trained: int) -> None:
    _, stats = encode_records(chatml_tokenizer, [{"id": "c", "messages": conversation(3)}], 256, None,
                              train_on=train_on)
    assert (stats.supervised_tokens, stats.prompt_tokens) == (trained, 114 - trained)


def test_alpaca_records_are_distinct_and_deterministic() -> None:
    records = alpaca_records(30)
    assert records == alpaca_records(30)
    assert len({r["id"] for r in records}) == len({(r["instruction"], r["input"]) for r in records}) == 30
    assert {len(r["output"].split()) for r in records} <= set(range(1, 41))
    assert min(len(r["output"].split()) for r in records) == 1
    assert max(len(r["output"].split()) for r in records) == 40
    assert sum(bool(r["input"]) for r in records) == 10
    assert all(set(r) == {"id", "instruction", "input", "output", "source"} for r in records)
