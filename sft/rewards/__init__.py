"""Verifiable rewards: prompts with instructions a program checks, sampled answers, the data they make."""
