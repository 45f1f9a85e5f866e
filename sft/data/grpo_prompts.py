"""Prompt records for online training (GRPO): a prepared conversation file read for its prompts.

A line is ``{"id", "messages": [system?, user, (assistant, user)...], ...}``; a final assistant
turn (a reference answer) may be there and is left out: the policy writes its own answers. For
the built-in verifier a line also carries IFEval's ``instruction_id_list`` and ``kwargs`` (one
object per instruction), as ``sft constraints`` writes them and as IFEval's input_data.jsonl
has them; every instruction is bound to its checker while the file is read, so a typo in an id
or an argument stops the run before a model is loaded, naming the file and line. Other fields
stay in the record, for a user's reward function to read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft.data.formats import conversation_id
from sft.data.prepared import _header, _lines, _messages
from sft.errors import DataError
from sft.inference.ifeval.instructions import bind

Check = Callable[[str], bool]


def read_prompt_records(path: str | Path, verifier: bool) -> tuple[list[dict[str, Any]], list[list[Check]] | None]:
    """The records of a prompts file (``messages`` ending with a user turn) and, with
    ``verifier``, each record's instruction checkers, bound to their arguments."""
    records, checks = [], []
    for where, record in _lines(Path(path), "sft constraints"):
        turns = record.get("messages")
        if isinstance(turns, list) and len(turns) > 1 and isinstance(turns[-1], dict) \
                and turns[-1].get("role") == "assistant":
            record = record | {"messages": turns[:-1]}
        prompt = _messages(where, record, "messages", last="user")
        key = tuple((m["role"], m["content"]) for m in prompt)
        records.append(record | _header(where, record, lambda key=key: conversation_id(key)) | {"messages": prompt})
        if verifier:
            checks.append(_checks(where, record))
    return records, checks if verifier else None


def _checks(where: str, record: dict[str, Any]) -> list[Check]:
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: field 'instruction_id_list' must be a non-empty list of IFEval instruction ids "
                        f"for the built-in verifier (or pass --verifier false and a --reward function)")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise DataError(f"{where}: field 'kwargs' must be one object per instruction id ({len(ids)} ids)")
    try:
        return [bind(instruction_id, arguments) for instruction_id, arguments in zip(ids, kwargs, strict=True)]
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None
