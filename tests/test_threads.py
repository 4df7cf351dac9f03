"""OpenMP's wait policy (core/threads.py): the defaults a process and its workers get, a user's choice kept, and
results that do not depend on it. No timing assertions (benchmarks/contention.py measures the time)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitfl.core import threads as ct

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_wait_vars(monkeypatch):
    for k in ct.WAIT_VARIABLES:
        monkeypatch.delenv(k, raising=False)


def test_defaults_unless_the_user_chose_a_wait_policy():
    defaults = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
    assert ct.OPENMP_DEFAULTS == defaults
    assert ct.openmp_defaults({}) == defaults
    assert ct.openmp_defaults({"OMP_WAIT_POLICY": " "}) == defaults                # blank: not a choice
    for k, v in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "10000"), ("KMP_BLOCKTIME", "200"),
                 ("KMP_LIBRARY", "turnaround")):
        assert ct.openmp_defaults({k: v}) == {}
    env = {"PATH": "/bin"}
    assert ct.configure_openmp(env) == defaults
    assert env == {"PATH": "/bin", **defaults}
    assert ct.configure_openmp(env) == {}                                    # set now: nothing more to add
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert ct.configure_openmp(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_openmp_env_is_restored(no_wait_vars, monkeypatch):
    with ct.openmp_env() as added:
        assert added == ct.OPENMP_DEFAULTS
        assert all(os.environ[k] == v for k, v in ct.OPENMP_DEFAULTS.items())
    assert not any(k in os.environ for k in ct.WAIT_VARIABLES)
    with pytest.raises(RuntimeError):
        with ct.openmp_env():
            raise RuntimeError("boom")
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")                         # the user's choice stays
    with ct.openmp_env() as added:
        assert added == {} and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_runtime_is_seen_once_torch_is_loaded():
    import torch

    torch.ones(4).sum()
    assert ct.openmp_runtime_loaded() == (Path("/proc/self/maps").is_file() or "torch" in sys.modules)


def wait_policy_of_worker(shard) -> list:
    """A sharded task: this worker's OpenMP wait variables (what its runtime read when torch was imported)."""
    import torch

    return [({k: os.environ[k] for k in ct.WAIT_VARIABLES if k in os.environ}, torch.get_num_threads(), list(shard))]


def test_workers_start_with_the_passive_policy(no_wait_vars):
    from vitfl.pipeline.parallel import run_sharded

    rows = run_sharded(wait_policy_of_worker, {}, workers=2, threads=1)
    assert rows == [(ct.OPENMP_DEFAULTS, 1, [0, 2]), (ct.OPENMP_DEFAULTS, 1, [1, 2])]
    assert not any(k in os.environ for k in ct.WAIT_VARIABLES)              # the parent's environment is unchanged


FITNESS_RUN = """
import hashlib, sys
sys.path.insert(0, {repo!r})
import torch
from torch import nn
from vitfl.lightning_modules.repair.fitness import make_fitness
from vitfl.localization.ffn import FFNHead

torch.set_num_threads(2)
torch.manual_seed(0)
d, d_ff, C, N, K, P = 64, 256, 10, 600, 300, 100
head = FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
               nn.Sequential(nn.LayerNorm(d), nn.Linear(d, C)), "hf").eval()
g = torch.Generator().manual_seed(1)
x = torch.randn(N, d, generator=g)
with torch.no_grad():
    label = head(x).argmax(1)
label[:100] = (label[:100] + 1) % C
is_neg = torch.arange(N) < 100
w = head.index.to_triples(torch.randperm(head.index.total, generator=g)[:K])
digest, chunks = hashlib.sha256(), []
for kernel in ("folded", "explicit"):
    fit = make_fitness("sparse", head, w, x, label, is_neg, kernel=kernel)
    pop = fit.old + 0.05 * torch.randn(P, K, generator=g)
    res = fit(pop)
    chunks.append(fit.chunk_size)
    for t in (res.fitness, res.n_patched, res.n_broken):
        digest.update(t.numpy().tobytes())
print(torch.get_num_threads(), max(chunks), digest.hexdigest())
"""


def test_the_wait_policy_changes_no_result(no_wait_vars):
    """Before / after: the DE's fitness of a population (2 threads, testbed-like shapes, several chunks, both
    kernels) is the same bit for bit whether the OpenMP threads spin (the runtime's default) or sleep (the
    toolkit's default)."""
    code = FITNESS_RUN.format(repo=str(REPO))
    procs = {policy: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, **(ct.OPENMP_DEFAULTS if policy else {})})
             for policy in ("toolkit", None)}
    out = {k: p.communicate(timeout=300) for k, p in procs.items()}
    for k, (_, err) in out.items():
        assert procs[k].returncode == 0, err[-3000:]
    threads, chunk, _ = out[None][0].split()
    assert threads == "2" and int(chunk) < 100                # several chunks per evaluation with either kernel
    assert out[None][0] == out["toolkit"][0]
