"""Answers made to follow or to break one instruction, from a record's own reference answer.

If the scorer accepts every ``follow`` answer and rejects every ``broken`` one, the arguments
`sft constraints` drew are the ones the checker reads, with the meaning the phrasing gives them.
"""

from __future__ import annotations

import json
import re
from typing import Any

ENGLISH = "The quick brown fox jumps over the lazy dog while the children play in the garden with their friends."
IN_LANGUAGE = {
    "fr": "Le petit chat dort sur le tapis chaud pendant que les enfants jouent dans le jardin avec leurs amis.",
    "de": "Die kleine Katze schläft auf dem warmen Teppich, während die Kinder mit ihren Freunden im Garten spielen.",
    "es": "El pequeño gato duerme sobre la alfombra caliente mientras los niños juegan en el jardín con sus amigos.",
    "it": "Il piccolo gatto dorme sul tappeto caldo mentre i bambini giocano in giardino con i loro amici.",
    "pt": "O pequeno gato dorme no tapete quente enquanto as crianças brincam no jardim com os seus amigos.",
    "nl": "De kleine kat slaapt op het warme tapijt terwijl de kinderen met hun vrienden in de tuin spelen.",
    "sv": "Den lilla katten sover på den varma mattan medan barnen leker i trädgården med sina vänner.",
    "pl": "Mały kot śpi na ciepłym dywanie, podczas gdy dzieci bawią się w ogrodzie ze swoimi przyjaciółmi.",
    "tr": "Küçük kedi sıcak halının üzerinde uyurken çocuklar arkadaşlarıyla birlikte bahçede oynuyorlar.",
    "id": "Kucing kecil itu tidur di atas karpet yang hangat sementara anak-anak bermain di taman bersama "
          "teman-teman mereka.",
    "fi": "Pieni kissa nukkuu lämpimällä matolla, kun lapset leikkivät puutarhassa ystäviensä kanssa.",
    "da": "Den lille kat sover på det varme tæppe, mens børnene leger i haven med deres venner.",
}


def _without(text: str, pattern: str) -> str:
    return re.sub(pattern, "", text, flags=re.IGNORECASE)


def _counted(text: str, item: str, times: int) -> str:
    return " ".join([text, *[item] * times])


def _counting(relation: str, count: int, make: Any) -> tuple[str, str]:
    """(follow, broken) for "at least count" / "less than count", ``make(n)`` an answer with n."""
    return (make(count), make(count - 1)) if relation == "at least" else (make(count - 1), make(count))


def follow_and_break(instruction_id: str, kwargs: dict[str, Any], base: str) -> tuple[str, str]:
    """An answer that follows the instruction and one that does not, both built from ``base``."""
    kind = instruction_id.split(":")[1]
    if kind == "existence":
        bare = _without(base, "|".join(kwargs["keywords"]))
        return _counted(bare, " ".join(kwargs["keywords"]), 1), bare
    if kind == "frequency":
        bare = _without(base, kwargs["keyword"])
        return _counting(kwargs["relation"], kwargs["frequency"], lambda n: _counted(bare, kwargs["keyword"], n))
    if kind == "forbidden_words":
        bare = _without(base, "|".join(rf"\b{word}\b" for word in kwargs["forbidden_words"]))
        return bare, _counted(bare, kwargs["forbidden_words"][-1], 1)
    if kind == "letter_frequency":
        bare = _without(base, kwargs["letter"])
        return _counting(kwargs["let_relation"], kwargs["let_frequency"], lambda n: bare + kwargs["letter"] * n)
    if kind == "response_language":
        return IN_LANGUAGE[kwargs["language"]], ENGLISH
    if kind == "english_capital":
        return ENGLISH.upper(), ENGLISH
    if kind == "english_lowercase":
        return ENGLISH.lower(), ENGLISH
    if kind == "capital_word_frequency":
        return _counting(kwargs["capital_relation"], kwargs["capital_frequency"],
                         lambda n: _counted(base.lower(), "LOUD", n))
    if kind == "number_sentences":
        return _counting(kwargs["relation"], kwargs["num_sentences"],
                         lambda n: " ".join(f"Sentence number {i} is here." for i in range(n)) or "no")
    if kind == "number_words":
        return _counting(kwargs["relation"], kwargs["num_words"], lambda n: " ".join(["word"] * n) or ".")
    paragraphs = [f"{word} paragraph about {base}" for word in ("One", "Two", "Three", "Four", "Five", "Six")]
    if kind == "number_paragraphs":
        count = kwargs["num_paragraphs"]
        return "\n***\n".join(paragraphs[:count]), "\n***\n".join(paragraphs[:count + 1])
    if kind == "nth_paragraph_first_word":
        chosen = paragraphs[:kwargs["num_paragraphs"]]
        nth = kwargs["nth_paragraph"] - 1
        follow = [f"{kwargs['first_word']} {p}" if i == nth else p for i, p in enumerate(chosen)]
        broken = [f"Zebra {p}" if i == nth else p for i, p in enumerate(chosen)]
        return "\n\n".join(follow), "\n\n".join(broken)
    if kind == "number_placeholders":
        bare = _without(base, r"[\[\]]")
        return _counted(bare, "[name]", kwargs["num_placeholders"]), _counted(bare, "[name]",
                                                                               kwargs["num_placeholders"] - 1)
    if kind == "postscript":
        return f"{base}\n\n{kwargs['postscript_marker']} One more thing.", base
    if kind == "number_bullet_lists":
        count = kwargs["num_bullets"]
        return "\n".join(f"* point {i}" for i in range(count)), "\n".join(f"- point {i}" for i in range(count + 1))
    if kind == "constrained_response":
        return "My answer is yes.", base
    if kind == "number_highlighted_sections":
        return (_counted(base, "*key*", kwargs["num_highlights"]),
                _counted(_without(base, r"\*"), "*key*", kwargs["num_highlights"] - 1))
    if kind == "multiple_sections":
        splitter = kwargs["section_spliter"]
        sections = [f"{splitter} {i}\n{base}" for i in range(1, kwargs["num_sections"] + 1)]
        return "\n\n".join(sections), "\n\n".join(sections[:-1])
    if kind == "json_format":
        return json.dumps({"answer": base}), f"Here it is: {base}"
    if kind == "title":
        return f"<<A Fine Title>>\n{base}", base
    if kind == "two_responses":
        return f"{base}\n******\nAnother answer entirely.", base
    if kind == "repeat_prompt":
        return f"{kwargs['prompt_to_repeat']}\n{base}", f"Sure. {base}"
    if kind == "end_checker":
        return f"{base} {kwargs['end_phrase']}", base
    if kind == "quotation":
        return f'"{base}"', base
    if kind == "no_comma":
        return base.replace(",", ""), f"{base}, yes"
    raise AssertionError(f"no answer maker for {instruction_id}")


FILLER = "The children play in the garden with their friends and the waves touch the stones."
"""English enough for language detection; no commas, no q/x/z/j, none of the forbidden-word pool."""


def compose(instructions: list[tuple[str, dict[str, Any]]], sentences: int, repeats: int) -> str | None:
    """One answer meant to follow all ``instructions`` at once: ``sentences`` sentences of
    ``repeats`` filler units each, laid out as the instructions ask (None if too few sentences)."""
    given = {instruction_id.split(":")[1]: kwargs for instruction_id, kwargs in instructions}
    if "constrained_response" in given:
        return "My answer is yes."
    unit = IN_LANGUAGE[given["response_language"]["language"]] if "response_language" in given else FILLER
    inline = []
    if "existence" in given:
        inline += given["existence"]["keywords"]
    if "frequency" in given and given["frequency"]["relation"] == "at least":
        inline += [given["frequency"]["keyword"]] * given["frequency"]["frequency"]
    if "letter_frequency" in given and given["letter_frequency"]["let_relation"] == "at least":
        inline.append(given["letter_frequency"]["letter"] * given["letter_frequency"]["let_frequency"])
    if "capital_word_frequency" in given and given["capital_word_frequency"]["capital_relation"] == "at least":
        inline += ["LOUD"] * given["capital_word_frequency"]["capital_frequency"]
    inline += ["[name]"] * given.get("number_placeholders", {}).get("num_placeholders", 0)
    inline += ["*key*"] * given.get("number_highlighted_sections", {}).get("num_highlights", 0)
    sentence = " ".join([unit[:-1]] * (repeats - 1) + [unit])
    body = [sentence] * sentences
    body[0] = f"{sentence[:-1]} {' '.join(inline)}." if inline else sentence
    groups = next((kwargs["num_paragraphs"] for kind, kwargs in given.items()
                   if kind in ("number_paragraphs", "nth_paragraph_first_word")),
                  given.get("multiple_sections", {}).get("num_sections", 1))
    if sentences < groups:
        return None
    paragraphs = [" ".join(body[i::groups]) for i in range(groups)]
    if "nth_paragraph_first_word" in given:
        nth = given["nth_paragraph_first_word"]["nth_paragraph"] - 1
        paragraphs[nth] = f"{given['nth_paragraph_first_word']['first_word']} {paragraphs[nth]}"
    if "multiple_sections" in given:
        paragraphs = [f"{given['multiple_sections']['section_spliter']} {i}\n{p}" for i, p in enumerate(paragraphs, 1)]
    text = ("\n***\n" if "number_paragraphs" in given else "\n\n").join(paragraphs)
    if "number_bullet_lists" in given:
        words = unit.split()
        text += "\n" + "\n".join(f"* {words[i % len(words)]} {words[(i + 1) % len(words)]}"
                                 for i in range(given["number_bullet_lists"]["num_bullets"]))
    if "two_responses" in given:
        text = f"{text}\n******\n{unit} {text}"
    if "title" in given:
        text = f"<<{' '.join(unit.split()[:2])}>>\n{text}"
    if "repeat_prompt" in given:
        text = f"{given['repeat_prompt']['prompt_to_repeat']}\n{text}"
    if "postscript" in given:
        text += f"\n\n{given['postscript']['postscript_marker']} {unit}"
    if "end_checker" in given:
        text += f" {given['end_checker']['end_phrase']}"
    if "json_format" in given:
        text = json.dumps({"answer": text}, ensure_ascii=False)
    if "quotation" in given:
        text = f'"{text}"'
    if "english_lowercase" in given:
        text = text.lower()
    if "english_capital" in given:
        text = text.upper()
    if "no_comma" in given:
        text = text.replace(",", "")
    return text


def follow_all(instructions: list[tuple[str, dict[str, Any]]], followed: Any) -> str | None:
    """The first composed answer (fewest sentences, then shortest) that ``followed(answer)`` accepts."""
    for sentences in range(1, 13):
        for repeats in (1, 2, 3):
            answer = compose(instructions, sentences, repeats)
            if answer is not None and followed(answer):
                return answer
    return None
