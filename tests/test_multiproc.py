"""Multi-process integration runs, listed declaratively: (case module, processes).

The modules are listed in conftest.GROUPED; those of one size run in one torchrun launch
(gloo, CPU); every case compares a parallel layout with a single-process reference.
"""

import pytest

from tests.conftest import GROUPED, case_names, launch_grouped

LAUNCHES = [(module, nproc) for module, (nproc, test_file, _, _) in GROUPED.items() if test_file == "test_multiproc.py"]

PARAMS = [(module, nproc, case) for module, nproc in LAUNCHES for case in case_names(module)]


@pytest.mark.multiproc
@pytest.mark.parametrize("module,nproc,case", PARAMS, ids=[f"{m.rsplit('.', 1)[-1]}-np{n}-{c}" for m, n, c in PARAMS])
def test_case(module, nproc, case, request):
    results = launch_grouped(module, request)
    assert case in results, f"{case} did not run"
    assert results[case]["ok"], results[case]["error"]
