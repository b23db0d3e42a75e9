"""Text generation server: Megatron-LM's PUT /api and OpenAI's /v1/completions, with early exit.

Files, from the wire to the engine: schemas (typed requests and replies, validated once),
guard (Host, content type and body size, before any parsing), app (FastAPI routes and error
replies), megatron_api and openai_api (a request to an engine
job, a result to a reply), text (tokenizing, stop sequences, per-token text), jobs (the
unit broadcast to every rank, checked against the model first), worker (the queue on
rank 0 and the broadcast loop on every rank), launch (flags, checkpoint, start-up).
"""
