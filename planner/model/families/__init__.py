"""One module per group of config families; importing this package registers every adapter."""

from . import gpt, hybrid, llama, moe, seq2seq, vision

__all__ = ["gpt", "hybrid", "llama", "moe", "seq2seq", "vision"]
