"""Random Hugging Face models and the converters' calls, shared by the Hugging Face tests.

Models are random transformers models of a Llama family (weights drawn at std 0.3 and norms
away from 1, so that a wrong mapping shows in the logits), saved with save_pretrained.
"""

import json
import os

import torch

VOCAB, LAYERS, HIDDEN, HEADS, FFN = 64, 4, 32, 4, 128
SEQ = 48


def save_random_hf(path, model_type="llama", seed=0, **overrides):
    """A random transformers model of a Llama family (llama, mistral, qwen2, qwen3) saved
    with save_pretrained; returns it in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and not name.endswith(".bias"):
                param.normal_(1.0, 0.2)  # norms
            else:
                param.normal_(0.0, 0.3)
    model.save_pretrained(str(path))
    return model


def save_random_llama(path, seed=0, **overrides):
    """A random LlamaForCausalLM saved with save_pretrained; returns it in eval mode."""
    return save_random_hf(path, "llama", seed, **overrides)


def save_word_tokenizer(path, vocab=VOCAB):
    """A tiny tokenizer.json (word level, eos and bos) beside a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 2)}
    words.update({"<s>": vocab - 2, "</s>": vocab - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>"}, f)


def batch(seed=1, b=2, s=SEQ, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g), torch.arange(s).unsqueeze(0).expand(b, -1)


def load(root):
    from megatron.early_exit.inference.loading import load_model

    return load_model(str(root), 1, device=torch.device("cpu"))[0]


def full_state(root):
    from megatron.early_exit.sharding import full_state_dict

    return full_state_dict(load(root))


def import_llama(hf_dir, out, tp=1, pp=1):
    from megatron.early_exit.hf.convert import import_hf as run

    return run(str(hf_dir), str(out), tp, pp, progress=False)


def add_exits(src, out, copy_init=True, exits_from=None, **exits):
    from megatron.early_exit.hf.add_exits import add_exits as run

    return run(str(src), str(out), exits, copy_init=copy_init, exits_from=exits_from and str(exits_from))


def export_llama(src, out, **kwargs):
    from megatron.early_exit.hf.convert import export_hf as run

    return run(str(src), str(out), progress=False, **kwargs)


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n]


def edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    cfg = json.load(open(path))
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    json.dump(cfg, open(path, "w"))


def fresh_process_env():
    """This process's environment without the rendezvous port the dist1 fixture holds."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    return dict(env, PYTHONWARNINGS="ignore")
