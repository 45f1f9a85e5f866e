"""Prepare the SFT train/val split: ``python scripts/prepare_sft_data.py --help``."""

import sys
from pathlib import Path

# Make ``import sft`` work when run from a checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sft.data.prepare import main

raise SystemExit(main())
