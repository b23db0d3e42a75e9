"""GET /tokenizer_info, POST /tokenize, POST /detokenize, as vLLM's server names them and
lm-eval's remote tokenizer reads them (eos/bos/pad token texts, the chat template, the
context length; {"tokens"} and {"prompt"} back), and the chat template they share with
/v1/chat/completions.

The chat template is --chat-template's file, else a Hugging Face tokenizer's
chat_template.jinja (transformers 5) or the `chat_template` of its tokenizer_config.json,
beside its tokenizer.json or tokenizer.model; it
is rendered as Hugging Face renders it (Jinja, sandboxed, trim_blocks and lstrip_blocks).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron.early_exit.server.jobs import ModelLimits, RequestError
from megatron.early_exit.server.schemas import (
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)


def token_text(tokenizer, token_id: Optional[int]) -> Optional[str]:
    """A special token's own text (`<|endoftext|>`, `</s>`), which decoding would drop."""
    if token_id is None:
        return None
    for owner, method in (("_tok", "id_to_token"), ("_sp", "id_to_piece")):  # tokenizers / sentencepiece
        library = getattr(tokenizer, owner, None)
        if library is not None:
            return getattr(library, method)(int(token_id))
    return tokenizer.detokenize([token_id])


def find_chat_template(tokenizer, path: Optional[str] = None) -> Optional[str]:
    """--chat-template's file, else the Hugging Face tokenizer's own template, else None."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    # tokenizer.json, or a SentencePiece model, in a folder converted from Hugging Face.
    tokenizer_file = getattr(tokenizer, "tokenizer_file", None) or getattr(tokenizer, "model_file", None)
    if not tokenizer_file:
        return None
    folder = os.path.dirname(tokenizer_file)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


@dataclass
class TokenizerFacts:
    """The tokenizer as the HTTP layer describes and uses it."""

    tokenizer: object
    chat_template: Optional[str] = None

    def __post_init__(self):
        tok = self.tokenizer
        self.eos_token = token_text(tok, tok.eod)
        self.bos_token = token_text(tok, tok.bos)
        self.pad_token = token_text(tok, tok.pad)
        # Special tokens' texts tokenize to their ids (lm-eval reads eos_token_id so).
        self.special = {
            t: i
            for t, i in ((self.pad_token, tok.pad), (self.bos_token, tok.bos), (self.eos_token, tok.eod))
            if t is not None and i is not None
        }

    def info(self, limits: ModelLimits) -> TokenizerInfo:
        return TokenizerInfo(
            tokenizer_class=type(self.tokenizer).__name__,
            eos_token=self.eos_token,
            bos_token=self.bos_token,
            pad_token=self.pad_token,
            chat_template=self.chat_template,
            model_max_length=limits.max_sequence_length,
            vocab_size=self.tokenizer.vocab_size,
        )

    def tokenize(self, text: str, param: str) -> List[int]:
        if text in self.special:
            return [self.special[text]]
        try:
            return list(self.tokenizer.tokenize(text))
        except ValueError as err:  # e.g. NullTokenizer text that is not token ids
            raise RequestError(param, str(err)) from None

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise RequestError(
                "messages",
                f"the tokenizer ({type(self.tokenizer).__name__}) has no chat template: "
                "start the server with --chat-template FILE, or use /v1/completions",
            )
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": m.role, "content": m.text} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as err:
            raise RequestError("messages", f"the chat template refused them: {err}") from None


def tokenize(request: TokenizeRequest, facts: TokenizerFacts, limits: ModelLimits) -> TokenizeResponse:
    if (request.prompt is None) == (request.messages is None):
        raise RequestError("prompt", "give exactly one of prompt (text) and messages (a chat)")
    if request.messages is not None:
        ids = facts.tokenize(facts.render_chat(request.messages, request.add_generation_prompt), "messages")
    else:
        ids = facts.tokenize(request.prompt, "prompt")
        bos = facts.tokenizer.bos
        if request.add_special_tokens and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
    strs = [token_text(facts.tokenizer, t) for t in ids] if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=limits.max_sequence_length, tokens=ids, token_strs=strs)


def detokenize(request: DetokenizeRequest, facts: TokenizerFacts, limits: ModelLimits) -> DetokenizeResponse:
    bad = [i for i, t in enumerate(request.tokens) if not 0 <= t < facts.tokenizer.vocab_size]
    if bad:
        raise RequestError(
            f"tokens[{bad[0]}]",
            f"{request.tokens[bad[0]]} is outside the tokenizer's vocabulary [0, {facts.tokenizer.vocab_size})",
        )
    return DetokenizeResponse(prompt=facts.tokenizer.detokenize(request.tokens))
