"""An lm-evaluation-harness model over the in-process engine, registered as `early-exit`.

    lm = EarlyExitLM(model, tokenizer, Setting(threshold=0.8))
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path=...))

or by name, once this module is imported (one process): `lm_eval.simple_evaluate(model="early-exit",
model_args="load=CHECKPOINT,exit_layer=4", ...)` (or `threshold=0.8`).

    loglikelihood          score(): the continuation's summed log-probabilities, and whether
                           every continuation token is the argmax (is_greedy)
    loglikelihood_rolling  the same over lm-eval's disjoint windows of the text
    generate_until         generate() with the setting's strategy, cut at the stop strings

Inputs are truncated as lm-eval's `local-completions` model truncates them (left, to the
model's maximum length), so the numbers equal those of the server. Under tensor or pipeline
parallelism every rank runs the same evaluation in lockstep (the LM reports rank 0 of a
world of 1 to lm-eval, which then gives every rank all requests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it only registers them into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron.early_exit.evaluation.settings import Setting, score_setting
from megatron.early_exit.inference.generate import generate
from megatron.early_exit.inference.sampling import SamplingParams


@dataclass
class GenerationStats:
    """What the generation requests cost: decode speed and depth, summed over the run."""

    num_decoded: int = 0
    decode_seconds: float = 0.0
    depths: List[int] = field(default_factory=list)

    def add(self, result) -> None:
        self.num_decoded += result.num_decoded
        self.decode_seconds += result.decode_seconds
        self.depths += [d for row in result.exit_layers for d in row[1:]]

    @property
    def tokens_per_second(self) -> Optional[float]:
        return self.num_decoded / self.decode_seconds if self.decode_seconds > 0 else None

    @property
    def mean_depth(self) -> Optional[float]:
        return sum(self.depths) / len(self.depths) if self.depths else None


@register_model("early-exit")
class EarlyExitLM(TemplateLM):
    def __init__(
        self,
        model=None,
        tokenizer=None,
        setting: Setting = Setting(),
        batch_size: int = 16,
        max_length: Optional[int] = None,
        progress: Optional[Callable[[str], None]] = None,
        load: Optional[str] = None,
        exit_layer: Optional[int] = None,
        threshold: Optional[float] = None,
        **unused,
    ):
        """`model` and `tokenizer` as load_model returns them, or `load` (a checkpoint, one
        process) with `exit_layer` or `threshold`, for lm-eval's model-by-name API."""
        super().__init__()
        if model is None:
            model, tokenizer = _load_single_process(load)
            setting = Setting(
                exit_layer=None if exit_layer is None else int(exit_layer),
                threshold=None if threshold is None else float(threshold),
            )
        self.model, self.tokenizer, self.setting = model, tokenizer, setting
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.max_sequence_length)
        self.progress = progress or (lambda line: None)
        self.stats = GenerationStats()

    # -- tokens ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's remote tokenizer: the BOS token, else the end-of-text token.
        return self.tokenizer.bos if self.tokenizer.bos is not None else self.tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tokenizer.tokenize(string)

    def tok_decode(self, tokens: List[int]) -> str:
        return self.tokenizer.detokenize(tokens)

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    # -- scoring -----------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of the continuation's logprobs, every continuation token greedy) per request."""
        inputs, ctxlens = [], []
        for _, context_enc, continuation_enc in requests:
            whole = context_enc + continuation_enc
            inputs.append(whole[-self.max_length :])
            ctxlens.append(len(context_enc) - max(0, len(whole) - self.max_length))
        results = []
        chunk = max(self.batch_size, 1) * 8  # several batches per progress line
        start = time.perf_counter()
        for begin in range(0, len(inputs), chunk):
            batch = inputs[begin : begin + chunk]
            scores = score_setting(self.model, batch, self.setting, self.batch_size, self.tokenizer.vocab_size)
            for lp, gr, ctxlen in zip(scores.logprobs, scores.greedy, ctxlens[begin : begin + chunk]):
                results.append((float(sum(lp[ctxlen - 1 :])), all(gr[ctxlen - 1 :])))
            if not disable_tqdm:
                done = begin + len(batch)
                self.progress(
                    f"{self.setting.name}: scored {done}/{len(inputs)} requests "
                    f"({done / (time.perf_counter() - start):.1f}/s)"
                )
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        return totals

    # -- generation --------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        outputs = []
        for begin in range(0, len(requests), self.batch_size):
            batch = requests[begin : begin + self.batch_size]
            outputs += self._generate_batch([r.args for r in batch])
            if not disable_tqdm:
                tps = self.stats.tokens_per_second
                self.progress(
                    f"{self.setting.name}: generated {begin + len(batch)}/{len(requests)} requests"
                    + (f" ({tps:.1f} tokens/s)" if tps else "")
                )
        return outputs

    def _generate_batch(self, args) -> List[str]:
        """Requests with the same options decode as one batch; others one at a time."""
        groups = {}
        for i, (context, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        outputs: List[Optional[str]] = [None] * len(args)
        for members in groups.values():
            gen_kwargs = dict(args[members[0]][1])
            texts = self._generate([args[i][0] for i in members], gen_kwargs)
            for i, text in zip(members, texts):
                outputs[i] = text
        return outputs

    def _generate(self, contexts: List[str], gen_kwargs: dict) -> List[str]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = max(1, min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length - 1))
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", True) else 0.0
        sampling = SamplingParams(temperature=temperature, seed=1234) if temperature > 0 else SamplingParams()
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-(self.max_length - max_new) :] for c in contexts]
        result = generate(
            self.model,
            prompts,
            self.setting.strategy(),
            max_new_tokens=max_new,
            sampling=sampling,
            stop_tokens=[self.eot_token_id],
        )
        self.stats.add(result)
        # The text the tokens add after the prompt, joined as the server joins it (detokenized
        # alone, SentencePiece would drop a leading space and token-id text its separator).
        from megatron.early_exit.server.text import Continuation

        texts = []
        for prompt, tokens in zip(prompts, result.tokens):
            if tokens and tokens[-1] == self.eot_token_id:
                tokens = tokens[:-1]
            texts.append(_cut_at_stops(Continuation(self.tokenizer, prompt).text(tokens), until))
        return texts


def _cut_at_stops(text: str, stops: List[str]) -> str:
    """The text before the first of the stop strings (lm-eval's `until`)."""
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def _load_single_process(load: Optional[str]):
    from megatron.early_exit.inference.errors import InferenceConfigError
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    if not load:
        raise InferenceConfigError("the early-exit model needs model_args load=CHECKPOINT (or a model object)")
    initialize_parallel(1, 1)
    model, tokenizer, _ = load_model(load)
    return model, tokenizer
