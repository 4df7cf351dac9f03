"""The grid benchmark's sample: every (budget, method) cell measured, no task twice (else its extrapolated total
would rest on a cell it never ran)."""
import collections
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import repair_grid  # noqa: E402


@pytest.mark.parametrize("k", [9, 10, 18, 27, 40, 100, 404, 405, 1000])
def test_grid_sample_covers_every_cell_once(k):
    tasks = repair_grid.grid()
    assert len(tasks) == 405 and len(set(tasks)) == 405
    chosen = repair_grid.spread(tasks, k)
    assert len(chosen) == min(k, 405) and len(set(chosen)) == len(chosen)
    per_cell = collections.Counter((t[2], t[3]) for t in chosen)
    assert len(per_cell) == 9 and max(per_cell.values()) - min(per_cell.values()) <= 1
    if k >= 27:  # the cells sample several settings, not one
        for cell in per_cell:
            assert len({t[0] for t in chosen if (t[2], t[3]) == cell}) >= 3
