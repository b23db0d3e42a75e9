"""Where layers and exits live when the model is split into pipeline stages.

megatron-core gives stage s the layers s*L/p+1 .. (s+1)*L/p (1-based, even split).
"""

from __future__ import annotations

from typing import List

from megatron.early_exit.config import EarlyExitConfig


def layer_stage(layer_number: int, num_layers: int, num_stages: int) -> int:
    return (layer_number - 1) // (num_layers // num_stages)


def exit_stages(ee_config: EarlyExitConfig, num_layers: int, num_stages: int) -> List[int]:
    """The stage of each exit (an exit lives with its layer, pre- or post-exit alike)."""
    return [layer_stage(n, num_layers, num_stages) for n in ee_config.exit_layer_nums]


def tied_embedding_stages(ee_config: EarlyExitConfig, num_layers: int, num_stages: int, tied_output: bool) -> List[int]:
    """Stages holding an instance of the word embedding: the first, the last when the
    output layer is tied to it, and every stage with tied exits."""
    stages = {0}
    if tied_output:
        stages.add(num_stages - 1)
    if not ee_config.untie_exit_output_weights:
        stages.update(exit_stages(ee_config, num_layers, num_stages))
    return sorted(stages)
