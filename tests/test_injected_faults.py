import math

import pytest
import torch
from torch import nn

from vitfl.evaluation.injected_faults import (InjectionError, inject_faults, loss_gradient, run_injected_benchmark,
                                        weight_level_scores)
from vitfl.localization.base import FLResult
from vitfl.localization.ffn import FFNHead


def make_head(d=8, c=4, seed=0, post_ln=True):
    torch.manual_seed(seed)
    post = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)) if post_ln else nn.Linear(d, c)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), None, post, "hf").eval()


def make_data(head, n=500, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, head.d, generator=g)
    with torch.no_grad():
        label = head(x).argmax(-1)
    flip = torch.rand(n, generator=g) < 0.2
    label[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    return x, label


def test_loss_gradient_matches_hand_derivation():
    head = make_head(post_ln=False)
    x, label = make_data(head, n=50)
    g = loss_gradient(head, x, label, batch_size=16)  # several batches
    with torch.no_grad():
        h = head.norm(x)
        zz = head.fc_bef(h)
        a = head.act(zz)
        logits = head(x)
        dlogit = torch.softmax(logits, -1) - torch.nn.functional.one_hot(label, 4).float()  # dCE/dlogits
        du = dlogit @ head.post.weight  # d/d(FFN output) [N, d]
        g_aft = du.T @ a  # [d, 4d]
        # GELU'(z) = Phi(z) + z phi(z)
        phi = torch.exp(-zz ** 2 / 2) / math.sqrt(2 * math.pi)
        Phi = 0.5 * (1 + torch.erf(zz / math.sqrt(2)))
        dz = (du @ head.fc_aft.weight) * (Phi + zz * phi)
        g_bef = dz.T @ h
    torch.testing.assert_close(g, head.index.join(g_bef.abs(), g_aft.abs()), atol=1e-4, rtol=1e-4)


def test_injection_changes_predictions_and_names_exactly_the_perturbed_weights():
    head = make_head()
    x, label = make_data(head, n=3000)
    grad = loss_gradient(head, x, label)
    for seed in range(3):
        f = inject_faults(head, x, label, seed=seed, grad=grad)
        with torch.no_grad():
            before, after = head(x).argmax(-1), f.head(x).argmax(-1)
        changed = before != after
        assert torch.equal(changed, f.changed)
        assert changed.sum() >= max(math.ceil(0.001 * len(x)), 2)
        diff = head.index.join(f.head.fc_bef.weight - head.fc_bef.weight, f.head.fc_aft.weight - head.fc_aft.weight)
        assert set(torch.nonzero(diff).view(-1).tolist()) == set(f.weights.tolist())
        assert len(set(f.weights.tolist())) == len(f.weights)
        # every perturbed weight was a candidate (above its matrix's mean |gradient|), value within mean +- 3 std
        gb, ga = head.index.split(grad)
        for flat, v in zip(f.weights.tolist(), f.values.tolist()):
            m = 0 if flat < head.index.sizes[0] else 1
            gm, w = (gb, head.fc_bef.weight) if m == 0 else (ga, head.fc_aft.weight)
            assert grad[flat] > gm.mean()
            assert abs(v - w.mean().item()) <= 3 * w.std().item() + 1e-6
        # removing the last perturbation leaves fewer changed predictions than needed (stops as soon as enough)
        prev = f.head.copy()
        m, r, c = head.index.to_triples(f.weights[-1:])[0].tolist()
        with torch.no_grad():
            (prev.fc_bef if m == 0 else prev.fc_aft).weight[r, c] = f.original[-1]
            assert int((prev(x).argmax(-1) != before).sum()) < f.info["need"]
    # the head given in is untouched, and the same seed gives the same fault
    f2 = inject_faults(head, x, label, seed=0, grad=grad)
    assert torch.equal(f2.weights, inject_faults(head, x, label, seed=0, grad=grad).weights)


def test_injection_fails_clearly():
    head = make_head()
    x, label = make_data(head, n=100)
    with pytest.raises(InjectionError, match="changed only"):
        inject_faults(head, x, label, max_weights=1, min_changed=50)
    with pytest.raises(ValueError, match="only 100 inputs"):
        inject_faults(head, x, label, min_changed=101)


def test_benchmark_rows_with_a_stub_localizer():
    head = make_head()
    x, label = make_data(head, n=1000)

    def oracle(h, x_, label_, is_neg, method, budget, batch_size, seed):
        # "oracle" knows the perturbed weights (diff against the clean head): AP must be 1
        diff = h.index.join(h.fc_bef.weight - head.fc_bef.weight, h.fc_aft.weight - head.fc_aft.weight)
        if method == "broken":
            raise RuntimeError("boom")
        s = diff.abs().detach() if method == "oracle" else -diff.abs().detach()
        return FLResult(method, "weight", budget, s, torch.zeros(0, 3))

    df = run_injected_benchmark(head, x, label, ["oracle", "anti", "broken"], seeds=(0, 1), localize_fn=oracle)
    assert len(df) == 6
    o = df[df.method == "oracle"]
    assert (o["AP"] == 1.0).all() and (o["R_precision"] == 1.0).all()
    assert (df[df.method == "anti"]["AP"] < o["AP"].min()).all()
    assert df[df.method == "broken"]["error"].str.contains("boom").all()
    assert (df["n_changed"] >= 2).all()


def test_weight_level_scores_spreads_neurons():
    head = make_head()
    r = FLResult("n", "neuron", 1, torch.arange(32.0), torch.zeros(0, 3))
    s = weight_level_scores(r, head.index)
    assert s.shape == (head.index.total,)
    assert torch.equal(s, torch.arange(32.0)[head.index.neuron_of(torch.arange(head.index.total))])


def test_grad_loss_beats_random_on_injected_faults():
    """Built so that GL must win: only 3 of the 32 neurons are active (the others' pre-GELU values sit near -30,
    where GELU and its derivative vanish), so only their 3 x 2d = 48 weights have a non-zero loss gradient; the
    injection picks among them, and GL on the changed inputs scores every other weight 0. So GL's top 10 %
    (51 of 512 weights) holds every perturbed weight, whereas random's expected recall there is 10 %."""
    pytest.importorskip("vitfl.localization.methods")
    head = make_head(d=8)
    with torch.no_grad():
        head.fc_bef.bias.fill_(-30.0)
        head.fc_bef.bias[[3, 11, 20]] = 1.0
    x, _ = make_data(head, n=2000)
    with torch.no_grad():
        label = head(x).argmax(-1)
    assert int((loss_gradient(head, x, label) > 0).sum()) == 48
    df = run_injected_benchmark(head, x, label, ["grad_loss", "random"], seeds=range(5), fractions=(0.01, 0.1))
    assert (df["error"] == "").all(), df["error"].tolist()
    gl, rnd = df[df.method == "grad_loss"], df[df.method == "random"]
    assert (gl["R@10%"] == 1.0).all()
    assert gl["R@10%"].mean() > rnd["R@10%"].mean()
    assert gl["AP"].mean() > 3 * gl["rand_AP"].mean()
    assert gl["AP"].mean() > 3 * rnd["AP"].mean()


# ------------------------------------------------------------------------------------------------- strength
def _setup():
    head = make_head()
    x, label = make_data(head, n=400)
    return head, x, label


def test_strength_requirement_and_labels():
    from vitfl.evaluation.injected_faults import strength_label, strength_requirement

    assert strength_requirement("published") == (0.001, 2)
    assert strength_requirement(30) == (0.0, 30) and strength_requirement("30") == (0.0, 30)
    assert strength_requirement(0.02) == (0.02, 1) and strength_label(0.02) == "0.02"
    assert strength_label(30) == "30" and strength_label("published") == "published"
    for bad in (0, -3, 1.5, "strong", True, None):
        with pytest.raises(ValueError, match="strength"):
            strength_requirement(bad)


@pytest.mark.parametrize("strength", ["published", 8, 0.05])
def test_a_strength_yields_at_least_its_changed_count(strength):
    import math

    from vitfl.evaluation.injected_faults import inject_with_strength, strength_requirement

    head, x, label = _setup()
    fault = inject_with_strength(head, x, label, seed=1, strength=strength)
    frac, n_min = strength_requirement(strength)
    need = max(math.ceil(frac * len(x)), n_min)
    # the full faulty head changes at least that many predictions (recomputed here, not taken from the fault)
    with torch.no_grad():
        changed = (fault.head(x).argmax(1) != head(x).argmax(1))
    assert int(changed.sum()) >= need and torch.equal(changed, fault.changed)
    assert fault.info["strength"] == str(strength)


def test_an_unreachable_strength_is_an_error_naming_it():
    from vitfl.evaluation.injected_faults import inject_with_strength

    head, x, label = _setup()
    with pytest.raises(InjectionError, match="strength '90'"):
        inject_with_strength(head, x, label, seed=0, strength=90, max_weights=3)
    with pytest.raises(InjectionError, match="strength '5000'.*only"):
        inject_with_strength(head, x, label, seed=0, strength=5000)
