"""Early-exit decoding: KV cache, confidence measures, generators, server."""
