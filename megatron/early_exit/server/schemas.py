"""Typed requests and replies of the server's endpoints (pydantic), validated once on arrival.

    PUT  /api                   ApiRequest -> ApiResponse             Megatron-LM's and EE-LLM's fields + early exit
    POST /v1/completions        CompletionRequest -> Completion       OpenAI's completions + early exit
    POST /v1/chat/completions   ChatRequest -> ChatCompletion         OpenAI's chat completions + early exit
    GET  /tokenizer_info        TokenizerInfo                         as vLLM's server (lm-eval's remote tokenizer)
    POST /tokenize              TokenizeRequest -> TokenizeResponse
    POST /detokenize            DetokenizeRequest -> DetokenizeResponse
    GET  /v1/models             ModelList
    GET  /health                Health

Every model is strict (a JSON string is not a number, 1 is not true) and forbids unknown
fields, so a typo gets a 422 naming the field instead of being ignored. Limits that depend
on the loaded model (exit layers, context length, prompt size) are checked when the request
is turned into an engine job (jobs.py), and answered with a 400 naming the field.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from megatron.early_exit.inference import CONFIDENCE_MEASURES, KV_STRATEGIES
from megatron.early_exit.inference.strategies import DEFAULT_EARLY_EXIT_THRESHOLD

MAX_API_PROMPTS = 128  # Megatron-LM's limit on prompts per request
MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows
# Sampling divides float32 logits by the temperature and compares float32 probabilities with
# top_p: below these, logits overflow and top_p rounds to 0, and every token is dropped.
MIN_TEMPERATURE = 1e-6
MIN_TOP_P = 1e-6
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LENGTH_PENALTY = 10.0  # length ** 10 stays finite for any context length; 1e308 overflowed

Confidence = Literal[tuple(CONFIDENCE_MEASURES)]
KVStrategy = Literal[KV_STRATEGIES]


LONE_SURROGATE = "lone_surrogate"  # the error type of text that is not valid Unicode (answered 400)


def _valid_unicode(value):
    """JSON may escape a lone surrogate (\\ud800) that no tokenizer, and no UTF-8 reply, can
    take: refused where it arrives, whatever the field."""
    texts = (
        [value]
        if isinstance(value, str)
        else value
        if isinstance(value, list)
        else [*value.keys(), *value.values()]
        if isinstance(value, dict)
        else []
    )
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise PydanticCustomError(
                    LONE_SURROGATE, "not valid Unicode: a lone surrogate at character {at}", {"at": err.start}
                ) from None
        elif isinstance(text, (list, dict)):
            _valid_unicode(text)
    return value


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    _unicode = field_validator("*")(classmethod(lambda cls, value: _valid_unicode(value)))


class SpeculativeOptions(Strict):
    """Self-speculative decoding: draft with an exit, verify with the full model (greedy or sampled)."""

    exit_layer: int = Field(description="the exit that drafts (an entry of the model's --exit-layer-nums)")
    num_draft: int = Field(4, ge=1, le=64, description="most tokens drafted per round")
    draft_threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="a round's drafting stops after a draft whose probability at the exit is below this (0: never)",
    )


class EarlyExitOptions(Strict):
    """How tokens may leave the network early; shared by /api and /v1/completions."""

    use_early_exit: bool = Field(False, description="decode with early exit (false: every token at full depth)")
    early_exit_thres: Optional[float] = Field(
        None,
        ge=0.0,
        le=1.0,
        description=f"confidence a token needs at an exit to leave there, in [0, 1] (default "
        f"{DEFAULT_EARLY_EXIT_THRESHOLD}; 0: always the first active exit); for full depth set "
        "use_early_exit false",
    )
    exit_layers: Optional[List[int]] = Field(
        None, description="exits allowed to fire, by --exit-layer-nums entry (null or []: all of them)"
    )
    exit_thresholds: Optional[Dict[str, float]] = Field(
        None,
        description='a threshold per exit (by --exit-layer-nums entry, e.g. {"2": 0.95, "4": 0.8}, as '
        "tools/calibrate_threshold.py --per-exit writes them), overriding early_exit_thres there; "
        "above 1: that exit never fires",
    )
    confidence: Confidence = Field("max_prob", description="confidence measure: " + ", ".join(CONFIDENCE_MEASURES))
    kv_strategy: KVStrategy = Field(
        "recompute",
        description="K/V of tokens that left early: recompute (EE-LLM) or propagate (CALM); pipeline "
        "(EE-LLM's pipeline-based method) on a server with pipeline stages",
    )
    speculative: Optional[SpeculativeOptions] = Field(
        None,
        description="self-speculative decoding instead of early exit (greedy or sampled)",
    )
    print_max_prob: bool = Field(
        False,
        description="reply with each token's probability under the layer that produced it (with greedy "
        "decoding, that layer's top-1 probability, which early exit compares with the threshold)",
    )
    exit_layer: Optional[int] = Field(
        None,
        description="score and generate with this one exit's head (an --exit-layer-nums entry, or num_layers "
        "for the final layer); generation takes its first token, from the prompt pass, at full depth",
    )

    @field_validator("exit_thresholds")
    @classmethod
    def _exit_keys(cls, value):
        if value is None:
            return None
        bad = [k for k in value if not k.strip().isdigit()]
        if bad:
            raise ValueError(f'keys are exits by --exit-layer-nums entry (like "2"), got {bad[0]!r}')
        return {int(k): v for k, v in value.items()}

    @model_validator(mode="after")
    def _one_strategy(self):
        if self.speculative is not None and self.use_early_exit:
            raise ValueError("speculative and use_early_exit are exclusive: choose one decoding strategy")
        return self

    @field_validator("temperature", "top_p", check_fields=False)
    @classmethod
    def _usable_sampling_value(cls, value, info):
        # Tiny positive values overflow the sampler (1 / temperature) or keep no token.
        minimum, zero = {"temperature": (MIN_TEMPERATURE, "greedy"), "top_p": (MIN_TOP_P, "where it means off")}[
            info.field_name
        ]
        if 0.0 < value < minimum:
            raise ValueError(f"must be 0 ({zero}) or at least {minimum:g}, got {value:g}")
        return value


# -- PUT /api ------------------------------------------------------------------------------------------


class ApiRequest(EarlyExitOptions):
    """Megatron-LM's text generation request, with EE-LLM's early-exit fields (as booleans
    and a probability, not key presence and a threshold of 40)."""

    prompts: List[str] = Field(
        min_length=1, max_length=MAX_API_PROMPTS, description="prompts, or one prompt as a string"
    )
    tokens_to_generate: int = Field(64, ge=0, description="new tokens per prompt (0: score the prompts only)")
    logprobs: bool = Field(
        False,
        description="reply with log-probabilities aligned with tokens[1:] (the prompt's "
        "and the generation's; with echo_prompts false, the generation's)",
    )
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0: greedy")
    top_k: int = Field(0, ge=0, le=1000, description="sample among the k most likely tokens (0: all, 1: greedy)")
    top_p: float = Field(0.0, ge=0.0, le=1.0, description="nucleus sampling (0: off)")
    top_p_decay: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    top_p_bound: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    add_BOS: bool = Field(False, description="put the beginning-of-text token before each prompt")
    stop_on_eol: bool = Field(False, description="stop a prompt at its first newline token")
    stop_on_double_eol: bool = Field(False, description="stop a prompt at a double-newline token")
    stop_sequences: Optional[List[str]] = Field(None, description="stop a prompt once its text holds one of these")
    stop_token: Optional[int] = Field(
        None, ge=0, description="one more token id that ends a prompt (the end-of-document token always does)"
    )
    prevent_newline_after_colon: bool = Field(False, description="never generate the newline token right after ':'")
    beam_width: Optional[int] = Field(
        None, ge=1, description="Megatron-LM's beam search: 1 (greedy, with `scores`); wider beams are not supported"
    )
    length_penalty: float = Field(
        1.0,
        ge=-MAX_LENGTH_PENALTY,
        le=MAX_LENGTH_PENALTY,
        description="beam_width: scores are sum(logprobs) / length ** length_penalty",
    )
    random_seed: int = Field(-1, ge=-1, le=SEED_RANGE[1], description="seed of sampling (-1: a fresh one)")
    echo_prompts: bool = Field(True, description="text and segments start with the prompt")
    no_log: bool = Field(False, description="do not log the request on the server")

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_prompt(cls, prompts):
        return [prompts] if isinstance(prompts, str) else prompts

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty_stops(cls, stops):
        if stops is not None and any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops


class ApiResponse(BaseModel):
    text: List[str] = Field(description="per prompt: prompt + generation (echo_prompts) or the generation")
    segments: List[List[str]] = Field(
        description="per prompt: the text each token of `tokens` adds (they join to `text`)"
    )
    tokens: List[List[int]] = Field(description="per prompt: the token ids of `text`")
    logprobs: Optional[List[List[float]]] = Field(
        None, description="per prompt: log p(tokens[t+1] | tokens[:t+1]) (echo_prompts), or of each generated token"
    )
    exit_layers: List[List[int]] = Field(
        description="per prompt: the exit each generated token left at "
        "(its --exit-layer-nums entry; num_layers: the final layer)"
    )
    probs: Optional[List[List[float]]] = Field(None, description="print_max_prob: probability of each generated token")
    scores: Optional[List[float]] = Field(
        None, description="beam_width: each generation's length-penalised log-probability"
    )


# -- POST /v1/completions -----------------------------------------------------------------------------

PromptInput = Union[str, List[str], List[int], List[List[int]]]


def check_stops(stop):
    """OpenAI's rule for `stop`: a string or up to 4 of them, none empty."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (len(stops) > 4 or any(s == "" for s in stops)):
        raise ValueError("at most 4 stop sequences, none empty")
    return stop


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(EarlyExitOptions):
    """OpenAI's completions request; the early-exit fields ride along as extra body fields."""

    model: Optional[str] = Field(None, description="any name: the server serves one model")
    prompt: PromptInput = Field(description="a string, a list of strings, or token ids (a list or a list of lists)")
    max_tokens: int = Field(16, ge=0, description="0 (with echo): score the prompt only")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: sample among the k most likely tokens (0: all)")
    n: int = Field(1, ge=1, le=1, description="one completion per prompt")
    best_of: Optional[int] = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="log-probability of each token, and "
        "top_logprobs: the N likeliest alternatives (and the chosen token); with echo, "
        "the prompt's tokens too (null for the first)",
    )
    echo: bool = False
    stop: Optional[Union[str, List[str]]] = Field(None, description="up to 4 sequences; the text ends before the first")
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    logit_bias: Optional[Dict[str, float]] = Field(None, max_length=0, description="not supported (must be empty)")
    suffix: Optional[str] = Field(None, max_length=0, description="not supported")
    user: Optional[str] = None

    _stops = field_validator("stop")(classmethod(lambda cls, stop: check_stops(stop)))

    @property
    def stop_list(self) -> List[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionLogprobs(BaseModel):
    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: Optional[List[Optional[Dict[str, float]]]] = None
    text_offset: List[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    exit_layers: List[int] = Field(
        description="extension: the exit each generated token left at "
        "(its --exit-layer-nums entry; num_layers: the final layer)"
    )
    probs: Optional[List[float]] = Field(
        None, description="extension (print_max_prob): each generated token's probability"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


# -- GET /v1/models, /health ---------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "megatron-early-exit"
    num_layers: int
    exit_layer_nums: List[int]
    max_sequence_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    queued: int = Field(description="requests waiting for the decoder")
    busy: bool = Field(description="the decoder is running a batch")
    served: int = Field(description="engine calls finished since start")


# -- POST /v1/chat/completions -------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart]]
    name: Optional[str] = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(EarlyExitOptions):
    """OpenAI's chat completions request: the messages go through the tokenizer's chat template."""

    model: Optional[str] = Field(None, description="any name: the server serves one model")
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="default: up to the model's context")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the same as max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: sample among the k most likely tokens (0: all)")
    n: int = Field(1, ge=1, le=1, description="one completion")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = Field(None, description="up to 4 sequences; the text ends before the first")
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    logprobs: bool = Field(False, description="log-probability of each generated token")
    top_logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_LOGPROBS, description="alternatives per token (needs logprobs)"
    )
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    logit_bias: Optional[Dict[str, float]] = Field(None, max_length=0, description="not supported (must be empty)")
    user: Optional[str] = None

    _stops = field_validator("stop")(classmethod(lambda cls, stop: check_stops(stop)))

    @property
    def stop_list(self) -> List[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[List[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    exit_layers: List[int] = Field(
        description="extension: the exit each generated token left at "
        "(its --exit-layer-nums entry; num_layers: the final layer)"
    )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Optional[Usage] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    exit_layers: List[int] = Field(default_factory=list)


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


# -- GET /tokenizer_info, POST /tokenize, POST /detokenize (vLLM's names and fields) -------------------


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: Optional[str] = Field(description="text of the end-of-document token")
    bos_token: Optional[str] = None
    pad_token: Optional[str] = None
    chat_template: Optional[str] = Field(None, description="the Jinja chat template (null: none)")
    model_max_length: int
    vocab_size: int


class TokenizeRequest(Strict):
    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="text to tokenize (or messages)")
    messages: Optional[List[ChatMessage]] = Field(None, description="a chat, through the chat template")
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(
        True, description="put the beginning-of-text token first (when the tokenizer has one)"
    )
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None


class DetokenizeRequest(Strict):
    model: Optional[str] = None
    tokens: List[int]


class DetokenizeResponse(BaseModel):
    prompt: str
