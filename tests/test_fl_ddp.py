"""Two CPU processes (gloo), each seeing half the inputs, give the same scores as one process seeing all:
every sum over inputs is a torchmetrics state with dist_reduce_fx="sum", synced in compute()."""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead

METHODS = ("grad_loss", "vdiff", "forward_impact", "ours", "ig", "tarantula", "bl")


def make_head(d=4, d_ff=12, c=5):
    torch.manual_seed(0)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf")


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g)
    return x, torch.randint(0, 5, (20,), generator=g), torch.arange(20) % 3 == 0


def _worker(rank, world, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        head = make_head()
        x, y, neg = make_data()
        rows = torch.arange(rank, 20, world)  # this process's half
        out = {}
        for name in METHODS:
            loc = get_localizer(name)(head)
            for s in range(0, rows.numel(), 4):
                r = rows[s:s + 4]
                loc.update(x[r], y[r], neg[r])
            out[name] = loc.compute()
            if name == "bl":
                out["bl_front"] = loc.own_selection()
        if rank == 0:
            torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    out_path = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out_path)), nprocs=2, join=True)
    got = torch.load(out_path)
    head = make_head()
    x, y, neg = make_data()
    for name in METHODS:
        loc = get_localizer(name)(head)
        loc.update(x, y, neg)
        torch.testing.assert_close(got[name], loc.compute(), rtol=1e-5, atol=1e-7, msg=name)
        if name == "bl":
            assert sorted(got["bl_front"].tolist()) == sorted(loc.own_selection().tolist())
