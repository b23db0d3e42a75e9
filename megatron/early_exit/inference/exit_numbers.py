"""The one numbering of exits users see: an exit is named by its entry in --exit-layer-nums
(EE-LLM's numbering) and the final layer by num_layers, in requests, replies, logs and tools.

The decoder counts depth instead (layers run before a head reads), which is one less than the
exit's number under --pre-exit, where an exit reads its layer's input. Results and token events
leave the engine in depths; `exit_number` turns a depth into the name a user can send back.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence


def exit_number(depth: int, num_layers: int, pre_exit: bool) -> int:
    """The --exit-layer-nums entry of the exit a token left at after `depth` layers
    (num_layers: the final layer)."""
    return int(depth) + int(pre_exit) if depth < num_layers else int(num_layers)


def exit_numbers(model, depths: Sequence[int]) -> List[int]:
    num_layers, pre = model.config.num_layers, bool(model.ee_config.pre_exit)
    return [exit_number(d, num_layers, pre) for d in depths]


def number_result(model, result):
    """`result` (a GenerationResult) with its exit_layers as exit numbers."""
    return dataclasses.replace(result, exit_layers=[exit_numbers(model, row) for row in result.exit_layers])


def number_event(model, event):
    """A TokenEvent with its exit_layers as exit numbers."""
    return dataclasses.replace(event, exit_layers=exit_numbers(model, event.exit_layers))
