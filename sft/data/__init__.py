"""Data preparation: read Alpaca-format sources and write train/val JSONL."""

from sft.data.prepare import normalize_text, prepare
from sft.data.sources import DataError

__all__ = ["DataError", "normalize_text", "prepare"]
