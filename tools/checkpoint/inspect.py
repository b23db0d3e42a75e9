"""Print what a checkpoint holds: iteration, layout it was saved from, model and exit
flags, and every tensor with its global shape and dtype.

    python tools/checkpoint/inspect.py CHECKPOINT_DIR [--load-iteration N] [--args] [--json]

CHECKPOINT_DIR is a `--save` directory (its latest checkpoint is read) or one
`iter_XXXXXXX` directory. Nothing is loaded into memory but the index and the flags, both
read without running code (megatron/early_exit/checkpoint/safe_pickle.py's allow-lists);
the checksums of every file are verified first.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "inspect":
    # Another script in this folder ran `import inspect` (torch does) and found this file
    # first on sys.path: hand over to the standard library's module.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    del sys.modules["inspect"]
    import inspect as _standard_inspect  # noqa: E402

    sys.modules["inspect"] = _standard_inspect
else:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

    import argparse
    import json

    # Flags worth a line of their own; --args prints them all.
    SUMMARY_ARGS = (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "seq_length",
        "max_position_embeddings",
        "normalization",
        "swiglu",
        "position_embedding_type",
        "rotary_base",
        "untie_embeddings_and_output_weights",
        "tokenizer_type",
        "tokenizer_model",
        "vocab_size",
        "exit_layer_nums",
        "exit_layer_weight",
        "use_exit_norm",
        "use_exit_mlp",
        "use_exit_block",
        "untie_exit_output_weights",
        "pre_exit",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "bf16",
        "fp16",
    )

    def describe(path: str) -> dict:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megatron.early_exit.checkpoint.checksums import read_manifest
        from megatron.early_exit.checkpoint.reader import read_common, verify
        from megatron.early_exit.checkpoint.safe_pickle import read_index

        verify(path)
        common = read_common(path)
        tensors = {}
        for name, meta in sorted(read_index(path).state_dict_metadata.items()):
            if isinstance(meta, TensorStorageMetadata) and not name.endswith("_extra_state") and "/shard_" not in name:
                tensors[name] = {"shape": list(meta.size), "dtype": str(meta.properties.dtype).replace("torch.", "")}
        model = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
        return {
            "path": path,
            "iteration": common.get("iteration"),
            "consumed_samples": common.get("consumed_samples"),
            "saved_layout": dict(zip(("tensor", "pipeline", "data"), common.get("layout", ()))),
            "has_optimizer": common.get("has_optimizer", True),
            "checksums": read_manifest(path) is not None,
            "exits": common["args"].get("exit_layer_nums") or [],
            "args": common["args"],
            "tensors": model,
            "parameters": sum(
                _numel(t["shape"])
                for k, t in model.items()
                if k.startswith(("embedding.", "decoder.", "output_layer.", "exits."))
            ),
            "optimizer_tensors": len(tensors) - len(model),
        }

    def _numel(shape) -> int:
        n = 1
        for d in shape:
            n *= d
        return n

    def main(argv=None):
        import megatron.early_exit  # noqa: F401  (version check, CPU adapter)

        # isort: split
        from megatron.early_exit.checkpoint.reader import TRACKER, resolve
        from megatron.early_exit.errors import install_excepthook

        install_excepthook()
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("checkpoint")
        p.add_argument(
            "--iteration",
            "--load-iteration",
            "--ckpt-step",
            dest="iteration",
            type=int,
            default=None,
            help="iteration to read (default, or 0: the latest)",
        )
        p.add_argument("--args", action="store_true", help="print every stored flag")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        a = p.parse_args(argv)
        root = a.checkpoint.rstrip("/")
        a.iteration = a.iteration or None  # EE-LLM's 0: the latest
        if os.path.isfile(os.path.join(root, TRACKER)) or a.iteration is not None:
            path = resolve(root, a.iteration, checksums=False)  # describe() verifies them
        else:
            path = root
        info = describe(path)
        if a.json:
            print(json.dumps(info, indent=1, default=str))
            return
        print(f"checkpoint        {info['path']}")
        print(f"iteration         {info['iteration']}  (consumed samples {info['consumed_samples']})")
        print(
            f"saved from        TP={info['saved_layout'].get('tensor')} PP={info['saved_layout'].get('pipeline')} "
            f"DP={info['saved_layout'].get('data')}  (loads into any layout)"
        )
        print(f"optimizer state   {'yes' if info['has_optimizer'] else 'no (weights only)'}")
        print(f"checksums         {'verified' if info['checksums'] else 'none (written before checksums)'}")
        print(f"exits             {info['exits'] or 'none'}")
        print(f"parameters        {info['parameters']:,}")
        print("flags")
        shown = info["args"] if a.args else {k: info["args"][k] for k in SUMMARY_ARGS if k in info["args"]}
        for k, v in sorted(shown.items()):
            print(f"  --{k.replace('_', '-'):40s} {v}")
        print(f"tensors ({len(info['tensors'])}, optimizer: {info['optimizer_tensors']})")
        for name, t in info["tensors"].items():
            print(f"  {name:70s} {str(tuple(t['shape'])):>16s} {t['dtype']}")

    if __name__ == "__main__":
        main()
