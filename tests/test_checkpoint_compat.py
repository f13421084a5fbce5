"""Checkpoints written by the code before issue 13 (the training-step and parallel-layout
refactor) still resume bitwise: tests/fixtures/v1/ holds run directories saved at step 2 by commit
b53dbcd, and the metrics an uninterrupted run of that code had at steps 3 and 4.

Each layout's dataset and run directory are copied elsewhere (the checkpoint's config.yaml and
data.yaml still name the paths they were written at) and resumed by today's CLI in new processes
with the overrides recorded in its expected.json. Regenerate the fixture only with the old code:
see tests/fixtures/make_v1_checkpoint.py.
"""

import json
from pathlib import Path

import pytest

from tests.fixtures.make_v1_checkpoint import LAYOUTS, resume_copy

FIXTURE = Path(__file__).parent / "fixtures" / "v1"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_v1_checkpoint_resumes_bitwise(tmp_path, layout):
    expected = json.loads((FIXTURE / layout / "expected.json").read_text())
    got = resume_copy(FIXTURE / "data", FIXTURE / layout / "run", expected["overrides"], tmp_path,
                      nproc=expected["nproc"])
    want = expected["records"]
    # Only the keys the old code wrote count: a metric added since is not a difference.
    got = [{k: r.get(k) for k in w} for r, w in zip(got, want)] + got[len(want):]
    # Bitwise on the machine that wrote it; another CPU's kernels (seen: the same AVX512 level,
    # another Xeon) may round a reduction differently, moving a gradient norm by one ulp (8e-8).
    # A wrong RNG, data position or optimizer state moves them by 1e-3 or more.
    close = [{k: pytest.approx(v, rel=1e-6, abs=0) if isinstance(v, float) else v
              for k, v in w.items()} for w in want]
    assert got == close, (f"steps 3-4 after resuming the v1 checkpoint differ from the run that "
                          f"wrote it:\n got  {got}\n want {want}\n(written by "
                          f"{expected['generated_by']}; other library versions can change bits)")
