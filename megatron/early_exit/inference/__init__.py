"""Early-exit decoding on a per-layer KV cache, any TP; over pipeline stages, FullDepth
or pipeline-based early exit (EarlyExit(kv="pipeline")).

    from megatron.early_exit.inference import generate, EarlyExit, SelfSpeculative, SamplingParams
    result = generate(model, [[1, 2, 3]], EarlyExit(threshold=0.8), max_new_tokens=32)
    result.tokens, result.exit_layers, result.decode_tokens_per_second

Files, from small parts to the whole: kv_cache (the cache), layers (the model's modules
on cached attention), confidence, sampling, decoder (this rank's pipeline stage, the
whole model with PP=1: one batched step with per-row exits, or a stage's pass for the
pipeline), strategies (full depth, early exit, self-speculative), result, speculative,
pipeline (the message protocol of pipeline-based early exit), generate (the entry point),
engine (continuous batching: a pool of KV slots, sequences joining and leaving at every step),
calibration (threshold sweeps), loading (a pretraining checkpoint as an inference model,
any TP).
"""

from megatron.early_exit.inference.confidence import CONFIDENCE_MEASURES, get_confidence_measure
from megatron.early_exit.inference.decoder import Decoder, ExitPolicy
from megatron.early_exit.inference.engine import Engine, SequenceRequest
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.generate import generate
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.result import GenerationResult
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.scoring import ScoreResult, score
from megatron.early_exit.inference.strategies import KV_STRATEGIES, EarlyExit, FullDepth, SelfSpeculative

__all__ = [
    "CONFIDENCE_MEASURES",
    "Decoder",
    "EarlyExit",
    "Engine",
    "SequenceRequest",
    "ExitPolicy",
    "FullDepth",
    "GenerationResult",
    "InferenceConfigError",
    "KVCache",
    "KV_STRATEGIES",
    "SamplingParams",
    "ScoreResult",
    "SelfSpeculative",
    "generate",
    "score",
    "get_confidence_measure",
]
