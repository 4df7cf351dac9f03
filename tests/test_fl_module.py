"""The FL LightningModule (lightning_modules/fl.py): the Trainer's test loop gives the scores of
``vitfl.localization.ranking.localize`` and of independent references, only W_bef / W_aft take gradients, a 2-process
CPU DDP run gives the scores of one process, and the shard sampler covers every row once."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import D, retry_spawn_teardown_abort, tiny_hf_vit, tiny_timm_vit
from vitfl.lightning_modules.fl import ContiguousShardSampler, FLModule
from vitfl.localization.ffn import last_ffn_head

N = 37


def inputs(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, D, generator=g)
    label = torch.randint(0, 10, (n,), generator=g)
    is_neg = torch.zeros(n, dtype=torch.bool)
    is_neg[torch.randperm(n, generator=g)[: n // 3]] = True
    return x, label, is_neg


def trainer(**kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "inference_mode": False, "use_distributed_sampler": False,
                        "logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kw})


def run_module(head, method, x, label, is_neg, batch_size=6, callbacks=(), **kw):
    module = FLModule(head, method, x, label, is_neg, batch_size=batch_size)
    trainer(callbacks=list(callbacks), **kw).test(module, verbose=False)
    return module


def reference(head, method, x, label, is_neg):
    """Independent of the localizers: GL = |sum over I_neg of dL/dW| by one autograd call on the whole set; vdiff
    from torch.cov of the post-GELU activations."""
    head = head.copy().double()
    x = x.double()
    if method == "grad_loss":
        w_bef, w_aft = head.fc_bef.weight, head.fc_aft.weight
        loss = F.cross_entropy(head(x[is_neg]), label[is_neg], reduction="sum")
        g_bef, g_aft = torch.autograd.grad(loss, [w_bef, w_aft])
        return torch.cat([g_bef.abs().reshape(-1), g_aft.abs().reshape(-1)])
    with torch.no_grad():
        a = head.activation(x)
    v = {s: torch.cov(a[m].T).abs().sum(1) for s, m in (("pos", ~is_neg), ("neg", is_neg))}
    diff = (v["pos"] - v["neg"]).abs()
    return (diff - diff.min()) / (diff.max() - diff.min())


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    got, want = got.double(), want.double()
    return got.shape == want.shape and float((got - want).abs().max()) <= rtol * float(want.abs().max())


HEADS = {"hf": lambda: last_ffn_head(tiny_hf_vit(seed=31)),
         "timm_ls": lambda: last_ffn_head(tiny_timm_vit(seed=32, init_values=0.1))}


@pytest.mark.parametrize("head_name", list(HEADS))
@pytest.mark.parametrize("method", ["grad_loss", "vdiff"])
def test_module_matches_localize_and_reference(head_name, method):
    from vitfl.localization.ranking import localize

    head = HEADS[head_name]()
    x, label, is_neg = inputs(seed=1)
    want_ref = reference(head, method, x, label, is_neg)
    want_loc = localize(head.copy(), x, label, is_neg, method, budget=1, batch_size=256).scores
    got = run_module(head, method, x, label, is_neg, batch_size=6).scores
    n_scores = head.index.total if method == "grad_loss" else head.d_ff
    assert got is not None and got.shape == (n_scores,)
    assert torch.isfinite(got).all() and float(got.abs().max()) > 0
    assert close(got, want_loc)
    assert close(got, want_ref, rtol=1e-4)


def test_module_scores_depend_on_inputs():
    head = HEADS["hf"]()
    x, label, is_neg = inputs(seed=1)
    a = run_module(head, "grad_loss", x, label, is_neg).scores
    b = run_module(head, "grad_loss", x, label, ~is_neg).scores
    assert not close(a, b, rtol=1e-3)


class GradAudit(L.Callback):
    """Records which parameters require grad at every test batch, and every parameter that got a .grad."""

    def __init__(self):
        self.seen: list[set[str]] = []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append({n for n, p in pl_module.named_parameters() if p.requires_grad})

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen.append({n for n, p in pl_module.named_parameters() if p.requires_grad})


def test_only_ffn_weights_require_grad():
    head = HEADS["timm_ls"]()
    x, label, is_neg = inputs(seed=2)
    audit = GradAudit()
    module = run_module(head, "grad_loss", x, label, is_neg, batch_size=10, callbacks=[audit])
    assert len(audit.seen) == 2 * 4  # 37 rows in batches of 10
    assert all(s == {"head.fc_bef.weight", "head.fc_aft.weight"} for s in audit.seen)
    for name, p in module.named_parameters():
        if name not in ("head.fc_bef.weight", "head.fc_aft.weight"):
            assert p.grad is None, name


def test_module_rejects_bad_shapes():
    head = HEADS["hf"]()
    x, label, is_neg = inputs()
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        FLModule(head, "grad_loss", x[:, :5], label, is_neg)
    with pytest.raises(ValueError, match="same number of rows"):
        FLModule(head, "grad_loss", x, label[:-1], is_neg)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 37])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_contiguous_shard_sampler_covers_each_row_once(n, world):
    shards = [list(ContiguousShardSampler(n, r, world)) for r in range(world)]
    assert sum(shards, []) == list(range(n))
    assert [len(ContiguousShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ------------------------------------------------------------------------------------ 2-process CPU DDP
class SaveScores(L.Callback):
    """Rank 0 writes the module's scores (the spawned processes' results do not come back otherwise)."""

    def __init__(self, path: str):
        self.path = path

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({"scores": pl_module.scores, "rows": len(trainer.test_dataloaders.sampler)}, self.path)


@pytest.mark.slow  # ~15-35 s: two spawned processes import torch, lightning and transformers
@pytest.mark.parametrize("method", ["vdiff", "grad_loss"])
def test_ddp_spawn_matches_single_process(tmp_path, method):
    head = HEADS["hf"]()
    x, label, is_neg = inputs(seed=3)
    single = run_module(head.copy(), method, x, label, is_neg, batch_size=5).scores
    out = tmp_path / "scores.pt"
    retry_spawn_teardown_abort(lambda: run_module(head.copy(), method, x, label, is_neg, batch_size=5,
                                                  callbacks=[SaveScores(str(out))], strategy="ddp_spawn", devices=2))
    got = torch.load(out, weights_only=False)
    assert got["rows"] == N // 2  # rank 0 saw its share only
    assert close(got["scores"], single, rtol=1e-5)


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_input_free_methods(method):
    from vitfl.localization.ranking import localize

    head = HEADS["hf"]()
    x, label, is_neg = inputs(seed=4)
    got = run_module(head, method, x, label, is_neg).scores
    want = localize(head.copy(), None, None, None, method, budget=1, seed=0).scores
    assert torch.equal(got, want)
