"""IFEval: judge-free instruction-following evaluation (prompts, scoring, the command); the checkers are sft.verifiers."""
