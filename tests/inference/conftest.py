"""IFEval's prompts file, from the shared data folder beside the checkout (a user's clone has none)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_INPUT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ifeval" / "input_data.jsonl"


@pytest.fixture(scope="session")
def shared_input_data() -> Path:
    if not SHARED_INPUT_DATA.is_file():
        pytest.skip(f"{SHARED_INPUT_DATA} is not here (it sits beside the checkout in CI)")
    return SHARED_INPUT_DATA
