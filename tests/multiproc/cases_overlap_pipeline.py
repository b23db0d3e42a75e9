"""Overlapped communication under PP=2 x DP=2 (4 processes), exits on both stages tied
to the word embedding (stage 1 keeps a copy)."""

from tests.multiproc.cases_overlap import _compare

PP2 = {
    "--num-layers": 8,
    "--exit-layer-nums": "2 5 7",
    "--exit-layer-weight": "0.3 0.3 0.3",
    "--pipeline-model-parallel-size": 2,
}


def case_pp2_dp2():
    return _compare(PP2)
