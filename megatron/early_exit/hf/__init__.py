"""Hugging Face interoperability and EE-Tuning of trained models.

Files, from small parts to the whole: errors (ConversionError), families (what each
Hugging Face family adds and refuses), mapping (config mapping and weight key map, both
ways), files (reading and writing Hugging Face directories, atomic outputs), convert
(`import_hf`, `export_hf`), add_exits (EE-Tuning stage 1: new exit heads on a trained
checkpoint), modeling (EarlyExitForCausalLM: an exported directory with its exits, in
transformers). The command-line tools are tools/checkpoint/convert_hf.py
and tools/checkpoint/add_exits.py; docs/huggingface.md walks through them.
"""

from megatron.early_exit.hf.errors import ConversionError

__all__ = ["ConversionError"]
