"""What a training run prints: one log line per --log-interval in one number format (the
learning rate in scientific notation throughout its decay), with an estimate of the time
left; the per-rank timer block only at --timing-log-level 1 or more (Megatron-LM's rule)."""

import contextlib
import io
import re

import pytest

from tests.training_fixtures import tiny_run_flags


def test_learning_rate_keeps_one_notation_and_time_left_reads_as_a_duration():
    from megatron.early_exit.training.logger import _fmt, time_left

    rates = [_fmt(v, "learning rate") for v in (2e-3, 1e-3, 9.99e-4, 2e-4)]
    assert rates == ["2.000000E-03", "1.000000E-03", "9.990000E-04", "2.000000E-04"]
    assert [time_left(0.5, n) for n in (0, 10, 300, 9000)] == ["0s", "5s", "2m 30s", "1h 15m"]


@pytest.fixture(scope="module")
def training_output(dist1, corpus):
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(
            parse_run_config(
                tiny_run_flags(
                    corpus, iters=6, **{"--log-interval": 2, "--eval-interval": 100, "--lr-warmup-iters": 2}
                ),
                world_size=1,
            )
        )
    return out.getvalue()


def test_log_lines_one_format_time_left_and_no_timer_block_at_level_0(training_output):
    lines = [line for line in training_output.splitlines() if line.startswith(" iteration")]
    assert len(lines) == 3  # iterations 2, 4, 6
    rates = [re.search(r"learning rate: (\S+) \|", line).group(1) for line in lines]
    assert all(re.fullmatch(r"\d\.\d{6}E[-+]\d\d", r) for r in rates), rates
    left = [re.search(r"time left: ([^|]+) \|", line).group(1).strip() for line in lines]
    assert left[-1] == "0s" and all(re.fullmatch(r"(\d+h \d\dm|\d+m \d\ds|\d+s)", t) for t in left), left
    assert "time across ranks" not in training_output
