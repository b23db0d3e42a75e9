"""Text generation server: Megatron-LM's PUT /api, OpenAI's /v1/completions and
/v1/chat/completions, and vLLM's tokenizer endpoints, with early exit.

Files, from the wire to the engine: schemas (typed requests and replies, validated once),
guard (Host, content type and body size, before any parsing), app (FastAPI routes, streams
and error replies), megatron_api, openai_api and chat_api (a request to engine jobs, their
results to a reply or a stream), tokenizer_api (tokenize, detokenize, the chat template),
text (tokenizing, stop sequences, per-token and streamed text), jobs (the units broadcast
to every rank, checked against the model first), worker (the queue on rank 0 and the
broadcast loop on every rank), launch (flags, checkpoint, start-up).
"""
