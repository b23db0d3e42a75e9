"""Early-exit LLM training and inference on megatron-core."""

from setuptools import find_namespace_packages, setup

setup(
    name="megatron-early-exit",
    version="0.1.0",
    description="Early-exit large language models: training with 3D parallelism and fast inference, on megatron-core",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `megatron` is a PEP 420 namespace package shared with megatron-core: never add
    # megatron/__init__.py, it would hide megatron.core.
    packages=find_namespace_packages(include=["megatron.early_exit", "megatron.early_exit.*"]),
    install_requires=[
        "torch>=2.4",  # 2.13.0 is the CPU wheel on the development machines
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "sentencepiece",
        "psutil",  # dist_checkpointing's async save needs it at run time
        "tqdm",  # megatron-core inference imports it
        "einops",
        "regex",  # GPT-2 BPE pre-tokenisation
        "tokenizers",  # Hugging Face tokenizer.json
        "tensorboard",
        "safetensors",
        "fastapi",  # the text generation server (megatron/early_exit/server)
        "pydantic>=2",
        "uvicorn",
        "prometheus_client",  # the server's GET /metrics
    ],
    extras_require={
        "test": [
            "pytest>=7,<9.2",  # pytest 9.2 ids break pytest-xdist 3.8 --dist loadgroup (xdist #1386)
            "pytest-timeout",
            "pytest-xdist",  # make test: two workers
            "matplotlib",
            "openai",
            "httpx",
            "transformers",
            "lm-eval[api]==0.4.13",
            "wandb",
            "ruff>=0.6",
        ],
        # tools/evaluate.py: lm-evaluation-harness tasks over the in-process engine.
        "eval": ["lm-eval==0.4.13", "matplotlib"],
        # --wandb-project: Weights & Biases logging beside TensorBoard.
        "wandb": ["wandb"],
        "bench": ["matplotlib"],
        # Need CUDA and nvcc to build; used only when importable.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
)
