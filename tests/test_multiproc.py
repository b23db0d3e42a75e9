"""Multi-process integration runs, listed declaratively: (case module, processes).

Each module's `case_*` functions run in one torchrun launch (gloo, CPU); every
case compares a parallel layout with a single-process reference.
"""

import pytest

from tests.conftest import case_names, launch

LAUNCHES = [
    ("tests.multiproc.cases_foundation", 2),
    ("tests.multiproc.cases_model", 2),
    ("tests.multiproc.cases_pipeline", 4),
    ("tests.multiproc.cases_inference", 2),
    ("tests.multiproc.cases_engine", 2),
    ("tests.multiproc.cases_inference_pipeline", 2),
    ("tests.multiproc.cases_te_layout", 2),
]

PARAMS = [(module, nproc, case) for module, nproc in LAUNCHES for case in case_names(module)]


@pytest.mark.multiproc
@pytest.mark.parametrize("module,nproc,case", PARAMS, ids=[f"{m.rsplit('.', 1)[-1]}-np{n}-{c}" for m, n, c in PARAMS])
def test_case(module, nproc, case, launch_dir):
    results = launch(module, nproc, launch_dir)
    assert case in results, f"{case} did not run"
    assert results[case]["ok"], results[case]["error"]
