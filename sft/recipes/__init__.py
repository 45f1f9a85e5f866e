"""Training methods: each a Recipe (sft.recipes.skeleton) that fills in the hooks where it differs."""
