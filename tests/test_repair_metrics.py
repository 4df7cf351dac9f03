"""Repair metrics (lightning_modules/repair/metrics.py): RR / BR / accuracy by hand and against a numpy reference,
a 2-process gloo run equals one process, and evaluate_patch on cached states."""
import doctest
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vitfl.lightning_modules.repair.metrics as metrics_module
from vitfl.lightning_modules.repair.metrics import (BreakRate, RepairAccuracy, RepairRate, break_rate, evaluate_patch,
                                              repair_rate)
from vitfl.lightning_modules.repair.patch import Patch
from vitfl.localization.ffn import FFNHead


pytestmark = pytest.mark.usefixtures("one_thread")


def test_doctests():
    r = doctest.testmod(metrics_module)
    assert r.attempted > 0 and r.failed == 0


def test_by_hand():
    label = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    before = torch.tensor([0, 1, 2, 3, 9, 9, 9, 7])  # correct: 0,1,2,3,7 (5); wrong: 4,5,6
    after = torch.tensor([0, 9, 2, 9, 4, 9, 6, 7])   # broken: 1,3 ; fixed: 4,6
    target = torch.tensor([False, False, False, False, True, True, False, False])  # the setting's: 4, 5
    assert float(repair_rate(before, after, label, target)) == 0.5  # 4 fixed, 5 not
    assert float(repair_rate(before, after, label)) == pytest.approx(2 / 3)  # all misclassifications
    assert float(break_rate(before, after, label)) == pytest.approx(2 / 5)
    acc = RepairAccuracy()
    acc.update(before, after, label)
    out = acc.compute()
    assert float(out["acc_before"]) == 5 / 8 and float(out["acc_after"]) == 5 / 8 and float(out["delta_acc"]) == 0
    # logits are accepted as predictions
    onehot = torch.nn.functional.one_hot(after, 10).float()
    assert float(repair_rate(before, onehot, label, target)) == 0.5


def test_empty_denominators_give_nan_and_bad_target_raises():
    y = torch.tensor([0, 1])
    assert np.isnan(float(repair_rate(y, y, y)))
    assert np.isnan(float(break_rate(torch.tensor([1, 0]), y, y)))
    with pytest.raises(ValueError, match="before repair"):
        repair_rate(y, y, y, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="differ in length"):
        repair_rate(y, y[:1], y)


def random_preds(n, seed, classes=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    before = torch.where(torch.rand(n, generator=g) < 0.6, y, torch.randint(0, classes, (n,), generator=g))
    after = torch.where(torch.rand(n, generator=g) < 0.6, y, torch.randint(0, classes, (n,), generator=g))
    target = (before != y) & (y == 1)
    return before, after, y, target


def test_metric_classes_match_numpy_reference_over_batches():
    b, a, y, t = random_preds(500, 0)
    rr, br, acc = RepairRate(), BreakRate(), RepairAccuracy()
    for sl in (slice(0, 123), slice(123, 400), slice(400, 500)):
        for m in (rr, br, acc):
            m.update(b[sl], a[sl], y[sl], t[sl])
    b, a, y, t = (v.numpy() for v in (b, a, y, t))
    assert float(rr.compute()) == pytest.approx(np.sum(t & (a == y)) / np.sum(t))
    assert float(br.compute()) == pytest.approx(np.sum((b == y) & (a != y)) / np.sum(b == y))
    out = acc.compute()
    assert float(out["delta_acc"]) == pytest.approx(np.mean(a == y) - np.mean(b == y))


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b, a, y, t = random_preds(301, 0)
        rr, br, acc = RepairRate(), BreakRate(), RepairAccuracy()
        for m in (rr, br, acc):
            m.update(b[rank::world], a[rank::world], y[rank::world], t[rank::world])
        res = {"rr": rr.compute(), "br": br.compute(), **acc.compute()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    b, a, y, t = random_preds(301, 0)
    rr, br, acc = RepairRate(), BreakRate(), RepairAccuracy()
    for m in (rr, br, acc):
        m.update(b, a, y, t)
    single = {"rr": rr.compute(), "br": br.compute(), **acc.compute()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in single.items():
            assert float(got[k]) == pytest.approx(float(v), abs=1e-12), (rank, k)
    # each rank alone would differ: the synchronisation happened
    half = RepairRate()
    half.update(b[0::2], a[0::2], y[0::2], t[0::2])
    assert float(half.compute()) != pytest.approx(float(single["rr"]))


def test_evaluate_patch_on_cached_states():
    torch.manual_seed(0)
    d, C = 6, 4
    head = FFNHead(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, C)), "hf").eval()
    x = torch.randn(200, d)
    with torch.no_grad():
        pred0 = head(x).argmax(1)
    y = torch.where(torch.rand(200) < 0.7, pred0, torch.randint(0, C, (200,)))
    w = torch.tensor([[0, 1, 1], [1, 2, 3], [1, 0, 5]])
    patch = Patch.from_values(head, w, torch.tensor([3.0, -4.0, 5.0]))
    with torch.no_grad():
        with patch.applied(head):
            pred1 = head(x).argmax(1)
    target_fn = lambda lab, pred: (lab == 2) & (pred != 2)  # noqa: E731  (a tgt_fn-like setting)
    out = evaluate_patch(head, patch, x, y, target_fn, batch_size=64)
    t = (y == 2) & (pred0 != 2)
    assert out["n_targets"] == int(t.sum()) and out["n_fixed"] == int((t & (pred1 == y)).sum())
    assert out["br"] == pytest.approx(float(((pred0 == y) & (pred1 != y)).sum() / (pred0 == y).sum()))
    assert out["delta_acc"] == pytest.approx(float((pred1 == y).float().mean() - (pred0 == y).float().mean()))
    assert out["n"] == 200 and out["n_broken"] > 0  # the patch does something
    torch.testing.assert_close(head.fc_aft.weight[2, 3], patch.old[1].float())  # reverted
