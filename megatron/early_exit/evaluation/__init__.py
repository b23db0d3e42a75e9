"""Evaluation of early-exit models: quality of full depth, of each exit alone and of
early-exit decoding at each threshold, next to measured speed (tools/evaluate.py).

Files, from small parts to the whole: settings (the ways of running the model, and
teacher-forced scoring under each), perplexity (over a .bin/.idx dataset), lm_eval_model
(lm-evaluation-harness tasks on the in-process engine; needs the `eval` extra), report
(table, JSON, plot).
"""

from megatron.early_exit.evaluation.perplexity import PerplexityResult, perplexity, read_windows
from megatron.early_exit.evaluation.report import Row, format_table, plot, write_json
from megatron.early_exit.evaluation.settings import (
    Setting,
    SettingScores,
    build_settings,
    combine,
    needed_layers,
    score_heads,
    score_setting,
)

__all__ = [
    "PerplexityResult",
    "Row",
    "Setting",
    "SettingScores",
    "build_settings",
    "combine",
    "format_table",
    "needed_layers",
    "perplexity",
    "plot",
    "read_windows",
    "score_heads",
    "score_setting",
    "write_json",
]
