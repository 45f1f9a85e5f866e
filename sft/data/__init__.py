"""Data preparation: read raw sources of any common shape, write train/val JSONL, read it back."""

from sft.data.formats import normalize_text
from sft.data.prepare import prepare
from sft.data.prepared import read_conversations, read_preferences
from sft.errors import DataError

__all__ = ["DataError", "normalize_text", "prepare", "read_conversations", "read_preferences"]
