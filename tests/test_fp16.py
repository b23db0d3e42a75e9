"""fp16 end to end on CPU: the loss scale and the skipped iterations are logged to stdout
and TensorBoard, and an overflow (a loss scale too large for fp16 gradients) skips steps."""

import re

import pytest

from tests.training_fixtures import tiny_run_flags


def run_fp16(corpus, tmp_path, initial_loss_scale, iters=6):
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    flags = tiny_run_flags(
        corpus,
        iters=iters,
        **{
            "--fp16": None,
            "--initial-loss-scale": initial_loss_scale,
            "--log-interval": 3,
            "--eval-iters": 0,
            "--tensorboard-dir": str(tmp_path / "tb"),
        },
    )
    return pretrain(parse_run_config(flags, world_size=1))


def tensorboard_scalars(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def log_fields(text, name):
    return [float(v) for v in re.findall(rf"\| {re.escape(name)}: ([-+.\dEe]+)", text)]


@pytest.mark.slow
def test_overflow_skips_steps_and_is_logged(dist1, corpus, tmp_path, capsys):
    state = run_fp16(corpus, tmp_path, 2.0**40)
    out = capsys.readouterr().out
    skipped = [h["skipped"] for h in state.history]
    scales = [h["loss scale"] for h in state.history]
    # fp16 gradients of a loss scaled by 2^40 overflow: the step is skipped and, after the
    # scaler's hysteresis of 2, the scale halves at each further overflow.
    assert skipped[:2] == [1.0, 1.0] and state.skipped_iterations == sum(skipped)
    assert scales[0] == 2.0**40 and scales[1] == 2.0**39 and all(b <= a for a, b in zip(scales, scales[1:]))
    assert log_fields(out, "number of skipped iterations") == [sum(skipped[:3]), sum(skipped[3:])]
    assert log_fields(out, "loss scale") == pytest.approx([scales[2], scales[5]], rel=1e-6)  # printed to 7 digits
    board = tensorboard_scalars(tmp_path / "tb", "train/number of skipped iterations")
    assert board == {3: sum(skipped[:3]), 6: sum(skipped[3:])}
    assert tensorboard_scalars(tmp_path / "tb", "train/loss scale") == {3: scales[2], 6: scales[5]}


@pytest.mark.slow
def test_fp16_trains_without_overflow(dist1, corpus, tmp_path, capsys):
    state = run_fp16(corpus, tmp_path, 2.0**10, iters=12)
    out = capsys.readouterr().out
    assert state.skipped_iterations == 0 and all(h["loss scale"] == 2.0**10 for h in state.history)
    assert log_fields(out, "number of skipped iterations") == [0, 0, 0, 0]
    assert state.history[-1]["lm loss"] < 0.8 * state.history[0]["lm loss"]
    assert next(state.model.module.parameters()).dtype.is_floating_point
    assert state.model.module.config.fp16


def test_no_loss_scale_fields_without_fp16():
    from megatron.early_exit.training.trainer import loss_scale_metrics

    assert loss_scale_metrics(None, True, False) == {}
