"""Preference pairs for tests, in the layout sft.data.prepared.read_preferences gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.tiny import alpaca_records, write_jsonl


def preference_records(n: int) -> list[dict[str, Any]]:
    """``n`` deterministic pairs: the chosen answer is an Alpaca record's output, the rejected one
    another record's (so lengths differ); every fourth prompt has a system turn, every fifth an
    earlier exchange."""
    records = alpaca_records(n + 3)
    pairs = []
    for i, record in enumerate(records[:n]):
        prompt = [{"role": "user", "content": record["instruction"]}]
        if i % 5 == 4:
            prompt = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi, how can I help?"},
                      *prompt]
        if i % 4 == 3:
            prompt = [{"role": "system", "content": "Be brief."}, *prompt]
        pairs.append({"id": record["id"], "source": "test", "prompt": prompt, "chosen": record["output"],
                      "rejected": records[i + 3]["output"]})
    return pairs


def write_preference_split(directory: str | Path, n_train: int = 16, n_val: int = 4) -> tuple[Path, Path]:
    """Prepared train and validation JSONL files of preference_records."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = preference_records(n_train + n_val)
    return (write_jsonl(directory / "dpo_train.jsonl", pairs[:n_train]),
            write_jsonl(directory / "dpo_val.jsonl", pairs[n_train:]))
