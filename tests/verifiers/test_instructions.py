"""Each of the 25 IFEval checkers on hand-made responses that follow it and that do not."""

from __future__ import annotations

import pytest

from sft.errors import DataError
from sft.verifiers.instructions import INSTRUCTIONS, bind, followed, record_checks
from sft.verifiers.text import count_sentences, detect_language, word_tokens

ESSAY = ("The river runs past the old mill toward the sea. Birds sing in the warm evening light. "
         "The quick brown fox jumps over the lazy dog.")

# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["river", "Mill"]}, ESSAY, "The river runs to the sea."),
    ("keywords:frequency", {"keyword": "the", "frequency": 4, "relation": "at least"}, ESSAY, "The sea."),
    ("keywords:frequency", {"keyword": "fox", "frequency": 2, "relation": "less than"}, ESSAY, "Fox, fox and FOX."),
    # A forbidden word must stand alone: "rider" does not contain the word "ride".
    ("keywords:forbidden_words", {"forbidden_words": ["ride", "bark"]}, "The rider rested.", "Dogs BARK at night."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Zany zebras.", "A zebra."),
    ("keywords:letter_frequency", {"letter": "!", "let_frequency": 2, "let_relation": "at least"},
     "Wow! Great!", "Wow! Great."),
    ("language:response_language", {"language": "de"},
     "Das ist ein kurzer Satz auf Deutsch, und er bleibt auch auf Deutsch.", ESSAY),
    ("change_case:english_capital", {}, "THIS ANSWER IS WRITTEN ENTIRELY IN CAPITAL LETTERS, AS ASKED.",
     "This answer is NOT written in capital letters."),
    ("change_case:english_capital", {}, "THIS ANSWER IS WRITTEN ENTIRELY IN CAPITAL LETTERS, AS ASKED.",
     "DIESE ANTWORT IST GANZ IN GROSSBUCHSTABEN UND AUF DEUTSCH GESCHRIEBEN, NICHT AUF ENGLISCH."),
    ("change_case:english_lowercase", {}, "this answer is written entirely in lowercase letters, as asked.",
     "this answer is written in lowercase letters, except for One word."),
    # nltk.word_tokenize splits "I'm" into "I" and "'m", so "I" counts as a capitalized word.
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "I'm sure NASA and the USA agree.", "I'm sure Nasa and the Usa agree."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only ONE word here.", "TWO WORDS here."),
    # Punkt knows "Dr." is an abbreviation: two sentences, not three.
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith went home. He was tired.", ESSAY),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, ESSAY,
     "Dr. Smith went home. He was tired."),
    ("length_constraints:number_words", {"num_words": 20, "relation": "at least"}, ESSAY, "Too short to count."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Four words right here.",
     "Five words are right here."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First part.\n***\nSecond part.\n***\nThird part.", "First part.\n***\n\n***\nThird part."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nFirst part.\n***\nSecond part.\n***",
     "First part.\n***\nSecond part.\n***\nThird part."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "weekend"},
     "Intro.\n\n\"Weekend, at last!\" she said.\n\nThe end.", "Intro.\n\nThe weekend came.\n\nThe end."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "elm"},
     "Elm trees grow tall.\n\nThey shade the street.", "Elm trees grow tall.\n\nThey shade.\n\nThe end."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you at [address].",
     "Dear [name], see you soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks.\n\nP. S. Bring snacks.",
     "Thanks. PS bring snacks."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Thanks.\np.p.s. Bring snacks.",
     "Thanks.\nP.S. Bring snacks."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Items:\n* one\n* two\n- three",
     "Items:\n* one\n* two\n**three**"),
    ("detectable_format:constrained_response", {}, "I think so. My answer is yes.", "Yes, I think so."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*One* part and **two** parts.",
     "*One* part and ** ** nothing else."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIntro.\nSection 2\nBody.", "Section 1\nIntro.\nSection two\nBody."),
    ("detectable_format:json_format", {}, "```json\n{\"answer\": [1, 2]}\n```", "Here it is: {\"answer\": 1}"),
    ("detectable_format:title", {}, "<<A Poem of Joy>>\nRoses are red.", "<< >>\nRoses are red."),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
    ("combination:two_responses", {}, "******\nFirst answer.\n******\nSecond answer.",
     "First.\n******\n\n******\nSecond."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses are red.",
     "Sure! Write a poem. Roses are red."),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Done.\nIs there anything else I can help with?\"", "Is there anything else I can help with? Bye."),
    ("startend:quotation", {}, "  \"Wrapped in quotes.\"\n", "\"Only an opening quote."),
    ("punctuation:no_comma", {}, "No commas here at all.", "One comma, here."),
]


def test_every_instruction_type_has_a_case() -> None:
    assert len(INSTRUCTIONS) == 25
    assert {case[0] for case in CASES} == set(INSTRUCTIONS)


@pytest.mark.parametrize(("instruction_id", "kwargs", "follows", "breaks"), CASES,
                         ids=[f"{case[0]}-{number}" for number, case in enumerate(CASES)])
def test_checker_passes_and_fails(instruction_id: str, kwargs: dict, follows: str, breaks: str) -> None:
    check = bind(instruction_id, kwargs)
    assert check(follows) is True
    assert check(breaks) is False


def test_text_measures_follow_nltk() -> None:
    assert count_sentences("Dr. Smith went home. He was tired. U.S. troops left.") == 3
    assert word_tokens("I'm sure. DON'T go.") == ["I", "'m", "sure", ".", "DO", "N'T", "go", "."]


def test_language_detection_is_repeatable_and_finds_nothing_in_digits() -> None:
    mixed = "ok merci danke gracias"  # ambiguous text, where an unseeded detector varies between calls
    assert len({detect_language(mixed) for _ in range(10)}) == 1
    assert detect_language("12345 !!!") is None
    assert bind("language:response_language", {"language": "fi"})("12345 !!!") is True


@pytest.mark.parametrize(("instruction_id", "kwargs", "message"), [
    ("keywords:nonexistent", {}, "unknown instruction id"),
    ("punctuation:no_comma", {"num_words": 3}, "unknown ['num_words']"),
    ("length_constraints:number_words", {"num_words": 3}, "missing ['relation']"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at most"}, "relation must be one of"),
    ("length_constraints:number_words", {"num_words": "3", "relation": "at least"}, "whole number"),
    ("keywords:existence", {"keywords": "river"}, "list of strings"),
])
def test_bad_arguments_are_refused_when_bound(instruction_id: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        bind(instruction_id, kwargs)


def test_arguments_given_as_none_are_left_out() -> None:
    """The Hugging Face copy of the prompts lists every argument of every instruction, unused ones as None."""
    assert bind("punctuation:no_comma", {"num_words": None, "relation": None})("no commas") is True


@pytest.mark.parametrize("ids, kwargs, message", [
    (None, None, "^here: field 'instruction_id_list' must be a non-empty list of IFEval instruction ids; a hint$"),
    ([], [], "^here: field 'instruction_id_list' must be a non-empty list"),
    (["punctuation:no_comma"], [], r"^here: field 'kwargs' must hold one object per instruction id \(1 ids\)$"),
    (["punctuation:no_comma", "punctuation:no_coma"], [{}, {}],
     r"^here: field 'instruction_id_list'\[1\]: unknown instruction id 'punctuation:no_coma'$"),
    (["length_constraints:number_words"], [{"relation": "about", "num_words": 3}],
     r"^here: field 'kwargs'\[0\]: length_constraints:number_words: relation must be one of"),
])
def test_record_checks_name_the_field_of_a_bad_instruction(ids: object, kwargs: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        record_checks("here", {"instruction_id_list": ids, "kwargs": kwargs}, "; a hint")


def test_followed_judges_strictly_or_loosely_and_an_empty_answer_follows_nothing() -> None:
    checks = record_checks("here", {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
                                    "kwargs": [{}, {}]})
    assert followed(checks, '"Yes indeed"') == [True, True]
    assert followed(checks, 'Sure, here it is:\n"Yes indeed"') == [False, False]
    assert followed(checks, 'Sure, here it is:\n"Yes indeed"', loose=True) == [True, True]
    assert followed(checks, "  ", loose=True) == [False, False]
