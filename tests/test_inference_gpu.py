"""The inference decoder on CUDA: local and Transformer Engine layer specs against the
cache-free references. Skipped without CUDA (and, for the TE spec, Transformer Engine)."""

import pytest
import torch

from tests.inference_models import PROMPT, PROMPTS, VARIANTS
from tests.inference_reference import no_cache_greedy, reference_generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_model(variant="tied_norm", use_te=False):
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from tests.helpers import tiny_transformer_config

    nums, flags = VARIANTS[variant]
    torch.manual_seed(0)
    config = tiny_transformer_config(num_query_groups=2, init_method_std=0.3, use_cpu_initialization=not use_te)
    model = EarlyExitGPTModel(
        config,
        EarlyExitConfig(exit_layer_nums=nums, **flags),
        vocab_size=96,
        max_sequence_length=64,
        share_embeddings_and_output_weights=False,
        use_te=use_te,
    )
    return model.cuda().eval()


@pytest.mark.parametrize("use_te", [False, True])
def test_cuda_decoding_equals_references(dist1, use_te):
    from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative, generate
    from megatron.early_exit.models.layer_specs import transformer_engine_available

    if use_te and not transformer_engine_available():
        pytest.skip("needs Transformer Engine")
    model = _cuda_model(use_te=use_te)
    assert generate(model, [PROMPT], FullDepth(), 16).tokens[0] == no_cache_greedy(model, PROMPT, 16)[0]
    for kv in ("recompute", "propagate"):
        result = generate(model, [PROMPT], EarlyExit(0.35, "max_prob", kv), 16)
        ref = reference_generate(model, PROMPT, 16, 0.35, propagate=kv == "propagate")
        assert (result.tokens[0], result.exit_layers[0]) == ref[:2]
    greedy = generate(model, PROMPTS, FullDepth(), 16).tokens
    assert generate(model, PROMPTS, SelfSpeculative(1, 3), 16).tokens == greedy
