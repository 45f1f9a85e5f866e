"""The 25 verifiable instructions of IFEval (Zhou et al. 2023), one checker function each.

A checker takes the response and the instruction's arguments (the ``kwargs`` of a prompt in
``input_data.jsonl``) and says whether the response follows it. The semantics are the reference
implementation's (google-research ``instruction_following_eval``, as lm-evaluation-harness runs
it), quirks included, because a score is only comparable with published ones if it is computed
the same way: keywords are regular expressions matched anywhere (so "ride" is found in "rider",
except for forbidden words, which must stand alone), a bullet is a line starting with ``*`` or
``-``, a paragraph for ``number_paragraphs`` ends at a ``***`` divider, and so on.

One deliberate difference: ``letter_frequency`` counts the character it is given. The reference
accepts only the letters a-z and silently draws a random letter for anything else (two IFEval
prompts ask for ``!`` and ``#``), which makes those two judgments change from run to run.
"""

from __future__ import annotations

import inspect
import json
import operator
import re
from collections.abc import Callable
from typing import Any

from sft.errors import DataError
from sft.verifiers.text import count_sentences, count_words, detect_language, word_tokens

Checker = Callable[..., bool]
Check = Callable[[str], bool]
"""A checker bound to its arguments: whether an answer follows one instruction."""

INSTRUCTIONS: dict[str, Checker] = {}
"""Instruction id -> checker(response, **kwargs)."""

RELATIONS = {"less than": operator.lt, "at least": operator.ge}
"""The comparisons counting instructions use, by the name the prompts file gives them."""

CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def instruction(instruction_id: str) -> Callable[[Checker], Checker]:
    def register(checker: Checker) -> Checker:
        INSTRUCTIONS[instruction_id] = checker
        return checker
    return register


def bind(instruction_id: str, kwargs: dict) -> Callable[[str], bool]:
    """The checker of ``instruction_id`` with its arguments, checked now so that a bad prompts
    file fails before any answer is generated. Arguments that are None are left out (the Hugging
    Face copy of the prompts gives every instruction every argument, unused ones as None)."""
    checker = INSTRUCTIONS.get(instruction_id)
    if checker is None:
        raise ValueError(f"unknown instruction id {instruction_id!r}")
    parameters = dict(list(inspect.signature(checker, eval_str=True).parameters.items())[1:])
    given = {name: value for name, value in kwargs.items() if value is not None}
    unknown = sorted(set(given) - set(parameters))
    missing = sorted(set(parameters) - set(given))
    if unknown or missing:
        raise ValueError(f"{instruction_id} takes {sorted(parameters) or 'no arguments'}; "
                         f"unknown {unknown}, missing {missing}")
    for name, value in given.items():
        expected = parameters[name].annotation
        if expected is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{instruction_id}: {name} must be a whole number >= 0, got {value!r}")
        if expected is str and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{instruction_id}: {name} must be a non-empty string, got {value!r}")
        if expected == list[str] and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{instruction_id}: {name} must be a list of strings, got {value!r}")
        if name.endswith("relation") and value not in RELATIONS:
            raise ValueError(f"{instruction_id}: {name} must be one of {list(RELATIONS)}, got {value!r}")
    return lambda response: checker(response, **given)


def record_checks(where: str, record: dict[str, Any], hint: str = "") -> list[Check]:
    """The bound checker of each instruction of a record (its ``instruction_id_list`` and ``kwargs``,
    IFEval's layout), or DataError naming ``where`` and the field; ``hint`` ends the message of a
    record without instructions."""
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: field 'instruction_id_list' must be a non-empty list of IFEval instruction ids{hint}")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise DataError(f"{where}: field 'kwargs' must hold one object per instruction id ({len(ids)} ids)")
    checks = []
    for index, (instruction_id, arguments) in enumerate(zip(ids, kwargs)):
        field = "instruction_id_list" if instruction_id not in INSTRUCTIONS else "kwargs"
        try:
            checks.append(bind(instruction_id, arguments))
        except ValueError as exc:
            raise DataError(f"{where}: field {field!r}[{index}]: {exc}") from None
    return checks


def loose_variants(response: str) -> list[str]:
    """The response, without its first and/or last line, each with and without ``*``."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [trimmed[0], trimmed[0].replace("*", ""), *trimmed[1:], *(t.replace("*", "") for t in trimmed[1:])]


def followed(checks: list[Check], response: str, loose: bool = False) -> list[bool]:
    """Whether the response follows each instruction: strictly as it is, or (``loose``) in any of
    its :func:`loose_variants`. An empty response follows nothing."""
    candidates = loose_variants(response) if loose else [response]
    return [any(text.strip() and check(text) for text in candidates) for check in checks]


# Keywords.

@instruction("keywords:existence")
def keywords_exist(response: str, keywords: list[str]) -> bool:
    return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in keywords)


@instruction("keywords:frequency")
def keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    count = len(re.findall(keyword.strip(), response, flags=re.IGNORECASE))
    return RELATIONS[relation](count, frequency)


@instruction("keywords:forbidden_words")
def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{word}\b", response, flags=re.IGNORECASE) for word in forbidden_words)


@instruction("keywords:letter_frequency")
def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return RELATIONS[let_relation](response.lower().count(letter.strip().lower()), let_frequency)


# Language and case. langdetect finding no language counts as followed, as in the reference.

@instruction("language:response_language")
def response_language(response: str, language: str) -> bool:
    return detect_language(response) in (language, None)


@instruction("change_case:english_capital")
def english_capital(response: str) -> bool:
    return response.isupper() and detect_language(response) in ("en", None)


@instruction("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    return response.islower() and detect_language(response) in ("en", None)


@instruction("change_case:capital_word_frequency")
def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    capitalized = sum(token.isupper() for token in word_tokens(response))
    return RELATIONS[capital_relation](capitalized, capital_frequency)


# Length.

@instruction("length_constraints:number_sentences")
def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return RELATIONS[relation](count_sentences(response), num_sentences)


@instruction("length_constraints:number_words")
def number_words(response: str, num_words: int, relation: str) -> bool:
    return RELATIONS[relation](count_words(response), num_words)


@instruction("length_constraints:number_paragraphs")
def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Paragraphs separated by ``***``; an empty one counts against the response unless it is
    before the first divider or after the last."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    inner_empty = any(not p.strip() for p in paragraphs[1:-1])
    outer_empty = (not paragraphs[0].strip()) + (len(paragraphs) > 1 and not paragraphs[-1].strip())
    return not inner_empty and len(paragraphs) - outer_empty == num_paragraphs


@instruction("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs separated by a blank line (``\\n\\n``); the count skips empty ones but the nth is
    taken from all of them, as the reference does. The first word is read up to its first
    punctuation mark, after leading quotes."""
    paragraphs = response.split("\n\n")
    count = sum(bool(p.strip()) for p in paragraphs)
    if not 1 <= nth_paragraph <= count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    word = re.split(r"""[.,?!'"]""", word, maxsplit=1)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


# Content.

@instruction("detectable_content:number_placeholders")
def number_placeholders(response: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


@instruction("detectable_content:postscript")
def postscript(response: str, postscript_marker: str) -> bool:
    """A line containing the marker, case-insensitive; ``P.P.S`` and ``P.S.`` may have a space
    after each dot. Other markers are regular expressions, as in the reference."""
    marker = postscript_marker.strip()
    pattern = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}.get(marker, marker.lower())
    return re.search(rf"\s*{pattern}.*$", response.lower(), flags=re.MULTILINE) is not None


# Format.

@instruction("detectable_format:number_bullet_lists")
def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly that many lines starting with ``*`` (not ``**``) or ``-``."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


@instruction("detectable_format:constrained_response")
def constrained_response(response: str) -> bool:
    return any(option in response for option in CONSTRAINED_RESPONSES)


@instruction("detectable_format:number_highlighted_sections")
def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """Non-empty ``*text*`` or ``**text**`` spans within a line."""
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


@instruction("detectable_format:multiple_sections")
def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least that many headers "<splitter> <number>" (the splitter is a regular expression)."""
    headers = re.split(rf"\s?{section_spliter.strip()}\s?\d+\s?", response)
    return len(headers) - 1 >= num_sections


@instruction("detectable_format:json_format")
def json_format(response: str) -> bool:
    """The whole response parses as JSON, once a surrounding Markdown code fence is removed."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix("```").strip())
    except ValueError:
        return False
    return True


@instruction("detectable_format:title")
def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# Combinations, start and end, punctuation.

@instruction("combination:two_responses")
def two_responses(response: str) -> bool:
    """Two different answers separated by ``******``; only the ends may be empty."""
    parts = response.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


@instruction("combination:repeat_prompt")
def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@instruction("startend:end_checker")
def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@instruction("startend:quotation")
def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@instruction("punctuation:no_comma")
def no_comma(response: str) -> bool:
    return "," not in response

