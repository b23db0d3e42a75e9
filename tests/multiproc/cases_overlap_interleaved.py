"""Overlapped communication with the interleaved pipeline (PP=2 x 2 chunks x DP=2, 4
processes): one DDP per chunk, exits on three chunks tied to the word embedding."""

from tests.multiproc.cases_overlap import _compare
from tests.multiproc.cases_overlap_pipeline import PP2


def case_pp2_v2_dp2():
    return _compare({**PP2, "--num-layers-per-virtual-pipeline-stage": 2})
