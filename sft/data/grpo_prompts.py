"""Prompt records for online training (GRPO): a prepared conversation file read for its prompts.

A line is ``{"id", "messages": [system?, user, (assistant, user)...], ...}``, read by
:func:`sft.data.prepared.read_prompts`: a final assistant turn (a reference answer) may be there
and is left out, the policy writes its own answers. For the built-in verifier a line also carries
IFEval's ``instruction_id_list`` and ``kwargs`` (one object per instruction), as ``sft
constraints`` writes them; every instruction is bound to its checker while the file is read, so a
typo in an id or an argument stops the run before a model is loaded, naming the file and line.
Other fields stay in the record, for a user's reward function to read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft.data.prepared import read_prompts
from sft.verifiers.instructions import Check, record_checks

NO_INSTRUCTIONS_HINT = " for the built-in verifier (or pass --verifier false and a --reward function)"


def read_prompt_records(path: str | Path, verifier: bool) -> tuple[list[dict[str, Any]], list[list[Check]] | None]:
    """The records of a prompts file (``messages`` ending with a user turn) and, with
    ``verifier``, each record's instruction checkers, bound to their arguments."""
    records, checks = [], []
    for where, record in read_prompts(path, "sft constraints"):
        records.append(record)
        if verifier:
            checks.append(record_checks(where, record, NO_INSTRUCTIONS_HINT))
    return records, checks if verifier else None
