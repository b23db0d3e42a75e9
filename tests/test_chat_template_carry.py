"""A chat model's template survives conversion both ways: transformers 5 saves it as
chat_template.jinja, earlier versions as tokenizer_config.json's `chat_template`; either is
carried into our checkpoint (where the server's /v1/chat/completions finds it) and back out
to a Hugging Face folder that the installed transformers loads with the same template."""

import json

import pytest
import torch

VOCAB = 64
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _save_chat_model(folder, in_config: bool):
    """A random 2-layer Llama and a word-level tokenizer with a chat template, saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB - 2)}
    words.update({"<s>": VOCAB - 2, "</s>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(str(folder))
    if in_config:  # the older layout: the template inside tokenizer_config.json only
        jinja = folder / "chat_template.jinja"
        if jinja.exists():
            jinja.unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    ).save_pretrained(str(folder))


@pytest.mark.parametrize("in_config", [False, True], ids=["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_is_carried_both_ways(dist1, tmp_path, in_config):
    from transformers import AutoTokenizer

    from megatron.early_exit.hf.convert import export_hf, import_hf
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.server.tokenizer_api import find_chat_template

    hf = tmp_path / "hf"
    _save_chat_model(hf, in_config)
    if not in_config:  # what transformers 5 writes, the case that was dropped
        assert (hf / "chat_template.jinja").read_text() == TEMPLATE
    import_hf(str(hf), str(tmp_path / "ours"), 1, 1, progress=False)
    _, tokenizer, _ = load_model(str(tmp_path / "ours"), 1, device=torch.device("cpu"))
    assert find_chat_template(tokenizer) == TEMPLATE
    export_hf(str(tmp_path / "ours"), str(tmp_path / "back"), progress=False)
    assert (tmp_path / "back" / "chat_template.jinja").exists() != in_config
    back = AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert back.chat_template == TEMPLATE
    messages = [{"role": "user", "content": "w1 w2"}]
    assert (
        back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<|user|>w1 w2<|assistant|>"
    )
