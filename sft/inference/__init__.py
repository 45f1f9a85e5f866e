"""Using a trained run: loading, generation, evaluation and chat."""
