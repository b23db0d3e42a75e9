"""GPU-only paths: Transformer Engine layer spec. Skipped without CUDA and Transformer Engine."""

import pytest
import torch

from megatron.early_exit.config import EarlyExitConfig

pytestmark = pytest.mark.gpu


@pytest.fixture
def te_available():
    from megatron.early_exit.models.layer_specs import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("needs CUDA and Transformer Engine")


def test_te_spec_early_exit_model_runs_and_matches_gpt(dist1, te_available):
    from megatron.core.models.gpt import GPTModel

    from megatron.early_exit.loss import early_exit_loss
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from megatron.early_exit.models.layer_specs import get_block_spec
    from megatron.early_exit.sharding import full_state_dict
    from tests.helpers import load_full_state_dict, make_batch, tiny_transformer_config

    config = tiny_transformer_config(use_cpu_initialization=False)
    gpt = GPTModel(
        config,
        get_block_spec(config, config.num_layers, use_te=True),
        96,
        16,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=True,
    ).cuda()
    ee = EarlyExitGPTModel(config, EarlyExitConfig(), 96, 16, use_te=True).cuda()
    load_full_state_dict(ee, full_state_dict(gpt))
    tokens, labels, pos = (t.cuda() for t in make_batch())
    assert torch.equal(gpt(tokens, pos, None, labels=labels), ee(tokens, pos, None, labels=labels).final)

    ee_config = EarlyExitConfig(exit_layer_nums=[2], use_exit_mlp=True, use_exit_norm=True)
    model = EarlyExitGPTModel(config, ee_config, 96, 16, use_te=True).cuda()
    loss, report = early_exit_loss(model(tokens, pos, None, labels=labels), torch.ones_like(labels), ee_config, 0)
    loss.backward()
    assert torch.isfinite(loss) and report.exit_losses[2] > 0
    assert model.exits["2"].mlp.linear_fc1.weight.grad.abs().sum() > 0
