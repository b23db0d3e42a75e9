"""Legacy Megatron-LM and EE-LLM checkpoints (`iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt`,
any TP and PP) into ours: files.py (finding and reading them, no code runs), args.py (their
stored args as our ModelConfig), keymap.py (tensor names and sharding, with the source of
each mapping), convert.py (the conversion). See docs/legacy_checkpoints.md.
"""

from megatron.early_exit.legacy.convert import LegacyResult, convert_legacy

__all__ = ["LegacyResult", "convert_legacy"]
