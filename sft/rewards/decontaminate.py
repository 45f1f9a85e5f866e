"""Keeping IFEval's test prompts out of training: word 8-gram overlap with the 541 prompts.

A text is contaminated when it shares any run of eight consecutive words (lowercased runs of word
characters, so punctuation and spacing do not hide a copy) with an IFEval prompt. Eight words is
the window Tulu 3 and the GPT-3 paper decontaminate with: long enough that common phrases ("at the
end of the day") do not match, short enough that a prompt copied with a changed first sentence or
appended instructions still does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from sft.errors import DataError
from sft.inference.ifeval.data import read_prompts

NGRAM = 8


def word_ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Tells whether a text shares a word n-gram with any of the test texts."""

    def __init__(self, test_texts: Iterable[str], n: int = NGRAM) -> None:
        self.n = n
        self.ngrams = set().union(*(word_ngrams(text, n) for text in test_texts))

    def contaminated(self, text: str) -> bool:
        return not self.ngrams.isdisjoint(word_ngrams(text, self.n))

    @classmethod
    def from_ifeval(cls, path: str | Path, flag: str = "--ifeval-prompts") -> Decontaminator:
        """The decontaminator of IFEval's prompts file; a missing file is an error saying how to get it."""
        if not Path(path).is_file():
            raise DataError(f"{path}: no IFEval prompts file here, and decontamination needs the 541 test prompts. "
                            f"Run `sft fetch-eval-data --out {path}` or pass {flag} with a local copy of "
                            f"input_data.jsonl")
        return cls(prompt.prompt for prompt in read_prompts(path))
