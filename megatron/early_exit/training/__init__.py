"""Pretraining: arguments, data, tokenizers, the training loop and checkpoints."""
