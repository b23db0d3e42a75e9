"""Exits with a transformer block (--use-exit-block) decode: the block attends over its own
KV cache slot, and decoding equals a from-scratch forward of the whole sequence each step."""

import pytest
import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative, generate
from megatron.early_exit.inference.context import inference_context
from tests.helpers import build_ee_gpt, tiny_transformer_config

PROMPT = [3, 14, 15, 92, 65]


@pytest.fixture(scope="module")
def block_model(dist1):
    torch.manual_seed(0)
    model = build_ee_gpt(
        tiny_transformer_config(), EarlyExitConfig(exit_layer_nums=[2], use_exit_block=True, use_exit_norm=True)
    ).eval()
    with torch.no_grad():  # peaked distributions: some tokens confident at the exit, some not
        model.embedding.word_embeddings.weight.mul_(4)
    return model


def _reference(model, prompt, steps, threshold):
    """Each token from a full forward of the sequence so far: the exit's token (its block over
    the whole sequence) when its top-1 probability reaches `threshold`, else the final one."""
    seq, depths, confidences = list(prompt), [], []
    with inference_context(model):
        for _ in range(steps):
            tokens = torch.tensor([seq])
            out = model(tokens, torch.arange(len(seq)).unsqueeze(0), None)
            exit_logits = out.exits[0].compute_logits()[-1, 0].float()
            confidences.append(float(exit_logits.softmax(-1).max()))
            if len(depths) > 0 and confidences[-1] >= threshold:  # the first token: prefill
                seq.append(int(exit_logits.argmax()))
                depths.append(2)
            else:
                seq.append(int(out.final[0, -1].argmax()))
                depths.append(4)
    return seq[len(prompt) :], depths, confidences


@pytest.mark.parametrize("quantile", [0.0, 0.5])
def test_exit_block_decodes_like_a_full_forward(block_model, quantile):
    confidences = sorted(_reference(block_model, PROMPT, 10, 2.0)[2][1:])
    # Between two observed confidences, never at one: a token at the threshold would be decided by rounding.
    mid = len(confidences) // 2
    threshold = 0.0 if quantile == 0 else (confidences[mid - 1] + confidences[mid]) / 2
    tokens, depths, _ = _reference(block_model, PROMPT, 10, threshold)
    result = generate(block_model, [PROMPT], EarlyExit(threshold, kv="recompute"), 10)
    assert result.tokens[0] == tokens and result.exit_layers[0] == depths
    assert 2 in depths[1:] and (quantile == 0 or 4 in depths[1:])  # both kinds of token


def test_exit_block_propagation_and_self_speculation(block_model):
    greedy = generate(block_model, [PROMPT, PROMPT[:3]], FullDepth(), 10).tokens
    assert generate(block_model, [PROMPT, PROMPT[:3]], SelfSpeculative(2, 3), 10).tokens == greedy
    propagated = generate(block_model, [PROMPT], EarlyExit(0.0, kv="propagate"), 10)
    assert propagated.tokens[0] == generate(block_model, [PROMPT], EarlyExit(0.0), 10).tokens[0]
