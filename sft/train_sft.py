"""`python -m sft.train_sft`: the original entry point of supervised fine-tuning (see sft.recipes.sft)."""

from sft.recipes.sft import main

if __name__ == "__main__":
    raise SystemExit(main())
