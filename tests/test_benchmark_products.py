"""The repair benchmark's ``prod s`` column: the profiler's matrix-product time of a DE run is found (the op names
in ``PRODUCT_OPS`` are the ones torch records) and is part of the run, not all of it."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import repair_speed  # noqa: E402

from vitfl.lightning_modules.repair.fitness import SparseFitness  # noqa: E402


def test_product_seconds_counts_the_products_of_a_run():
    head = repair_speed.make_head(32, 128, 10)
    x, label, is_neg = repair_speed.make_states(head, 20, 60)
    w = repair_speed.located(head, 40, "random")
    fit = SparseFitness(head, w, x, label, is_neg)
    de = repair_speed.de_for(head, w, fit, "deferred", generations=4)
    de.initialize()
    prod, total = repair_speed.product_seconds(de, 3, "cpu")
    assert 0.0 < prod < total
    # a finished search does not step: nothing to profile
    while not de.done:
        de.step()
    prod_done, _ = repair_speed.product_seconds(de, 2, "cpu")
    assert prod_done == 0.0
    assert torch.isfinite(de.fit).all()
