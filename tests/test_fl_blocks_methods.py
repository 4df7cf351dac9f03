"""Every registered FL method on a non-last block's FFN (``ffn_head(model, block=0)``, a TokenFFNHead on the token
states [N, T, d]) against an independent float64 reference through the FULL model: loss gradients w.r.t. block 0's
fc1 / fc2 by autograd on a deep copy of the model, activations and per-input output gradients by forward hooks on
it, reduced by the documented token statistic (this file's own: token 0 for class-token pooling, the mean over the
patch tokens for average pooling), then each method's formula re-derived here in plain float64 torch
(docs/methods.md, sections 1 and 3). Also: the last-block CLS head is unchanged for every method (same object type,
identity {}, the same scores bit for bit as last_ffn_head), a forced token head of the last block agrees with it,
and a method that declares no token-head support (and a wrong-shaped state) gets a clear error."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import images, tiny_hf_vit, tiny_timm_vit
from vitfl.localization.base import FL_METHODS, Localizer, UnsupportedHeadError, method_meta
from vitfl.localization.ffn import FFNHead, TokenFFNHead, capture_ffn_states, ffn_head, last_ffn_head
from vitfl.localization.methods._common import SetLocalizer
from vitfl.localization.ranking import localize

pytestmark = pytest.mark.usefixtures("one_thread")

N, BLOCK, TRUE_LABEL, COMPAT_BATCH = 8, 0, 1, 3
LABEL = torch.tensor([0, 3, 2, 5, 1, 1, 2, 1])
IS_NEG = torch.arange(N) < 4  # I_neg: rows 0-3, I_pos: rows 4-7 (three of label TRUE_LABEL)
TOL = 1e-8
EPS = 1e-8  # the published RepTran denominators / minmax

MODELS = {  # name: (builder, this file's token statistic of the readout)
    "hf": (lambda: tiny_hf_vit(3), lambda t: t[:, 0]),
    "timm_token": (lambda: tiny_timm_vit(4, init_values=0.1), lambda t: t[:, 0]),
    "timm_avg": (lambda: tiny_timm_vit(5, global_pool="avg"), lambda t: t[:, 1:].mean(1)),
}


def options(name: str) -> dict:
    meta = method_meta(name)
    opts = {}
    if meta["uses_true_label"]:
        opts["true_label"] = TRUE_LABEL
    if meta["batching"] is not None:
        opts["batch_size"] = COMPAT_BATCH  # 4 rows per set -> np.array_split into 2 + 2
    return opts


def run_method(head, x, name: str):
    loc = FL_METHODS.get(name)(head, seed=0, **options(name))
    return localize(head, x, LABEL, IS_NEG, loc, 1, batch_size=3).scores  # 3 rows per update


# --------------------------------------------------------------------------------------------- the reference
def ffn_modules(model):
    if hasattr(model, "vit"):
        blk = model.vit.layers[BLOCK]
        return blk.layernorm_after, blk.mlp.fc1, blk.mlp.fc2
    blk = model.blocks[BLOCK]
    return blk.norm2, blk.mlp.fc1, blk.mlp.fc2


def logits_of(model, pixels):
    out = model(pixels)
    return out.logits if hasattr(out, "logits") else out


def full_forward(model, pixels, replace_a=None):
    """One forward of the full model with hooks on block BLOCK's FFN: x (LayerNorm input), h (its output), z (fc1
    output), a (fc2 input), n (fc2 output), logits; ``replace_a``: a tensor fed to fc2 instead of a."""
    norm, fc1, fc2 = ffn_modules(model)
    got = {}

    def pre_fc2(_m, args):
        got["a"] = args[0]
        return (replace_a,) if replace_a is not None else None

    hooks = [norm.register_forward_pre_hook(lambda _m, args: got.__setitem__("x", args[0])),
             norm.register_forward_hook(lambda _m, _a, out: got.__setitem__("h", out)),
             fc1.register_forward_hook(lambda _m, _a, out: got.__setitem__("z", out)),
             fc2.register_forward_pre_hook(pre_fc2),
             fc2.register_forward_hook(lambda _m, _a, out: got.__setitem__("n", out))]
    try:
        got["logits"] = logits_of(model, pixels)
    finally:
        for hk in hooks:
            hk.remove()
    return got


def minmax(v, eps=0.0):
    lo, hi = v.min(), v.max()
    if eps == 0.0 and hi == lo:
        return torch.zeros_like(v)
    return (v - lo) / (hi - lo + eps)


def pareto(f1, f2):
    """Naive O(n^2) first front, identical points kept: p is dominated iff some q is >= in both, > in one."""
    ge = (f1[None, :] >= f1[:, None]) & (f2[None, :] >= f2[:, None])
    gt = (f1[None, :] > f1[:, None]) | (f2[None, :] > f2[:, None])
    return ~(ge & gt).any(1)


def parts(k: int, b: int) -> list[int]:
    """np.array_split sizes of k rows into ceil(k / b) parts."""
    m = -(-k // b)
    q, r = divmod(k, m)
    return [q + 1] * r + [q] * (m - r)


class Reference:
    """Every quantity a method needs, from the full float64 model (a deep copy), per set."""

    def __init__(self, model, pixels, stat):
        self.model = model = copy.deepcopy(model).double()
        self.pixels, self.stat = pixels, stat
        _, self.fc1, self.fc2 = ffn_modules(model)
        self.W = (self.fc1.weight.detach().clone(), self.fc2.weight.detach().clone())
        got = full_forward(model, pixels)
        self.x = got["x"].detach().clone()
        logits = got["logits"]
        g_z, g_a, g_n = torch.autograd.grad(logits.sum(), [got["z"], got["a"], got["n"]], retain_graph=True)
        self.ce = F.cross_entropy(logits, LABEL, reduction="none")  # per input, still in the graph
        r = {k: stat(t.detach()) for k, t in (("h", got["h"]), ("a", got["a"]), ("g_z", g_z), ("g_a", g_a),
                                               ("g_n", g_n))}
        self.h, self.a, self.g_z, self.g_a, self.g_n = r["h"], r["a"], r["g_z"], r["g_a"], r["g_n"]
        self.a_tokens = got["a"].detach()
        self.sets = {"neg": IS_NEG, "pos": ~IS_NEG}

    def flat(self, bef, aft):
        return torch.cat([bef.reshape(-1), aft.reshape(-1)])

    def grad(self, weights_per_row):
        """d/dW sum_x c_x L(x) for W = block BLOCK's fc1 / fc2 weight, flat."""
        loss = (self.ce * weights_per_row).sum()
        return self.flat(*torch.autograd.grad(loss, [self.fc1.weight, self.fc2.weight], retain_graph=True))

    def per_weight(self, v):
        d, d_ff = self.W[1].shape
        return self.flat(v.view(d_ff, 1).expand(d_ff, d), v.view(1, d_ff).expand(d, d_ff))

    # GL / FI (section 3.3)
    def gl(self, side):
        return self.grad(self.sets[side].double()).abs()

    def fi(self, side):
        m = self.sets[side]
        out = []
        for w, o, g in ((self.W[0], self.h[m], self.g_a[m]), (self.W[1], self.a[m], self.g_n[m])):
            p = (o[:, None, :] * w[None]).abs()  # [n, out, in]
            front = (p / p.sum(2, keepdim=True)).mean(0)
            back = (g.abs() / g.abs().sum(1, keepdim=True)).mean(0)
            out.append(front * back[:, None])
        return self.flat(*out)

    def two_sided(self, f):
        return f("neg") / (1 + f("pos"))

    # V-score, vdiff, mean_act (section 3.2)
    def v(self, rows, variant="abs_sum"):
        c = torch.cov(self.a[rows].T)  # ddof = 1
        diag = torch.diagonal(c)
        if variant == "abs_sum":
            return c.abs().sum(1)
        return diag + (c.sum(1) - diag) / (c.shape[0] - 1)  # signed_mean

    def vdiff(self, pos_label=None, variant="abs_sum"):
        pos = ~IS_NEG if pos_label is None else (~IS_NEG) & (LABEL == pos_label)
        return minmax((self.v(pos, variant) - self.v(IS_NEG, variant)).abs())

    def mean_act(self):
        return minmax(self.a[IS_NEG].mean(0))

    # spectrum (section 3.10)
    def spectrum(self):
        act = (self.a > 0).double()
        return act[IS_NEG].sum(0), act[~IS_NEG].sum(0), float(IS_NEG.sum()), float((~IS_NEG).sum())

    # IG (section 3.8): the whole layer scaled at once in the full model, per-token attributions summed over tokens
    def ig(self, m=20):
        neg = IS_NEG
        px, a, y = self.pixels[neg], self.a_tokens[neg], LABEL[neg]
        total = torch.zeros_like(a)
        for k in range(m):
            leaf = (k / m * a).clone().requires_grad_(True)
            logits = full_forward(self.model, px, replace_a=leaf)["logits"]
            p = torch.softmax(logits, -1).gather(1, y.view(-1, 1)).sum()
            total += torch.autograd.grad(p, leaf)[0]
        return (a * total / m).sum(1).mean(0)

    # the published GL / FI (section 3.4)
    def reptran(self, kind, side):
        idx = torch.nonzero(self.sets[side]).squeeze(1)
        sizes, s, acc = parts(len(idx), COMPAT_BATCH), 0, 0
        for b in sizes:
            rows = idx[s:s + b]
            s += b
            if kind == "gl":
                c = torch.zeros(N, dtype=torch.float64)
                c[rows] = 1.0 / b
                acc = acc + self.grad(c)
            else:
                out = []
                for w, o, g in ((self.W[0], self.h[rows], self.g_z[rows]), (self.W[1], self.a[rows], self.g_n[rows])):
                    r = 1.0 / (o @ w.T + EPS)  # [b, out]
                    front = w * (r.T @ o) / b
                    back = g.T @ o  # d/dW of the part's summed logits (per-input vectors)
                    out.append(front * back)
                acc = acc + self.flat(*out)
        return acc / len(sizes)

    def reptran_2s(self, kind):
        return self.reptran(kind, "neg") / (1 + self.reptran(kind, "pos"))


def reference_scores(name: str, R: Reference) -> torch.Tensor:
    gl2, fi2 = (lambda: R.two_sided(R.gl)), (lambda: R.two_sided(R.fi))
    e_f, e_p, n_f, n_p = R.spectrum()
    total = 2 * R.W[0].numel()
    formulas = {
        "grad_loss": lambda: R.gl("neg"),
        "gradient_only": lambda: R.gl("neg"),
        "grad_loss_2s": gl2,
        "forward_impact": lambda: R.fi("neg"),
        "forward_impact_2s": fi2,
        "arachne_w": lambda: 0.5 * minmax(gl2()) + 0.5 * minmax(fi2()),
        "bl": lambda: 0.5 * minmax(gl2()) + 0.5 * minmax(fi2()) + 2.0 * pareto(gl2(), fi2()),
        "ours": lambda: (0.5 * minmax(R.per_weight(R.vdiff(TRUE_LABEL) * R.mean_act()) * gl2())
                         + 0.5 * minmax(R.per_weight(R.vdiff(TRUE_LABEL) * R.mean_act()) * fi2())),
        "vdiff": lambda: R.vdiff(),
        "mean_act": lambda: R.mean_act(),
        "vdiff_x_mean_act": lambda: R.vdiff() * R.mean_act(),
        "tarantula": lambda: torch.nan_to_num((e_f / n_f) / (e_f / n_f + e_p / n_p)),
        "ochiai": lambda: torch.nan_to_num(e_f / torch.sqrt(n_f * (e_f + e_p))),
        "dstar": lambda: torch.where(e_p + n_f - e_f > 0, e_f ** 2 / (e_p + n_f - e_f), n_f ** 2 + 1),
        "ig": lambda: R.ig(),
        "magnitude": lambda: R.flat(*R.W).abs(),
        "random": lambda: torch.rand(total, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        "random_neuron": lambda: torch.rand(total // (2 * R.W[1].shape[0]), generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64),
        "grad_loss_reptran": lambda: R.reptran_2s("gl"),
        "forward_impact_reptran": lambda: R.reptran_2s("fi"),
        "arachne_w_reptran": lambda: 0.5 * minmax(R.reptran_2s("gl"), EPS) + 0.5 * minmax(R.reptran_2s("fi"), EPS),
        "bl_fl5": lambda: 0.5 * minmax(R.reptran_2s("gl"), EPS) + 0.5 * minmax(R.reptran_2s("fi"), EPS),
        "bl_reptran": lambda: (0.5 * minmax(R.reptran_2s("gl")) + 0.5 * minmax(R.reptran_2s("fi"))
                               + 2.0 * pareto(R.reptran_2s("gl"), R.reptran_2s("fi"))),
        "ours_reptran": lambda: (0.5 * minmax(R.per_weight(R.vdiff(TRUE_LABEL) * R.mean_act()) * R.reptran_2s("gl"), EPS)
                                 + 0.5 * minmax(R.per_weight(R.vdiff(TRUE_LABEL) * R.mean_act()) * R.reptran_2s("fi"),
                                                EPS)),
        "ours_fl5": lambda: (0.5 * minmax(R.reptran("gl", "neg"))
                             + 0.5 * R.per_weight(0.5 * R.vdiff(variant="signed_mean") + 0.5 * R.mean_act())).abs(),
    }
    assert name in formulas, f"no float64 reference for FL method {name!r}: add its formula to this test"
    return formulas[name]().detach()


@pytest.fixture(scope="module")
def cases():
    """name -> (model, token states entering block BLOCK's FFN captured from the full model, Reference)."""
    out = {}
    pixels = images(N, seed=11, dtype=torch.float64)
    for name, (make, stat) in MODELS.items():
        model = make().double()
        R = Reference(model, pixels, stat)
        with capture_ffn_states(model, block=BLOCK) as st, torch.no_grad():
            logits_of(model, pixels)
        torch.testing.assert_close(st["x"], R.x, rtol=0, atol=0)  # the toolkit's capture == this file's hooks
        out[name] = (model, st["x"], R)
    return out


def rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_method_on_block_0_matches_the_full_model(model_name, cases):
    model, x, R = cases[model_name]
    head = ffn_head(model, BLOCK)
    assert isinstance(head, TokenFFNHead) and head.block == BLOCK and x.shape == (N, 17, 16)
    assert head.identity()["block"] == BLOCK and head.identity()["token_statistic"] == "readout"
    names = FL_METHODS.names()
    assert len(names) >= 25
    errors = {}
    for name in names:
        scores = run_method(head, x, name)
        level = method_meta(name)["level"]
        assert scores.shape == ((head.index.total,) if level == "weight" else (head.d_ff,)), name
        assert scores.dtype == torch.float64 and bool(torch.isfinite(scores).all()), name
        ref = reference_scores(name, R)
        assert ref.abs().max() > 0 and ref.std() > 0, name  # a degenerate reference would prove nothing
        errors[name] = rel_err(scores, ref)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{model_name}: relative errors above {TOL}: {bad}"


def test_the_reference_can_tell_statistics_and_blocks_apart(cases):
    """The comparison above can fail: on average pooling, the CLS statistic, or another block's states, give
    other scores."""
    model, x, R = cases["timm_avg"]
    head = ffn_head(model, BLOCK)
    cls = Reference(model, R.pixels, lambda t: t[:, 0])
    for name in ("forward_impact", "mean_act", "vdiff", "forward_impact_reptran"):
        assert rel_err(run_method(head, x, name), reference_scores(name, cls)) > 1e-3, name
    with capture_ffn_states(model, block=1) as st, torch.no_grad():
        logits_of(model, R.pixels)
    for name in ("grad_loss", "ig"):
        assert rel_err(run_method(ffn_head(model, 1), st["x"], name), reference_scores(name, R)) > 1e-3, name
    # the head's own statistic option reaches the activation terms (cls -> the CLS reference)
    by_cls = ffn_head(model, BLOCK, token_statistic="cls")
    assert rel_err(run_method(by_cls, x, "forward_impact"), reference_scores("forward_impact", cls)) <= TOL


@pytest.mark.parametrize("model_name", ["hf", "timm_token"])
def test_last_block_cls_head_unchanged(model_name):
    """The last block of a CLS-pooled model: ffn_head gives the FFNHead (identity {}), and every method gives the
    same scores, bit for bit, as on last_ffn_head with the cached CLS states; a forced token head of that block
    (CLS statistic) agrees to float64 rounding (no other token reaches the logits there)."""
    model = MODELS[model_name][0]().double()
    pixels = images(N, seed=12, dtype=torch.float64)
    with capture_ffn_states(model) as st, torch.no_grad():
        logits_of(model, pixels)
    with capture_ffn_states(model, block=-1) as st_b, torch.no_grad():
        logits_of(model, pixels)
    old, new = last_ffn_head(model), ffn_head(model, -1)
    assert type(new) is FFNHead and not new.token_axis and new.identity() == {} == old.identity()
    torch.testing.assert_close(st_b["x"], st["x"], rtol=0, atol=0)
    tok = ffn_head(model, -1, tokens=True)
    norm = model.vit.layers[-1].layernorm_after if hasattr(model, "vit") else model.blocks[-1].norm2
    got = {}
    hk = norm.register_forward_pre_hook(lambda _m, args: got.__setitem__("x", args[0].detach().clone()))
    with torch.no_grad():
        logits_of(model, pixels)
    hk.remove()
    x_tok = got["x"]  # every token entering the last FFN
    for name in FL_METHODS.names():
        a = run_method(old, st["x"], name)
        b = run_method(new, st_b["x"], name)
        assert torch.equal(a, b), name
        c = run_method(tok, x_tok, name)
        assert rel_err(c, a) <= 1e-10 or torch.equal(c, a), (name, rel_err(c, a))


def test_methods_without_token_support_refuse_clearly(cases):
    model, x, _ = cases["timm_avg"]
    head = ffn_head(model, BLOCK)

    class CLSOnly(SetLocalizer):
        name = "cls_only_demo"
        token_heads = False
        token_heads_why = "its formula reads one CLS state per input"

        def _accumulate(self, side, x, label):
            pass

    with pytest.raises(UnsupportedHeadError, match=r"FL method 'cls_only_demo' cannot run on the FFN head of block "
                                                   r"0 \(avg pooling.*its formula reads one CLS state per input"):
        CLSOnly(head)
    CLSOnly(last_ffn_head(MODELS["hf"][0]()))  # the CLS head is fine
    assert all(getattr(FL_METHODS.get(n), "token_heads", True) for n in FL_METHODS.names())  # no built-in refuses
    # a CLS state given to a token head: a clear error naming the method and the block, not a shape error
    with pytest.raises(ValueError, match=r"FL method 'grad_loss' on the FFN head of block 0: .*token states"):
        localize(head, x[:, 0], LABEL, IS_NEG, "grad_loss", 1)
    assert issubclass(UnsupportedHeadError, ValueError) and issubclass(CLSOnly, Localizer)
