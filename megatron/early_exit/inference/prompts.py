"""The one check of prompts against a context: `generate` (the model's sequence length), the
engine (its slots' context) and the server (its request fields) all call it, naming their
own fields in the errors."""

from __future__ import annotations

from typing import List, Sequence

from megatron.early_exit.inference.errors import InferenceConfigError


class PromptError(InferenceConfigError):
    """A prompt or budget that cannot be decoded; `field` names it (`prompts[1]`, `max_tokens`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def check_prompts(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    vocab_size: int,
    max_context: int,
    prompt_field: str = "prompts",
    budget_field: str = "max_new_tokens",
    min_new_tokens: int = 1,
    context_name: str = "the model's maximum sequence length",
) -> List[List[int]]:
    """The prompts as lists of ints: at least one, none empty, ids in the vocabulary, each
    with `max_new_tokens` (>= min_new_tokens) more within `max_context`."""
    if not len(prompts):
        raise PromptError(prompt_field, "no prompts given")
    if max_new_tokens < min_new_tokens:
        raise PromptError(budget_field, f"must be >= {min_new_tokens}, got {max_new_tokens}")
    out = []
    for i, prompt in enumerate(prompts):
        where = f"{prompt_field}[{i}]"
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise PromptError(where, "empty prompt: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(where, f"token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        if len(prompt) + max_new_tokens > max_context:
            raise PromptError(
                budget_field,
                f"context too long: prompt {i} has {len(prompt)} tokens, + {budget_field} "
                f"{max_new_tokens} exceeds {context_name} {max_context}",
            )
        out.append(prompt)
    return out
