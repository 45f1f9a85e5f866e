"""Verified repairs: a failing answer edited by rule until it follows every instruction, or nothing.

A small model sampled on constraint prompts almost never writes in capitals when asked, wraps its
answer in quotation marks or repeats the request first: those instructions get no passing answer
to learn from, and rejection sampling or GRPO cannot teach what is never sampled. Many IFEval
instructions are about the form of an answer, not its content, and for those an edit of the
model's own answer is exact: upper- or lower-case it, wrap it, put a title or the request before
it, a postscript or the asked ending after it, take its commas out, highlight its first lines.

:func:`repair` applies the edit of each instruction the answer fails, in an order that keeps the
earlier edits intact (content inside, wrappers outside, case and commas last), then judges the
result with the same strict checkers; it returns the edited answer only if it follows *every*
instruction of the prompt. Instructions about content (keywords, language, length, sections,
bullets) have no edit here: an answer failing one of them stays unrepaired.

A repaired answer is the model's own words in the asked form, so as a chosen answer over its
unedited self it teaches exactly the instruction (`sft verify --repair`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from sft.verifiers.instructions import followed

Edit = Callable[[str, dict[str, Any], str], str]
"""(answer, the instruction's kwargs, the prompt) -> the edited answer."""


def _title(answer: str, kwargs: dict[str, Any], prompt: str) -> str:
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", answer.split("\n", 1)[0])[:4] or ["Answer"]
    return f"<<{' '.join(word.capitalize() for word in words)}>>\n\n{answer}"


def _highlight(answer: str, kwargs: dict[str, Any], prompt: str) -> str:
    """Wrap the first lines (or sentences) in *...* until there are enough highlights."""
    needed = kwargs["num_highlights"] - len(re.findall(r"\*[^\n\*]+\*", answer))
    parts = re.split(r"(?<=[.!?])\s+|\n+", answer.replace("*", ""))
    out, done = [], 0
    for part in parts:
        if done < needed and part.strip():
            out.append(f"*{part.strip()}*")
            done += 1
        else:
            out.append(part)
    return " ".join(out) if done >= needed else answer


# Applied in this order: an edit never undoes one before it.
EDITS: dict[str, Edit] = {
    "detectable_format:number_highlighted_sections": _highlight,
    "detectable_content:postscript": lambda a, k, p: f"{a.rstrip()}\n\n{k['postscript_marker']} I hope this helps.",
    "startend:end_checker": lambda a, k, p: f"{a.rstrip()} {k['end_phrase']}",
    "detectable_format:title": _title,
    "combination:repeat_prompt": lambda a, k, p: f"{k['prompt_to_repeat']}\n\n{a}",
    "detectable_format:json_format": lambda a, k, p: json.dumps({"answer": a}, ensure_ascii=False, indent=2),
    "startend:quotation": lambda a, k, p: f'"{a.strip()}"',
    "change_case:english_lowercase": lambda a, k, p: a.lower(),
    "change_case:english_capital": lambda a, k, p: a.upper(),
    "punctuation:no_comma": lambda a, k, p: re.sub(r",\s*", " ", a).replace(",", ""),
}
"""Instruction id -> its edit, for the instructions about an answer's form."""


def repair(prompt: Any, answer: str) -> str | None:
    """The answer edited to follow every instruction of ``prompt`` (an IFEvalPrompt: its
    ``instruction_id_list``, ``kwargs``, ``checks`` and ``prompt`` text), or None where an instruction
    it fails has no edit, or the edits together still fail (judged strictly)."""
    judged = followed(prompt.checks, answer, False)
    if all(judged):
        return None  # nothing to repair
    failing = {instruction_id: kwargs for instruction_id, kwargs, ok
               in zip(prompt.instruction_id_list, prompt.kwargs, judged) if not ok}
    if any(instruction_id not in EDITS for instruction_id in failing):
        return None
    edited = answer
    for instruction_id, edit in EDITS.items():
        if instruction_id in failing:
            edited = edit(edited, failing[instruction_id], prompt.prompt)
    return edited if all(followed(prompt.checks, edited, False)) else None
