"""The plain decode loop over a Decoder (full depth and early exit alike: the exit policy
decides where each row's token leaves).

    prefill            every prompt at full depth in one batched pass; its first token
    decode_one_token   one batched step: each active row feeds its newest token
    decode_tokens      steps until every row hit its budget or a stop token
"""

from __future__ import annotations

from typing import List

from megatron.early_exit.inference.decoder import Decoder, ExitPolicy
from megatron.early_exit.inference.result import Transcript


def prefill(decoder: Decoder, transcript: Transcript, prompts: List[List[int]]) -> None:
    transcript.take(decoder.step(list(range(len(prompts))), prompts))


def decode_one_token(decoder: Decoder, transcript: Transcript, policy: ExitPolicy) -> None:
    rows = list(transcript.active)
    transcript.take(decoder.step(rows, [[transcript.last_token(r)] for r in rows], policy))
    transcript.result.num_steps += 1


def decode_tokens(decoder: Decoder, transcript: Transcript, policy: ExitPolicy) -> None:
    while transcript.going():
        decode_one_token(decoder, transcript, policy)
