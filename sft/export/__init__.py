"""Leaving sft: a merged model directory, a GGUF file."""
