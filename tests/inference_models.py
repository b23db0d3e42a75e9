"""Tiny early-exit models shared by the inference tests, built once per process.

Models are tiny (4 layers, hidden 32, GQA with 2 groups) with weights drawn wide enough
(std 0.3) that greedy decoding does not collapse to one token and exit confidences spread
over the thresholds the tests use. `build_model`'s models are shared by every test: never
change them (conftest checks after each test that their weights are unchanged); a test
that changes weights takes `fresh_model`.
"""

from functools import lru_cache

import torch

NUM_LAYERS = 4
PROMPT = [5, 17, 3, 9, 22]
PROMPTS = [[5, 17, 3], [40, 2, 77, 13, 8, 61, 9, 30], [11, 12, 13, 14, 15]]

VARIANTS = {  # exits, EarlyExitConfig flags
    "tied_norm": ([1, 3], dict(use_exit_norm=True)),
    "untied_mlp": ([1, 3], dict(use_exit_norm=True, use_exit_mlp=True, untie_exit_output_weights=True)),
    "pre_exit": ([2, 4], dict(pre_exit=True)),
    "pre_exit_first": ([1, 3], dict(pre_exit=True)),  # an exit before the first layer
}


def fresh_model(variant: str = "tied_norm", position_embedding_type: str = "rope", num_query_groups: int = 2):
    """A new model of `variant` (same weights every call), for tests that change it."""
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from tests.helpers import tiny_transformer_config

    nums, flags = VARIANTS[variant]
    torch.manual_seed(0)
    config = tiny_transformer_config(num_layers=NUM_LAYERS, num_query_groups=num_query_groups, init_method_std=0.3)
    model = EarlyExitGPTModel(
        config,
        EarlyExitConfig(exit_layer_nums=nums, **flags),
        vocab_size=96,
        max_sequence_length=64,
        share_embeddings_and_output_weights=False,
        position_embedding_type=position_embedding_type,
    )
    return model.eval()


@lru_cache(maxsize=None)
def build_model(variant: str = "tied_norm", position_embedding_type: str = "rope", num_query_groups: int = 2):
    """The shared model of `variant`: read it, never change it."""
    model = fresh_model(variant, position_embedding_type, num_query_groups)
    _FINGERPRINTS[id(model)] = (model, _fingerprint(model))
    return model


_FINGERPRINTS = {}


def _fingerprint(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def changed_shared_models() -> list:
    """Names of the shared models' tensors (or attributes) that differ from when they were built."""
    changed = []
    for model, state in _FINGERPRINTS.values():
        now = model.state_dict()
        changed += [k for k, v in state.items() if k not in now or not torch.equal(now[k], v)]
        if model.training or "confidence_estimator" in model.__dict__:
            changed.append("mode or attached estimator")
    return changed


def generate_tokens(model, prompts, strategy=None, max_new_tokens=24, **kwargs):
    """generate() with full depth unless a strategy is given."""
    from megatron.early_exit.inference import FullDepth, generate

    return generate(model, prompts, strategy or FullDepth(), max_new_tokens=max_new_tokens, **kwargs)


def save_tiny_checkpoint(root: str, seed: int = 5):
    """A weights-only checkpoint of a 3-layer model with exits after layers 1 and 2:
    model tensors, flags in the common state. Returns the model written."""
    from tests.helpers import tiny_model_flags, write_random_checkpoint

    # --make-vocab-size-divisible-by 128 is megatron's default: the 100 ids pad to 128.
    return write_random_checkpoint(root, tiny_model_flags(3, 32, 100, [1, 2], seed, divisible_by=128), 128)
