"""Training methods, each a short sequence of the shared stages."""
