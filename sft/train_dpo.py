"""`python -m sft.train_dpo`: preference training (DPO) after SFT (see sft.recipes.dpo)."""

from sft.recipes.dpo import main

if __name__ == "__main__":
    raise SystemExit(main())
