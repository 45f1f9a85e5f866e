"""`python -m sft.sft_test`: the original entry point of evaluation (see sft.inference.evaluate)."""

from sft.inference.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
