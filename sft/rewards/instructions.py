"""The instructions we attach to prompts: for each of IFEval's 25 checker types, how its arguments
are drawn, how it is asked for (several phrasings of our own, never IFEval's sentences), and which
types never go together.

A drawn instruction is ``(instruction_id, kwargs)`` with exactly the arguments the checker of
``sft.verifiers.instructions`` reads, in the reference's ``input_data.jsonl`` layout, so the
IFEval scorer judges an answer to it. Keywords, forbidden words and first words come from the
prompt itself where it has content words, so the instruction fits the request.

Two kinds of incompatibility keep an instruction set satisfiable:

- :data:`CONFLICTS`, by type: a JSON answer cannot also be a bulleted list, an all-lowercase one
  cannot be all capitals, a reply in French cannot contain English keywords, and so on. Each type
  also conflicts with itself (one instruction per type), the four length types with each other,
  and ``constrained_response`` (a fixed one-line answer) with everything.
- :func:`compatible`, by arguments: no instruction may forbid text another one requires (a
  forbidden word that is also a keyword, a comma in the request to repeat under ``no_comma``, a
  letter allowed fewer times than the end phrase uses it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sft.verifiers.text import word_tokens

Kwargs = dict[str, Any]

STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just me more
most my myself no nor not now of off on once only or other our ours out over own same she should so
some such than that the their theirs them themselves then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you your
yours yourself please give write make tell using based following create describe explain provide
list name find generate short something thing things way ways item input output sentence text
""".split())  # noqa: SIM905 - a word list reads best as text

LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch", "sv": "Swedish", "pl": "Polish", "tr": "Turkish", "id": "Indonesian",
             "fi": "Finnish", "da": "Danish"}
"""langdetect codes the checker compares with, for languages written in Latin script with spaces
between words (so word and letter counts keep their meaning)."""

END_PHRASES = ("Ask me if anything is unclear.", "That is all for now.", "Hope this helps!",
               "Thank you for reading.", "Feel free to ask for more.", "This concludes my answer.")
FILLER_WORDS = ("very", "really", "basically", "actually", "simply", "important", "great", "however",
                "thing", "good", "also", "many")
FIRST_WORDS = ("first", "overall", "today", "however", "finally", "moreover", "imagine", "consider")
SECTION_SPLITTERS = ("Section", "SECTION", "Part", "PART", "Chapter", "Step")
PLACEHOLDER_EXAMPLES = ("[name]", "[date]", "[city]", "[company]", "[amount]", "[address]")
ORDINALS = ("first", "second", "third", "fourth", "fifth")


@dataclass(frozen=True)
class Context:
    """What an instruction may draw on: the request it is attached to."""

    request: str
    """The user turn the instruction is appended to, as the source had it."""

    @property
    def content_words(self) -> list[str]:
        """The request's distinct lowercased words of four letters or more that are not stopwords,
        in order of appearance."""
        words = [w.lower() for w in re.findall(r"\b[^\W\d_]{4,}\b", self.request)]
        return list(dict.fromkeys(w for w in words if w not in STOPWORDS))


@dataclass(frozen=True)
class InstructionType:
    draw: Callable[[random.Random, Context], Kwargs | None]
    """Arguments for the checker, or None where the type does not fit the request."""
    phrasings: tuple[str, ...]
    """Format strings over :func:`phrase_fields`."""


def _relation(rng: random.Random, low: int, high: int, less_low: int | None = None) -> tuple[str, int]:
    """A relation and a count: "at least" from [low, high], "less than" from [less_low, high + 1]."""
    if rng.random() < 0.6:
        return "at least", rng.randint(low, high)
    return "less than", rng.randint(less_low if less_low is not None else low + 1, high + 1)


def _keywords(rng: random.Random, context: Context) -> Kwargs | None:
    words = context.content_words
    return {"keywords": rng.sample(words, min(len(words), rng.randint(1, 2)))} if words else None


def _keyword_frequency(rng: random.Random, context: Context) -> Kwargs | None:
    words = context.content_words
    if not words:
        return None
    relation, frequency = _relation(rng, 2, 4, less_low=2)
    return {"keyword": rng.choice(words), "frequency": frequency, "relation": relation}


def _forbidden(rng: random.Random, context: Context) -> Kwargs:
    pool = sorted(set(context.content_words[:6]) | set(FILLER_WORDS))
    return {"forbidden_words": rng.sample(pool, rng.randint(1, 3))}


def _letter(rng: random.Random, context: Context) -> Kwargs:
    if rng.random() < 0.7:
        return {"letter": rng.choice("etaoinshrdlcumwfgypb"), "let_frequency": rng.randint(2, 10),
                "let_relation": "at least"}
    return {"letter": rng.choice("qxzj"), "let_frequency": rng.randint(2, 4), "let_relation": "less than"}


def _language(rng: random.Random, context: Context) -> Kwargs:
    return {"language": rng.choice(sorted(LANGUAGES))}


def _capital_words(rng: random.Random, context: Context) -> Kwargs:
    relation, frequency = _relation(rng, 2, 6, less_low=3)
    return {"capital_frequency": frequency, "capital_relation": relation}


def _sentences(rng: random.Random, context: Context) -> Kwargs:
    relation, count = _relation(rng, 2, 8, less_low=3)
    return {"num_sentences": count, "relation": relation}


def _words(rng: random.Random, context: Context) -> Kwargs:
    relation = "at least" if rng.random() < 0.5 else "less than"
    count = rng.randrange(20, 201, 10) if relation == "at least" else rng.randrange(40, 301, 10)
    return {"num_words": count, "relation": relation}


def _paragraphs(rng: random.Random, context: Context) -> Kwargs:
    return {"num_paragraphs": rng.randint(2, 5)}


def _nth_paragraph(rng: random.Random, context: Context) -> Kwargs:
    paragraphs = rng.randint(2, 5)
    words = context.content_words[:4] + list(FIRST_WORDS)
    return {"num_paragraphs": paragraphs, "nth_paragraph": rng.randint(1, paragraphs), "first_word": rng.choice(words)}


def _count(name: str, low: int, high: int) -> Callable[[random.Random, Context], Kwargs]:
    return lambda rng, context: {name: rng.randint(low, high)}


def _no_arguments(rng: random.Random, context: Context) -> Kwargs:
    return {}


def _postscript(rng: random.Random, context: Context) -> Kwargs:
    return {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}


def _sections(rng: random.Random, context: Context) -> Kwargs:
    return {"section_spliter": rng.choice(SECTION_SPLITTERS), "num_sections": rng.randint(2, 4)}


def _repeat(rng: random.Random, context: Context) -> Kwargs | None:
    request = context.request.strip()
    return {"prompt_to_repeat": request} if 0 < len(request) <= 300 else None


def _end(rng: random.Random, context: Context) -> Kwargs:
    return {"end_phrase": rng.choice(END_PHRASES)}


TYPES: dict[str, InstructionType] = {
    "keywords:existence": InstructionType(_keywords, (
        "Include {keywords} in your reply.",
        "Your answer has to mention {keywords}.",
        "Somewhere in the response, use {keywords}.",
    )),
    "keywords:frequency": InstructionType(_keyword_frequency, (
        "Use the word '{keyword}' {relation} {frequency} times.",
        "Let '{keyword}' come up {relation} {frequency} times in what you write.",
        "Mention '{keyword}' {relation} {frequency} times.",
    )),
    "keywords:forbidden_words": InstructionType(_forbidden, (
        "Do not write {forbidden_words} anywhere.",
        "Avoid {forbidden_words} entirely.",
        "Your text must not contain {forbidden_words}.",
    )),
    "keywords:letter_frequency": InstructionType(_letter, (
        "Across the whole reply, the letter '{letter}' has to occur {let_relation} {let_frequency} times.",
        "Write so that {letter} (the letter) is used {let_relation} {let_frequency} times.",
        "Count your letters: '{letter}' must be used {let_relation} {let_frequency} times.",
    )),
    "language:response_language": InstructionType(_language, (
        "Reply only in {language}; no other language.",
        "Write the whole answer in {language}.",
        "Everything you write must be in {language}.",
    )),
    "change_case:english_capital": InstructionType(_no_arguments, (
        "Write your whole reply in English, in capital letters only.",
        "Use English and nothing but uppercase letters throughout.",
        "Answer in English, with every single letter capitalized.",
    )),
    "change_case:english_lowercase": InstructionType(_no_arguments, (
        "Answer in English using lowercase letters only; no capitals at all.",
        "Keep every letter of your English answer in lowercase.",
        "Write in English, and do not capitalize a single letter.",
    )),
    "change_case:capital_word_frequency": InstructionType(_capital_words, (
        "Your reply should contain {capital_relation} {capital_frequency} words written entirely in capitals.",
        "Put {capital_relation} {capital_frequency} all-caps words (like THIS) in your answer.",
        "Use {capital_relation} {capital_frequency} words spelled in ALL CAPS.",
    )),
    "length_constraints:number_sentences": InstructionType(_sentences, (
        "Answer in {relation} {num_sentences} sentences.",
        "Your reply's sentence count must be {relation} {num_sentences}.",
        "Write {relation} {num_sentences} sentences in total.",
    )),
    "length_constraints:number_words": InstructionType(_words, (
        "Make the answer {relation} {num_words} words in length.",
        "Write {relation} {num_words} words.",
        "Use {relation} {num_words} words in your reply.",
    )),
    "length_constraints:number_paragraphs": InstructionType(_paragraphs, (
        "Write exactly {num_paragraphs} paragraphs, with a line holding only *** between one and the next.",
        "Split your answer into {num_paragraphs} paragraphs separated by the divider ***.",
        "Your reply must have {num_paragraphs} paragraphs; put *** between neighbouring ones.",
    )),
    "length_constraints:nth_paragraph_first_word": InstructionType(_nth_paragraph, (
        ("Write {num_paragraphs} paragraphs separated by blank lines; paragraph number {nth_paragraph} must "
        "begin with the word '{first_word}'."),
        ("Your reply needs {num_paragraphs} paragraphs with an empty line between each; start the {ordinal} "
        "paragraph with '{first_word}'."),
        ("Answer in {num_paragraphs} paragraphs (one blank line apart), the {ordinal} of which opens with the "
        "word '{first_word}'."),
    )),
    "detectable_content:number_placeholders": InstructionType(_count("num_placeholders", 1, 4), (
        "Include {num_placeholders} or more placeholders in square brackets, e.g. {example}.",
        "Leave {relation_free} blanks for the reader to fill, written as placeholders such as {example}.",
        "Put no fewer than {num_placeholders} bracketed placeholders like {example} in your response.",
    )),
    "detectable_content:postscript": InstructionType(_postscript, (
        "End with a postscript that begins with {postscript_marker}",
        "After the main answer, tack on a postscript whose first characters are {postscript_marker}",
        "Close with an extra line opening with {postscript_marker}",
    )),
    "detectable_format:number_bullet_lists": InstructionType(_count("num_bullets", 2, 6), (
        "Give exactly {num_bullets} bullet points (lines starting with '* ' or '- ') and no other bullets.",
        "Format the reply as a Markdown list of precisely {num_bullets} items, like '* an item'.",
        "Your answer must hold {num_bullets} bullets, no more and no fewer, each a line beginning with '- '.",
    )),
    "detectable_format:constrained_response": InstructionType(_no_arguments, (
        ("Reply with one of these, word for word, and nothing else: either 'My answer is yes.', or else "
        "'My answer is no.', or then 'My answer is maybe.'"),
        ("Your whole reply is one of three sentences, 'My answer is yes.' or else 'My answer is no.' or "
        "perhaps 'My answer is maybe.'"),
        "Respond only with 'My answer is yes.', otherwise 'My answer is no.', or failing both 'My answer is maybe.'",
    )),
    "detectable_format:number_highlighted_sections": InstructionType(_count("num_highlights", 1, 4), (
        "Highlight {relation_free} parts of your answer with Markdown, like *this part*.",
        "Mark no fewer than {num_highlights} passages in italics with single asterisks, e.g. *key point*.",
        "Emphasize {num_highlights} or more phrases by wrapping them in *asterisks*.",
    )),
    "detectable_format:multiple_sections": InstructionType(_sections, (
        ("Organize the response into {num_sections} sections, each headed '{section_spliter} N' where N is its "
        "number."),
        "Break your answer into {num_sections} parts labeled {section_spliter} 1, {section_spliter} 2 and so on.",
        "Use {num_sections} numbered sections, each starting with a line like '{section_spliter} 1'.",
    )),
    "detectable_format:json_format": InstructionType(_no_arguments, (
        "Give your entire answer as valid JSON (a ```json code block is fine).",
        "Format the whole reply as one JSON object and nothing else.",
        "Your output must parse as JSON, with no text outside it.",
    )),
    "detectable_format:title": InstructionType(_no_arguments, (
        "Start with a title inside double angle brackets, like <<A Title>>.",
        "Give your answer a title wrapped in << and >>, for example <<My Answer>>.",
        "Put a title such as <<Short Title>> at the top.",
    )),
    "combination:two_responses": InstructionType(_no_arguments, (
        "Write two different answers, separated by a line of six asterisks: ******",
        "Give two distinct replies and put ****** between them.",
        "Offer two alternative responses, divided by ******, and nothing else.",
    )),
    "combination:repeat_prompt": InstructionType(_repeat, (
        ("Before answering, copy out the request above exactly (leaving out these added requirements), then "
        "give your answer."),
        ("Begin your reply by restating the original request exactly as written, minus the conditions listed "
        "here; then answer it."),
        ("Your reply must open with the request repeated verbatim (only the part before these requirements), "
        "followed by your answer."),
    )),
    "startend:end_checker": InstructionType(_end, (
        "Make \"{end_phrase}\" the final words of your reply, with nothing after them.",
        "The very last words of your reply must be: {end_phrase}",
        "End your answer with this exact sentence: {end_phrase}",
    )),
    "startend:quotation": InstructionType(_no_arguments, (
        "Put your whole reply inside double quotation marks.",
        "Enclose the entire answer in double quotes (\").",
        "Wrap everything you write in one pair of double quotes.",
    )),
    "punctuation:no_comma": InstructionType(_no_arguments, (
        "Leave out commas entirely.",
        "Write without a single comma.",
        "No commas are allowed anywhere in the reply.",
    )),
}


def _symmetric(pairs: dict[str, set[str]]) -> dict[str, frozenset[str]]:
    table: dict[str, set[str]] = {name: {name} for name in TYPES}
    for name, others in pairs.items():
        for other in others:
            table[name].add(other)
            table[other].add(name)
    return {name: frozenset(others) for name, others in table.items()}


LENGTH = {"length_constraints:number_sentences", "length_constraints:number_words",
          "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"}
CASE = {"change_case:english_capital", "change_case:english_lowercase", "change_case:capital_word_frequency"}

CONFLICTS: dict[str, frozenset[str]] = _symmetric({
    # A fixed one-line answer leaves room for no other instruction.
    "detectable_format:constrained_response": set(TYPES),
    # One measure of length per prompt: two could contradict (at least 8 sentences, fewer than 40 words).
    **{name: LENGTH for name in LENGTH},
    **{name: CASE for name in CASE},
    # The answer in another language cannot hold English keywords, phrases or the English request,
    # nor be judged English; scripts aside, letter counts belong to English text.
    "language:response_language": {"keywords:existence", "keywords:frequency", "keywords:letter_frequency",
                                   "length_constraints:nth_paragraph_first_word", "startend:end_checker",
                                   "combination:repeat_prompt", "detectable_format:multiple_sections", *CASE},
    # JSON is the whole answer: no Markdown structure, prose around it, or sentences to count; and
    # an object of several fields needs commas.
    "detectable_format:json_format": {"detectable_format:number_bullet_lists",
                                      "detectable_format:number_highlighted_sections",
                                      "detectable_format:multiple_sections", "detectable_format:title",
                                      "combination:two_responses", "combination:repeat_prompt",
                                      "startend:quotation", "detectable_content:postscript", "startend:end_checker",
                                      "punctuation:no_comma", "change_case:english_capital", *LENGTH},
    # Two answers make every count and every start or end ambiguous.
    "combination:two_responses": {"combination:repeat_prompt", "startend:quotation", "startend:end_checker",
                                  "detectable_content:postscript", "detectable_format:number_bullet_lists",
                                  "detectable_format:multiple_sections", *LENGTH},
    # The repeated request opens the answer: it cannot open with a quote, and it counts towards lengths.
    "combination:repeat_prompt": {"startend:quotation", *LENGTH},
    # Both want the last line.
    "startend:end_checker": {"detectable_content:postscript"},
    # Section headers are capitalized words ("Section 1", "PART 2"); sections are paragraphs of
    # their own, whose count another instruction must not fix otherwise.
    "detectable_format:multiple_sections": {*CASE, "length_constraints:number_paragraphs",
                                            "length_constraints:nth_paragraph_first_word"},
    # A postscript is a paragraph of its own, beyond a count of blank-line paragraphs; the title
    # is asked for at the top, where the first paragraph's first word may be asked for.
    "detectable_content:postscript": {"length_constraints:nth_paragraph_first_word"},
    "detectable_format:title": {"length_constraints:nth_paragraph_first_word"},
})


def required_text(instruction_id: str, kwargs: Kwargs) -> list[str]:
    """Text an answer following the instruction must contain."""
    return {
        "keywords:existence": lambda: list(kwargs["keywords"]),
        "keywords:frequency": lambda: [kwargs["keyword"]] * kwargs["frequency"] if kwargs["relation"] == "at least"
        else [],
        "length_constraints:nth_paragraph_first_word": lambda: [kwargs["first_word"]],
        "combination:repeat_prompt": lambda: [kwargs["prompt_to_repeat"]],
        "startend:end_checker": lambda: [kwargs["end_phrase"]],
        "detectable_format:multiple_sections": lambda: [kwargs["section_spliter"]] * kwargs["num_sections"],
        "detectable_content:postscript": lambda: [kwargs["postscript_marker"]],
    }.get(instruction_id, list)()


def forbids(instruction_id: str, kwargs: Kwargs, texts: list[str]) -> bool:
    """Whether the instruction rules out an answer containing all of ``texts``."""
    joined = "\n".join(texts)
    if instruction_id == "keywords:forbidden_words":
        return any(re.search(rf"\b{word}\b", joined, flags=re.IGNORECASE) for word in kwargs["forbidden_words"])
    if instruction_id == "punctuation:no_comma":
        return "," in joined
    if instruction_id == "keywords:letter_frequency" and kwargs["let_relation"] == "less than":
        return joined.lower().count(kwargs["letter"]) >= kwargs["let_frequency"]
    if instruction_id == "change_case:capital_word_frequency" and kwargs["capital_relation"] == "less than":
        return sum(token.isupper() for token in word_tokens(joined)) >= kwargs["capital_frequency"]
    if instruction_id == "keywords:frequency" and kwargs["relation"] == "less than":
        return len(re.findall(kwargs["keyword"], joined, flags=re.IGNORECASE)) >= kwargs["frequency"]
    return False


def compatible(chosen: list[tuple[str, Kwargs]], candidate: tuple[str, Kwargs]) -> bool:
    """Whether ``candidate`` can join the instructions ``chosen``: no type conflict, and no
    instruction forbids what the others require."""
    if any(instruction_id in CONFLICTS[candidate[0]] for instruction_id, _ in chosen):
        return False
    instructions = [*chosen, candidate]
    required = [text for instruction_id, kwargs in instructions for text in required_text(instruction_id, kwargs)]
    return not any(forbids(instruction_id, kwargs, required) for instruction_id, kwargs in instructions)


def _word_list(words: list[str]) -> str:
    quoted = [f"'{word}'" for word in words]
    body = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return f"the word{'s' if len(words) > 1 else ''} {body}"


def phrase_fields(instruction_id: str, kwargs: Kwargs, rng: random.Random) -> dict[str, Any]:
    """The values a phrasing may name: the arguments, with relations, word lists and codes in words."""
    fields = dict(kwargs)
    for key in ("relation", "let_relation", "capital_relation"):
        if key in kwargs:
            fields[key] = rng.choice(("at least", "no fewer than") if kwargs[key] == "at least"
                                     else ("fewer than", "less than"))
    if "keywords" in kwargs:
        fields["keywords"] = _word_list(kwargs["keywords"])
    if "forbidden_words" in kwargs:
        fields["forbidden_words"] = _word_list(kwargs["forbidden_words"]).replace(" and ", " or ")
    if "language" in kwargs:
        fields["language"] = LANGUAGES[kwargs["language"]]
    if "nth_paragraph" in kwargs:
        fields["ordinal"] = ORDINALS[kwargs["nth_paragraph"] - 1]
    count = kwargs.get("num_placeholders", kwargs.get("num_highlights"))
    if count is not None:
        fields["relation_free"] = f"at least {count}"
        fields["example"] = rng.choice(PLACEHOLDER_EXAMPLES)
    return fields


# A count of one takes the singular: "at least 1 blank", "1 bracketed placeholder", "1 word written".
_ONE_PLURAL = re.compile(r"\b1 ((?:[\w-]+ )?)(blank|placeholder|part|passage|phrase|paragraph|sentence|word"
                         r"|section|bullet|point|item|time)s\b")


def phrase(instruction_id: str, kwargs: Kwargs, rng: random.Random) -> str:
    """One of the type's phrasings, filled in, in the singular where a count is one."""
    template = rng.choice(TYPES[instruction_id].phrasings)
    return _ONE_PLURAL.sub(r"1 \1\2", template.format(**phrase_fields(instruction_id, kwargs, rng)))


def draw_instructions(rng: random.Random, context: Context, count: int,
                      allowed: list[str]) -> list[tuple[str, Kwargs]]:
    """Up to ``count`` compatible instructions of the ``allowed`` types, in drawing order."""
    chosen: list[tuple[str, Kwargs]] = []
    for instruction_id in rng.sample(allowed, len(allowed)):
        if len(chosen) == count:
            break
        kwargs = TYPES[instruction_id].draw(rng, context)
        if kwargs is not None and compatible(chosen, (instruction_id, kwargs)):
            chosen.append((instruction_id, kwargs))
    return chosen
