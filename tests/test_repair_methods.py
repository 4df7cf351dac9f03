"""Masked fine-tuning, prune and reinit (lightning_modules/repair/finetune.py, prune.py): only the located weights
move, the module's head is restored, results are seeded, the repair helps on a toy problem, the tuned defaults
(fitness-weighted loss, keep-best, fitness-chosen prefix) match brute-force references and beat the old ones."""
import pytest
import torch
from torch import nn

from vitfl.lightning_modules.repair import get_repair
from vitfl.lightning_modules.repair.base import fit_repair
from vitfl.lightning_modules.repair.de import matrix_init_stats
from vitfl.lightning_modules.repair.patch import RepairInputError
from vitfl.localization.ffn import FFNHead

D, C = 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def head(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = FFNHead(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D), None,
                nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C)), "hf")
    with torch.no_grad():
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return h.eval()


# a whole neuron (row 3 of W_bef, column 3 of W_aft) plus a few more
WEIGHTS = torch.cat([torch.tensor([[0, 3, c] for c in range(D)] + [[1, r, 3] for r in range(D)]),
                     torch.tensor([[0, 10, 1], [1, 2, 20]])])


def states(h, n=60, n_neg=15, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    with torch.no_grad():
        y = h(x).argmax(1)
    y[:n_neg] = (y[:n_neg] + 1) % C
    return x[:n_neg], y[:n_neg], x[n_neg:], y[n_neg:]


def changed(h, patch):
    before = {k: v.clone() for k, v in h.state_dict().items()}
    hp = patch.apply(h.copy())
    out = set()
    for k, v in hp.state_dict().items():
        for d in (v != before[k]).nonzero().tolist():
            out.add((k, *d))
    return out


def located_keys():
    return {("fc_bef.weight" if m == 0 else "fc_aft.weight", r, c) for m, r, c in WEIGHTS.tolist()}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_finetune_moves_only_located_weights_and_reduces_the_loss(optimizer):
    h = head()
    before = {k: v.clone() for k, v in h.state_dict().items()}
    m = get_repair("finetune")(h, WEIGHTS, *states(h), lr=0.05, epochs=15, batch_size=16, optimizer=optimizer,
                               loss_weighting="mean", keep_best=False)
    patch = fit_repair(m, enable_progress_bar=False)
    diff = changed(h, patch)
    assert diff and diff <= located_keys()
    assert all(torch.equal(v, h.state_dict()[k]) for k, v in before.items())  # caller's head untouched
    assert all(torch.equal(v, m.head.state_dict()[k]) for k, v in before.items())  # module's head restored
    s = m.summary()
    assert s["loss_last"] < s["loss_first"]
    if optimizer == "adam":
        assert s["n_patched"] > 0 and s["fitness_patched"] > s["fitness_original"]
    assert s["steps"] == m.max_steps == 15 * 4  # ceil(60 / 16) batches per epoch
    # seeded: the same run gives the same patch
    m2 = get_repair("finetune")(h, WEIGHTS, *states(h), lr=0.05, epochs=15, batch_size=16, optimizer=optimizer,
                                loss_weighting="mean", keep_best=False)
    assert fit_repair(m2, enable_progress_bar=False) == patch


def test_finetune_detects_a_broken_mask():
    h = head()
    m = get_repair("finetune")(h, WEIGHTS, *states(h), lr=0.05, epochs=1, batch_size=64)
    m.mask_bef[0, 0] = True  # a weight outside the located ones gets gradients: the check must catch it
    with pytest.raises(RuntimeError, match="outside the located"):
        fit_repair(m, enable_progress_bar=False)


def test_prune_and_reinit():
    h = head()
    m = get_repair("prune")(h, WEIGHTS, *states(h), select="all")
    p = fit_repair(m, enable_progress_bar=False)
    assert torch.equal(p.new, torch.zeros(len(WEIGHTS), dtype=torch.float64))
    assert changed(h, p) <= located_keys()
    r1 = fit_repair(get_repair("reinit")(h, WEIGHTS, *states(h), seed=3, select="all"), enable_progress_bar=False)
    r2 = fit_repair(get_repair("reinit")(h, WEIGHTS, *states(h), seed=3, select="all"), enable_progress_bar=False)
    r3 = fit_repair(get_repair("reinit")(h, WEIGHTS, *states(h), seed=4, select="all"), enable_progress_bar=False)
    assert r1 == r2 and not torch.equal(r1.new, r3.new)
    assert changed(h, r1) == located_keys()
    # values drawn from N(mean, std) of their matrix: check the scale with many draws
    many = get_repair("reinit")(h, torch.tensor([[1, r, c] for r in range(D) for c in range(4 * D)]), *states(h),
                                select="all")
    vals = fit_repair(many, enable_progress_bar=False).new
    mean, std = matrix_init_stats(h.fc_aft.weight.detach())
    assert abs(float(vals.mean()) - mean) < 0.2 * std and abs(float(vals.std()) / std - 1) < 0.2


def test_bad_options():
    h = head()
    with pytest.raises(RepairInputError, match="optimizer"):
        get_repair("finetune")(h, WEIGHTS, *states(h), optimizer="lbfgs")
    with pytest.raises(RepairInputError, match="epochs"):
        get_repair("finetune")(h, WEIGHTS, *states(h), epochs=0)
    with pytest.raises(RuntimeError, match="not run yet"):
        get_repair("prune")(h, WEIGHTS, *states(h)).patch()
    with pytest.raises(RepairInputError, match="loss_weighting"):
        get_repair("finetune")(h, WEIGHTS, *states(h), loss_weighting="sum")
    with pytest.raises(RepairInputError, match="select"):
        get_repair("prune")(h, WEIGHTS, *states(h), select="greedy")


# ------------------------------------------------------------------------------------------- tuned defaults
def _fitness_ref(h, weights, values, x, y, is_neg, alpha=10.0):
    """Arachne's fitness written out: sum over I_pos of (1 if correct else 1/(CE+1)) + alpha * the same on I_neg."""
    from vitfl.lightning_modules.repair.patch import write_values

    hh = h.copy().double()
    write_values(hh, weights, values.double())
    with torch.no_grad():
        z = hh(x.double())
    total = 0.0
    for i in range(len(x)):
        if int(z[i].argmax()) == int(y[i]):
            s = 1.0
        else:
            s = 1.0 / (float(torch.logsumexp(z[i], 0) - z[i, y[i]]) + 1.0)
        total += alpha * s if bool(is_neg[i]) else s
    return total


def _toy(seed=0):
    h = head(seed)
    xn, yn, xp, yp = states(h, seed=seed + 1)
    x, y = torch.cat([xn, xp]), torch.cat([yn, yp])
    is_neg = torch.arange(len(x)) < len(xn)
    return h, (xn, yn, xp, yp), x, y, is_neg


@pytest.mark.parametrize("variant", ["arachne", "reptran"])
def test_finetune_loss_weights_inputs_as_the_fitness(variant):
    from vitfl.lightning_modules.repair.finetune import fitness_weights

    h, st, x, y, is_neg = _toy()
    m = get_repair("finetune")(h, WEIGHTS, *st, fitness=variant, alpha=10.0)
    w = fitness_weights(is_neg, 10.0, variant)
    n_neg, n_pos = int(is_neg.sum()), int((~is_neg).sum())
    for i in range(len(x)):  # brute force, from the fitness formula
        if variant == "arachne":
            ref = 10.0 if is_neg[i] else 1.0
        else:
            ref = 10.0 / 11.0 / n_neg if is_neg[i] else 1.0 / 11.0 / n_pos
        assert float(w[i]) == pytest.approx(ref, rel=1e-12)
    torch.testing.assert_close(m.input_weight, w)
    # the training loss of one full batch equals the weighted mean written out
    xb, yb, wb = next(iter(m.train_dataloader()))
    m.log = lambda *a, **k: None  # no Trainer to log to
    with torch.no_grad():
        loss = float(m.training_step((xb, yb, wb), 0))
        z = m.head(xb).double()
    ref = sum(float(wb[i]) * float(torch.logsumexp(z[i], 0) - z[i, yb[i]]) for i in range(len(xb))) / float(wb.sum())
    assert loss == pytest.approx(ref, rel=1e-5)
    assert len(xb) == len(x)  # full batch by default


def test_finetune_keep_best_never_loses_fitness_and_tuned_beats_old_defaults():
    h, st, x, y, is_neg = _toy(seed=2)
    old = get_repair("finetune")(h, WEIGHTS, *st, lr=1e-3, epochs=20, batch_size=64, loss_weighting="mean",
                                 keep_best=False)
    fit_repair(old, enable_progress_bar=False)
    new = get_repair("finetune")(h, WEIGHTS, *st)
    patch = fit_repair(new, enable_progress_bar=False)
    so, sn = old.summary(), new.summary()
    f_ref = _fitness_ref(h, WEIGHTS, patch.new, x, y, is_neg)
    assert sn["fitness_patched"] == pytest.approx(f_ref, rel=1e-5)
    assert sn["fitness_patched"] > sn["fitness_original"]
    assert sn["fitness_patched"] > so["fitness_patched"] and sn["n_patched"] >= so["n_patched"]
    assert sn["best_epoch"] >= 1
    # a diverging step size: keep_best falls back on the best epoch seen, at worst the original values
    wild = get_repair("finetune")(h, WEIGHTS, *st, lr=1e3, epochs=5, optimizer="sgd", momentum=0.0)
    fit_repair(wild, enable_progress_bar=False)
    sw = wild.summary()
    assert sw["fitness_patched"] >= sw["fitness_original"] - 1e-9


def _prefix_ref(h, weights, old, new, x, y, is_neg):
    """The prefix selection by brute force: per-weight gains by a loop, stable sort, every prefix by a loop."""
    k = len(old)
    f0 = _fitness_ref(h, weights, old, x, y, is_neg)
    gains = []
    for i in range(k):
        v = old.clone()
        v[i] = new[i]
        gains.append(_fitness_ref(h, weights, v, x, y, is_neg) - f0)
    order = sorted(range(k), key=lambda i: (-gains[i], i))
    best, best_v = None, None
    for m in range(1, k + 1):
        v = old.clone()
        for i in order[:m]:
            v[i] = new[i]
        f = _fitness_ref(h, weights, v, x, y, is_neg)
        if best is None or f > best + 1e-9:
            best, best_v = f, v
    return best, best_v


@pytest.mark.parametrize("method", ["prune", "reinit"])
def test_prefix_selection_matches_brute_force_and_beats_replacing_all(method):
    h, st, x, y, is_neg = _toy(seed=3)
    allm = get_repair(method)(h, WEIGHTS, *st, seed=5, select="all")
    p_all = fit_repair(allm, enable_progress_bar=False)
    m = get_repair(method)(h, WEIGHTS, *st, seed=5)
    p = fit_repair(m, enable_progress_bar=False)
    f_best, v_best = _prefix_ref(h, WEIGHTS, p.old.double(), p_all.new.double(), x, y, is_neg)
    torch.testing.assert_close(p.new.double(), v_best, rtol=0, atol=1e-12)
    s = m.summary()
    assert s["fitness_patched"] == pytest.approx(f_best, rel=1e-5)
    assert s["fitness_patched"] >= allm.summary()["fitness_patched"]
    assert 1 <= s["n_replaced"] <= len(WEIGHTS) and changed(h, p) <= located_keys()
    # only replacement values of the 'all' patch are used: every weight is either old or the replacement
    assert bool(((p.new == p.old) | (p.new == p_all.new)).all())
