"""IFEval: judge-free instruction-following evaluation (prompts, checkers, scoring, the command)."""
