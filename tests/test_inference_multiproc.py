"""Inference under tensor parallelism: one torchrun launch (2 processes, gloo) runs every
case of tests/multiproc/cases_inference.py, each comparing TP=2 with TP=1."""

import pytest

from tests.conftest import case_names, launch

LAUNCHES = [("tests.multiproc.cases_inference", 2)]

PARAMS = [(module, nproc, case) for module, nproc in LAUNCHES for case in case_names(module)]


@pytest.mark.multiproc
@pytest.mark.parametrize("module,nproc,case", PARAMS, ids=[f"np{n}-{c}" for _, n, c in PARAMS])
def test_case(module, nproc, case, launch_dir):
    results = launch(module, nproc, launch_dir)
    assert case in results, f"{case} did not run"
    assert results[case]["ok"], results[case]["error"]
