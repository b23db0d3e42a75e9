"""Model definitions: layer specs, exit heads and the early-exit GPT model."""
