"""The learned confidence measure: its training data equal the model's own exit and final
logits, its fit beats the constant predictor, and decoding with it exits where its scores say."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megatron.early_exit.confidence_training import collect, evaluate, fit  # noqa: E402
from megatron.early_exit.inference import EarlyExit, InferenceConfigError, generate  # noqa: E402
from megatron.early_exit.inference.learned_confidence import ConfidenceEstimator, attach, attached  # noqa: E402
from tests.helpers import tiny_model_flags, write_random_checkpoint  # noqa: E402

NUM_LAYERS, EXITS, SEQ, VOCAB = 4, [1, 3], 32, 64


def _write_checkpoint(root):
    write_random_checkpoint(root, tiny_model_flags(NUM_LAYERS, SEQ, VOCAB, EXITS, seed=3), VOCAB)


@pytest.fixture(scope="module")
def checkpoint(dist1, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("confidence_ckpt"))
    _write_checkpoint(root)
    return root


@pytest.fixture(scope="module")
def model(checkpoint):
    from megatron.early_exit.inference.loading import load_model

    return load_model(checkpoint)[0]


def _sequences(n, length=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g).tolist()


def test_collected_targets_are_the_models_own_agreement(model):
    seqs = _sequences(2)
    samples = collect(model, seqs)
    assert sorted(samples) == EXITS
    with torch.no_grad():
        tokens = torch.tensor(seqs)
        pos = torch.arange(SEQ).unsqueeze(0).expand(len(seqs), -1)
        out = model(tokens, pos, None)  # final logits [b, s, V] and the pending exits
        final = out.final.argmax(-1)  # [b, s]
        for pending in out.exits:
            exit_top = pending.compute_logits().argmax(-1).transpose(0, 1)  # [s, b, V] -> [b, s]
            expected = (exit_top == final).float().reshape(-1)
            assert torch.equal(samples[pending.layer_number].agree, expected)
    n = len(seqs) * SEQ
    assert all(s.features.shape == (n, 32 + 3) for s in samples.values())


def test_fit_beats_the_constant_predictor(model):
    samples = collect(model, _sequences(6, seed=1))
    estimator = fit(samples, 32)
    report = evaluate(estimator, samples)
    for n, s in samples.items():
        rate = float(s.agree.mean().clamp(1e-3, 1 - 1e-3))
        constant = -(rate * torch.log(torch.tensor(rate)) + (1 - rate) * torch.log(torch.tensor(1 - rate)))
        assert report[n]["log_loss"] <= float(constant) + 1e-6, (n, report[n], float(constant))
        assert report[n]["agreement"] == pytest.approx(float(s.agree.mean()))


def _constant_estimator(scores):
    """An estimator whose score at exit n is scores[n] whatever the token."""
    est = ConfidenceEstimator(32, EXITS)
    for n, p in scores.items():
        torch.nn.init.zeros_(est.heads[str(n)].weight)
        torch.nn.init.constant_(est.heads[str(n)].bias, float(torch.logit(torch.tensor(p))))
    return est


def test_decoding_exits_where_the_estimator_says(model):
    prompts = _sequences(2, length=5, seed=2)
    try:
        attach(model, _constant_estimator({1: 0.1, 3: 0.9}))
        result = generate(model, prompts, EarlyExit(0.5, "learned"), max_new_tokens=6)
        assert all(d == 3 for row in result.exit_layers for d in row[1:]), result.exit_layers
        first = generate(model, prompts, EarlyExit(0.0, "max_prob", exit_layers=(3,)), max_new_tokens=6)
        assert result.tokens == first.tokens  # every token leaves at exit 3, as when it always fires
        attach(model, _constant_estimator({1: 0.1, 3: 0.2}))  # nothing reaches the threshold: full depth
        full = generate(model, prompts, EarlyExit(0.5, "learned"), max_new_tokens=6)
        assert all(d == NUM_LAYERS for row in full.exit_layers for d in row)
    finally:
        model.__dict__.pop("confidence_estimator", None)
    with pytest.raises(InferenceConfigError, match="needs a confidence estimator"):
        generate(model, prompts, EarlyExit(0.5, "learned"), max_new_tokens=2)


def test_estimator_files_round_trip_and_refuse_mismatches(model, tmp_path):
    est = _constant_estimator({1: 0.3, 3: 0.7})
    path = str(tmp_path / "c.safetensors")
    est.save(path, {"note": 1})
    back = ConfidenceEstimator.load(path)
    assert back.exit_layers == EXITS
    assert all(torch.equal(a, b) for a, b in zip(est.state_dict().values(), back.state_dict().values()))
    with pytest.raises(InferenceConfigError, match="trained for hidden size 32 and exits \\[1\\]"):
        attach(model, ConfidenceEstimator(32, [1]))
    assert attached(model) is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file of tensors")
    with pytest.raises(InferenceConfigError, match="is not a confidence estimator"):
        ConfidenceEstimator.load(str(bad))
    with pytest.raises(InferenceConfigError, match="no file"):
        ConfidenceEstimator.load(str(tmp_path / "missing.safetensors"))


def test_training_tool_writes_an_estimator_the_loader_attaches(checkpoint, corpus, tmp_path, capsys):
    import train_confidence_estimator as tool

    from megatron.early_exit.inference.loading import load_model

    out = str(tmp_path / "est.safetensors")
    tool.main(
        ["--load", checkpoint, "--data-path", corpus, "--seq-length", "16", "--num-windows", "8", "--output", out]
    )
    printed = capsys.readouterr().out
    assert "agreement" in printed and f"wrote {out}" in printed
    model, _, _ = load_model(checkpoint, confidence_estimator=out)
    assert attached(model) is not None and attached(model).exit_layers == EXITS


def test_hidden_state_only_estimator_skips_the_projection_of_exits_that_do_not_fire(model, tmp_path):
    from megatron.early_exit.inference import layers

    samples = collect(model, _sequences(3, seed=4), use_logits=False)
    assert all(s.features.shape[1] == 32 for s in samples.values())
    est = fit(samples, 32)
    assert not est.use_logits
    path = str(tmp_path / "h.safetensors")
    est.save(path)
    assert not ConfidenceEstimator.load(path).use_logits
    # Constant scores: exit 1 never fires, exit 3 always; exit 1's head must never run.
    const = ConfidenceEstimator(32, EXITS, use_logits=False)
    for n, p in {1: 0.1, 3: 0.9}.items():
        torch.nn.init.zeros_(const.heads[str(n)].weight)
        torch.nn.init.constant_(const.heads[str(n)].bias, float(torch.logit(torch.tensor(p))))
    calls = []
    original = layers.exit_logits

    def counting(model_, head, layer, hidden, attention_output):
        calls.append(layer.layer_number)
        return original(model_, head, layer, hidden, attention_output)

    import megatron.early_exit.inference.decoder as decoder_module

    decoder_module.exit_logits = counting
    try:
        attach(model, const)
        result = generate(model, _sequences(1, length=4, seed=5), EarlyExit(0.5, "learned"), max_new_tokens=5)
    finally:
        decoder_module.exit_logits = original
        model.__dict__.pop("confidence_estimator", None)
    assert all(d == 3 for d in result.exit_layers[0][1:])
    assert calls and set(calls) == {3}, calls  # only the firing exit projected onto the vocabulary
