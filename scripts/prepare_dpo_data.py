"""Prepare the DPO train/val split of preference pairs: ``python scripts/prepare_dpo_data.py --help``."""

import sys
from pathlib import Path

# Make ``import sft`` work when run from a checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sft.data.prepare_dpo import main

raise SystemExit(main())
