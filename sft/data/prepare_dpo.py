"""``sft prepare-preferences``: the preference-pair (DPO) run of :mod:`sft.data.prepare`.

A module of its own only because the command table runs a module's ``main``; the preparation
itself is the same code as for SFT, given the DPO method (its shapes and file names).
"""

from __future__ import annotations

from collections.abc import Sequence

from sft.data.prepare import DPO
from sft.data.prepare import main as prepare_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``prepare_dpo_data.py``'s command line; 0 on success, 2 on a user error."""
    return prepare_main(argv, DPO)
