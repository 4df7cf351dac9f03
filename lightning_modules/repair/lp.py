"""Sequential linear programming on the exact FFN head: a repairability oracle (docs/methods.md, section 6).

The located weights say *where* to change the head; this method computes *what* to write there by a sequence of
linear programs on a first-order model of the FFN head, in the spirit of PRDNN's decoupled networks (Sotoudeh &
Thakur, PLDI 2021) and PRoViT, and checks every step on the exact head.

**First-order model at the current values w (decoupling).** With the FFN head (:mod:`vitfl.localization.ffn`)
h = LN_ffn(x), z = W_bef h + b_bef, a = act(z), r = x + ls * (W_aft a + b_aft), logits = W_cls LN(r) + b_cls, the
final LayerNorm LN(r) = gamma * (r - mean(r)) / sigma + beta with sigma = sqrt(var(r) + eps). Freeze at w

- the activation derivatives act'(z_j(n)) of the intermediate neurons (exact erf GELU, its tanh approximation,
  or ReLU: whatever the head uses; any other activation is refused), and
- sigma_n per input (the mean of r is linear in r and stays exact; only sigma is frozen).

With G = W_cls diag(gamma) ``[C, d]``, P = I - 1 1^T / d and ls the layer-scale vector (ones for Identity), a
change delta_k of located weight k moves the logits of input n by J[n, :, k] delta_k with J[n, :, k] = s[n, k] v[k]:

- W_aft (row i, col j): v[k] = (G P)[:, i] ls_i,                    s[n, k] = a_j(n) / sigma_n;
- W_bef (row j, col c): v[k] = (G P) (ls * W_aft[:, j]),            s[n, k] = act'(z_j(n)) h_c(n) / sigma_n.

Cross terms between a W_bef and a W_aft weight of the same neuron are second order and left out. **Exactness:**
when every located weight is in W_aft, the model's logits logits(w) + J delta equal *exactly* (to round-off) those
of the *decoupled* head, the real head with the final LayerNorm's sigma frozen at w (:func:`frozen_sigma_logits`);
only the change of sigma separates them from the real head. With W_bef weights the model is the first-order
expansion of the decoupled head (its error against it shrinks quadratically with the step). Against the real
head the error is first order in either case: sigma's change is left out by design. It rescales the centred
logits of an input (logits - b' = G P r / sigma, b' = W_cls beta + b_cls), so it moves a margin's sign only
through b'; the exact check below catches what it does move.

**One step = one linear program** (:func:`solve_margin_lp`), in normalised units u_k = delta_k / scale_k
(scale_k = the std of the weight's matrix, :func:`~.de.matrix_init_stats`):

- variables: u ``[K]``, the norm's epigraph (``norm="l1"``: t_k >= |u_k| per weight, ||u||_1 = sum t; ``"linf"``:
  one t >= |u_k| for all k; as rows u - t <= 0, -u - t <= 0) and one slack xi_n >= 0 per input;
- constraints, for input n with label y and a competitor class c: the linear margin
  z_y(n) - z_c(n) + sum_k s[n, k] scale_k (v[k, y] - v[k, c]) u_k >= margin - xi_n, for I_neg (gain the label) and
  I_pos (keep it) alike. The first LP holds only the *active competitor* (the current highest non-label logit) of
  every I_neg input and of the I_pos inputs whose margin might fall below ``margin`` within the trust region; after
  each solve every input is checked against every class on the linear model, the violated (input, class) rows
  are added and the LP is solved again (cutting planes, at most ``max_rounds`` solves). All rows of an input share
  its one slack: a hinge on its worst competitor;
- objective: sum_n w_n xi_n / h_n + norm_weight ||u|| (l1: sum_k t_k; linf: t), w_n the repair fitness's input
  weights (:func:`~.finetune.fitness_weights`: alpha on I_neg, 1 on I_pos for Arachne's fitness), rescaled so that
  an I_pos input weighs 1 (for the Arachne fitness they are unchanged). ``hinge="absolute"``: h_n = 1, the plain
  weighted hinge in logits. ``hinge="relative"`` (default): h_n = max(margin - m_n, margin, 0.01), m_n the
  input's current margin, i.e. each slack is measured in units of the input's own hinge at u = 0, so that fixing an
  I_neg input (its slack from h_n to 0) earns w_n whatever its deficit and breaking an I_pos input costs w_n or more:
  the secant of the fitness's step "correct or not" rather than a reward per logit. The plain hinge lets the LP
  buy many small margin gains on hopeless I_neg inputs with broken I_pos inputs, a trade the exact fitness then
  rejects (on small random heads "relative" reached a higher exact fitness in 7 of 8 problems);
- bounds: the trust region |u_k| <= radius intersected with DE's value bounds of the weight's matrix
  (:func:`~.de.matrix_bounds`, the box DE searches): lower_k - w_k <= delta_k <= upper_k - w_k.

The LPs are solved by HiGHS (``scipy.optimize.linprog(method="highs")``, a maintained open-source LP solver) with
``scipy.sparse`` constraint matrices.

**Every step is checked on the exact head.** The candidate w + delta is scored with the repair fitness by the
exact sparse evaluator (:class:`~.fitness.SparseFitness`, the full head's arithmetic on the changed weights). It is
accepted only when its exact fitness beats the current point's (then, when the linear model predicted the exact
fitness gain well, rho = exact gain / predicted gain >= 0.75, the radius doubles, up to 8 x its initial value);
otherwise it is rejected and the radius halves. Since only improvements are accepted, the current point is the best
exact result seen (the original values are step 0). The search stops after ``steps`` steps, when the radius falls
below 1/64 of its initial value, when the LP returns no change (u = 0 is optimal: then it is for every smaller
radius too), or when every I_neg input is fixed and no I_pos input is broken on the exact head (``"repaired"``;
the fitness is then at its maximum, so no later step could be accepted; ``slack`` in the summary says whether the
LP's margins were met as well).

**What the result means.** The patch is the best *exact* point, and every count the module reports (n_patched,
n_broken, fitness) comes from the exact head, never from the LP's prediction (which is reported beside it, for
the last step). It measures the *repairability* of a set of located weights: the share of I_neg this optimiser
can fix by changing them (without breaking I_pos), a yardstick for localisation independent of DE's randomness.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfl.core.registry import Range
from vitfl.lightning_modules.repair import register_repair
from vitfl.lightning_modules.repair.base import RepairModule
from vitfl.lightning_modules.repair.de import matrix_bounds, matrix_init_stats
from vitfl.lightning_modules.repair.finetune import fitness_weights
from vitfl.lightning_modules.repair.fitness import _foldable_post, _layer_scale_vector, repair_fitness
from vitfl.lightning_modules.repair.patch import RepairInputError, check_weights, write_values
from vitfl.localization.ffn import FFNHead

__all__ = ["NORMS", "activation_derivative", "head_parts", "frozen_sigma_logits", "Linearization", "linearize",
           "LPSolution", "solve_margin_lp", "input_weights", "LPRepair"]

NORMS = ("l1", "linf")
HINGES = ("absolute", "relative")
HINGE_FLOOR = 1e-2  # logits: the least hinge scale of hinge="relative" (margin 0)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


# ------------------------------------------------------------------------------------------------ the head's parts
def _gelu_exact_grad(z: Tensor) -> Tensor:
    """d/dz z Phi(z) = Phi(z) + z phi(z)."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _gelu_tanh_grad(z: Tensor) -> Tensor:
    """d/dz of 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))."""
    t = torch.tanh(_SQRT_2_PI * (z + 0.044715 * z ** 3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_PI * (1.0 + 3 * 0.044715 * z * z)


def _relu_grad(z: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


def activation_derivative(act: nn.Module) -> Callable[[Tensor], Tensor]:
    """The derivative of the head's activation, elementwise: exact erf GELU (``nn.GELU()``, transformers'
    ``GELUActivation``, timm's ``GELU``), its tanh approximation (``nn.GELU(approximate="tanh")``, timm's
    ``GELUTanh``) or ReLU (derivative 0 at 0). Any other activation raises :class:`RepairInputError`."""
    name, mod = type(act).__name__, type(act).__module__
    if isinstance(act, nn.GELU):
        return _gelu_tanh_grad if act.approximate == "tanh" else _gelu_exact_grad
    if isinstance(act, nn.ReLU):
        return _relu_grad
    if name == "GELUActivation" and mod.startswith("transformers"):
        fn = getattr(act, "act", None)
        if fn is F.gelu or getattr(fn, "__name__", "") == "_gelu_python":  # both the exact erf GELU
            return _gelu_exact_grad
    if mod.startswith("timm") and name in ("GELU", "GELUTanh"):
        return _gelu_exact_grad if name == "GELU" else _gelu_tanh_grad
    raise RepairInputError(f"repair 'lp' linearises the FFN's activation and knows GELU (exact or tanh) and ReLU; "
                           f"this head uses {mod}.{name}, which it does not support")


def head_parts(head: FFNHead) -> tuple[nn.LayerNorm, nn.Linear, Tensor]:
    """(final LayerNorm, classifier, layer-scale vector ``[d]``) of a head whose ``post`` is LayerNorm -> Linear
    (HF and timm class-token ViTs) and whose layer scale is Identity or a LayerScale; else
    :class:`RepairInputError` naming what is unsupported."""
    fold = _foldable_post(head.post, head.d)
    if fold is None:
        parts = " -> ".join(type(m).__name__ for m in head.post.modules()
                            if not isinstance(m, nn.Sequential)) or type(head.post).__name__
        raise RepairInputError(f"repair 'lp' needs the head's post = LayerNorm(d) -> Linear (with Identity/Dropout "
                               f"between); this head's post is {parts}, which it does not support")
    lam = _layer_scale_vector(head.layer_scale, head.d)
    if lam is None:
        raise RepairInputError(f"repair 'lp' needs an Identity or LayerScale layer scale; this head has "
                               f"{type(head.layer_scale).__name__}, which it does not support")
    return fold[0], fold[1], lam


def _with_values(head: FFNHead, weights: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(W_bef, W_aft) with the located weights set to ``values`` (out of place: differentiable in ``values``)."""
    Wb, Wa = head.weights()
    w = weights.to(Wb.device)
    m, r, c = w.unbind(1)
    values = values.to(Wb.device, Wb.dtype)
    out = []
    for k, W in enumerate((Wb, Wa)):
        sel = m == k
        out.append(W.detach().index_put((r[sel], c[sel]), values[sel]) if bool(sel.any()) else W.detach())
    return out[0], out[1]


def frozen_sigma_logits(head: FFNHead, weights: Tensor, values: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """Logits ``[N, C]`` of the *decoupled* head: the real head with the located weights ``weights [K, 3]`` set to
    ``values [K]`` and the final LayerNorm's ``sigma [N]`` (sqrt(var + eps) per input) frozen (its mean is recomputed):
    logits = W_cls (gamma * (r - mean(r)) / sigma + beta) + b_cls. Differentiable in ``values`` (the head is not
    modified). When every located weight is in W_aft, :meth:`Linearization.logits` equals this exactly."""
    ln, lin, _ = head_parts(head)
    Wb, Wa = _with_values(head, weights, values)
    h = head.norm(x)
    a = head.act(F.linear(h, Wb, head.fc_bef.bias))
    r = x + head.layer_scale(F.linear(a, Wa, head.fc_aft.bias))
    y = (r - r.mean(1, keepdim=True)) / sigma.to(r.dtype)[:, None]
    if ln.weight is not None:
        y = y * ln.weight
    if ln.bias is not None:
        y = y + ln.bias
    return lin(y)


# ------------------------------------------------------------------------------------------------ linearisation
@dataclass
class Linearization:
    """The first-order model of the head at ``values`` (module docstring), float64:
    ``logits0 [N, C]`` (the real head's logits at ``values``), ``sigma [N]`` (the final LayerNorm's frozen
    sqrt(var + eps)), ``s [N, K]`` and ``v [K, C]``: the Jacobian is J[n, :, k] = s[n, k] v[k]."""

    values: Tensor
    logits0: Tensor
    sigma: Tensor
    s: Tensor
    v: Tensor

    def logits(self, delta: Tensor) -> Tensor:
        """Predicted logits ``[N, C]`` after changing the located weights by ``delta [K]``."""
        return self.logits0 + (self.s * delta.to(self.s)) @ self.v

    def jacobian(self) -> Tensor:
        """``[N, C, K]`` d logits / d values (small problems only: tests)."""
        return self.s[:, None, :] * self.v.T[None, :, :]


@torch.no_grad()
def linearize(head: FFNHead, weights: Tensor, values: Tensor, x: Tensor) -> Linearization:
    """The first-order model (module docstring) of ``head`` with its located weights ``weights [K, 3]`` at
    ``values [K]`` on the inputs ``x [N, d]``: the head's forward pass runs on a copy in the head's dtype (the
    arithmetic the exact fitness uses), the model is formed and returned in float64."""
    head_parts(head)
    dact = activation_derivative(head.act)
    weights = check_weights(weights, head.index)
    hw = head.copy().eval()
    dev, dt = hw.fc_bef.weight.device, hw.fc_bef.weight.dtype
    write_values(hw, weights, torch.as_tensor(values).to(dev))
    x = torch.as_tensor(x).to(dev, dt)
    inter = {k: t.double() for k, t in hw.intermediates(x).items()}
    ln, lin, lam = head_parts(hw)
    lam = lam.to(dev, torch.float64)
    r = x.double() + inter["o"]
    rc = r - r.mean(1, keepdim=True)
    sigma = torch.sqrt((rc * rc).mean(1) + ln.eps)
    gamma = (ln.weight.detach().double() if ln.weight is not None
             else torch.ones(head.d, dtype=torch.float64, device=dev))
    G = lin.weight.detach().double() * gamma[None, :]                    # [C, d]
    GP = G - G.mean(1, keepdim=True)                                     # G P (P = I - 1 1^T / d)
    w = weights.to(dev)
    m, row, col = w.unbind(1)
    K, N, C = len(w), len(x), G.shape[0]
    v = torch.empty(K, C, dtype=torch.float64, device=dev)
    s = torch.empty(N, K, dtype=torch.float64, device=dev)
    inv_sigma = 1.0 / sigma[:, None]
    aft = m == 1
    if bool(aft.any()):                                                  # W_aft[i, j]
        i, j = row[aft], col[aft]
        v[aft] = (GP[:, i] * lam[i][None, :]).T
        s[:, aft] = inter["a"][:, j] * inv_sigma
    bef = ~aft
    if bool(bef.any()):                                                  # W_bef[j, c]
        j, c = row[bef], col[bef]
        J, inv = torch.unique(j, return_inverse=True)
        vJ = GP @ (lam[:, None] * hw.fc_aft.weight.detach()[:, J].double())  # [C, |J|], the current W_aft
        v[bef] = vJ.T[inv]
        s[:, bef] = dact(inter["z"][:, j]) * inter["h"][:, c] * inv_sigma
    vals = torch.as_tensor(values).to(dev, torch.float64)
    return Linearization(vals, inter["logits"], sigma, s, v)


# ------------------------------------------------------------------------------------------------ the LP
@dataclass
class LPSolution:
    """One SLP step's LP: ``delta [K]`` (changes, raw units), ``u [K]`` (normalised), ``slack [N]``, ``rows [R, 2]``
    (input, class) margin rows of the last LP solved, ``margin_rhs [R]`` (margin the row asks for), the bounds
    ``lower``/``upper [K]`` on delta, ``status`` / ``message`` (HiGHS's, of the last solve; ``ok``: a solution
    came back), ``rounds`` (solves), ``n_rows`` / ``nnz`` / ``n_vars`` (of the last LP), ``seconds`` (all solves),
    ``violated`` (rows still violated on the linear model after the last round; 0 = converged)."""

    delta: Tensor
    u: Tensor
    slack: Tensor
    rows: Tensor
    lower: Tensor
    upper: Tensor
    status: int
    message: str
    ok: bool
    rounds: int
    n_rows: int
    nnz: int
    n_vars: int
    seconds: float
    violated: int
    objective: float = float("nan")
    row_history: list[int] = field(default_factory=list)


def input_weights(is_neg: Tensor, alpha: float, variant: str = "arachne") -> Tensor:
    """The slack weights w_n ``[N]``: the repair fitness's input weights (:func:`~.finetune.fitness_weights`)
    rescaled so that an I_pos input weighs 1 (Arachne's fitness: alpha on I_neg, 1 on I_pos, unchanged)."""
    w = fitness_weights(is_neg, alpha, variant)
    is_neg = torch.as_tensor(is_neg, dtype=torch.bool)
    ref = w[~is_neg][0] if bool((~is_neg).any()) else w.max()
    return w / ref


def _margins(z: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """(margin to the highest non-label logit ``[N]``, that competitor ``[N]``) of logits ``z [N, C]``."""
    other = z.scatter(1, label[:, None], float("-inf"))
    top, comp = other.max(1)
    return z.gather(1, label[:, None]).squeeze(1) - top, comp


def solve_margin_lp(lin: Linearization, label: Tensor, is_neg: Tensor, input_weight: Tensor, scale: Tensor,
                    lower: Tensor, upper: Tensor, *, radius: float, margin: float, norm: str = "l1",
                    norm_weight: float = 1e-3, max_rounds: int = 5, time_limit: float | None = None,
                    hinge: str = "absolute", tol: float = 1e-7) -> LPSolution:
    """One SLP step's LP on the linear model ``lin`` (module docstring), solved by HiGHS with cutting planes.

    ``label [N]``, ``is_neg [N]``; ``input_weight [N]`` the slack costs w_n; ``scale [K]`` the unit of each weight
    (its matrix's std); ``lower``, ``upper [K]`` bounds on delta from the value bounds (lower <= 0 <= upper; clipped
    so); ``radius`` the trust region in scale units; ``margin`` in logit units; ``norm`` "l1" | "linf" and
    ``norm_weight`` the change's cost; ``hinge`` "absolute" | "relative" the slack's unit (module docstring);
    ``max_rounds`` the most solves (cutting-plane rounds); ``time_limit`` HiGHS's limit per solve (seconds; on
    expiry HiGHS's best point is used when it returns one, else no change, ``ok=False``). ``tol``: an (input,
    class) pair counts as violated on the linear model when its margin is below margin - slack - tol."""
    from scipy import sparse
    from scipy.optimize import linprog

    if norm not in NORMS:
        raise RepairInputError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if hinge not in HINGES:
        raise RepairInputError(f"unknown hinge {hinge!r}; expected one of {HINGES}")
    dev = lin.s.device
    f64 = dict(dtype=torch.float64, device=dev)
    label = torch.as_tensor(label).to(dev).long()
    is_neg = torch.as_tensor(is_neg).to(dev).bool()
    scale, lower, upper = (torch.as_tensor(t).to(**f64) for t in (scale, lower, upper))
    input_weight = torch.as_tensor(input_weight).to(**f64)
    N, K = lin.s.shape
    C = lin.v.shape[1]
    S = lin.s * scale[None, :]                                          # coefficients per unit u
    z0 = lin.logits0
    zy = z0.gather(1, label[:, None]).squeeze(1)
    m0, comp = _margins(z0, label)
    lb = torch.clamp(torch.maximum(lower / scale, torch.tensor(-radius, **f64)), max=0.0)
    ub = torch.clamp(torch.minimum(upper / scale, torch.tensor(radius, **f64)), min=0.0)
    umax = torch.maximum(-lb, ub)                                       # |u_k| can reach this
    if hinge == "relative":  # slack in units of the input's hinge at u = 0 (its deficit, at least the margin)
        input_weight = input_weight / torch.clamp(margin - m0, min=max(margin, HINGE_FLOOR))

    # first round: every I_neg input's active competitor, and the I_pos inputs whose margin to theirs could fall
    # below `margin` within half the trust region's worst case (the others are added when violated)
    vy, vc = lin.v.T[label], lin.v.T[comp]                              # [N, K]
    worst = (S * (vy - vc)).abs() @ umax                                # max margin loss within the box
    first = is_neg | (m0 - 0.5 * worst < margin)
    n_first = first.nonzero().squeeze(1)
    rows = torch.stack([n_first, comp[n_first]], 1)
    in_lp = torch.zeros(N, C, dtype=torch.bool, device=dev)
    in_lp[rows[:, 0], rows[:, 1]] = True

    # x = [u (K), t (K for l1, 1 for linf), xi (N)]; t >= |u| as rows u - t <= 0 and -u - t <= 0 (the epigraph
    # form: the margin rows hold u once, half the nonzeros of a split u = p - q, and HiGHS solves it ~1.7x faster)
    n_t = K if norm == "l1" else 1
    n_u = K + n_t
    cost = np.concatenate([np.zeros(K), np.full(n_t, float(norm_weight)), input_weight.cpu().numpy()])
    bounds = np.concatenate([np.stack([lb.cpu().numpy(), ub.cpu().numpy()], 1),
                             np.stack([np.zeros(n_t), np.full(n_t, float(radius))], 1),
                             np.stack([np.zeros(N), np.full(N, np.inf)], 1)])
    eye = sparse.identity(K, format="csr")
    tpart = eye if norm == "l1" else sparse.csr_matrix(np.ones((K, 1)))
    extra_A = sparse.vstack([sparse.hstack([eye, -tpart, sparse.csr_matrix((K, N))]),
                             sparse.hstack([-eye, -tpart, sparse.csr_matrix((K, N))])]).tocsr()
    extra_b = np.zeros(2 * K)
    options: dict[str, Any] = {"presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)

    blocks_A: list[Any] = []
    blocks_b: list[np.ndarray] = []

    def add_rows(r: Tensor) -> None:
        n, c = r[:, 0], r[:, 1]
        coef = S[n] * (lin.v.T[label[n]] - lin.v.T[c])                 # [R, K]: margin change per unit u
        xi = sparse.csr_matrix((-np.ones(len(r)), (np.arange(len(r)), n.cpu().numpy())), shape=(len(r), N))
        blocks_A.append(sparse.hstack([sparse.csr_matrix(-coef.cpu().numpy()), sparse.csr_matrix((len(r), n_t)),
                                       xi]).tocsr())
        blocks_b.append((zy[n] - z0[n, c] - margin).cpu().numpy())

    add_rows(rows)
    seconds, rounds, history = 0.0, 0, []
    u = torch.zeros(K, **f64)
    xi = torch.zeros(N, **f64)
    status, message, ok, objective, n_violated = 0, "", True, float("nan"), 0
    A_ub = None
    while True:
        A_ub = sparse.vstack(blocks_A + [extra_A]).tocsr()
        b_ub = np.concatenate(blocks_b + [extra_b])
        t = time.perf_counter()
        res = linprog(cost, A_ub=A_ub, b_ub=b_ub, bounds=bounds, method="highs", options=options)
        seconds += time.perf_counter() - t
        rounds += 1
        history.append(len(rows))
        status, message = int(res.status), str(res.message)
        if res.x is None:  # no solution came back (time limit before a feasible point, numerical trouble)
            ok = False
            u.zero_()
            xi.zero_()
            break
        x = torch.as_tensor(res.x, **f64)
        u = torch.minimum(torch.maximum(x[:K], lb), ub)                     # HiGHS may overshoot a bound by ~1e-9
        xi = x[n_u:].clamp(min=0.0)
        objective = float(res.fun)
        # every input against every class on the linear model: add the violated rows not in the LP yet
        z = z0 + (S * u) @ lin.v
        marg = z.gather(1, label[:, None]) - z                           # [N, C]
        viol = (marg < margin - xi[:, None] - tol) & ~in_lp
        viol.scatter_(1, label[:, None], False)
        n_violated = int(viol.sum())
        if n_violated == 0 or rounds >= max_rounds or status != 0:
            break
        new = viol.nonzero()
        in_lp[new[:, 0], new[:, 1]] = True
        rows = torch.cat([rows, new])
        add_rows(new)
    delta = u * scale
    return LPSolution(delta=delta, u=u, slack=xi, rows=rows, lower=lb * scale, upper=ub * scale, status=status,
                      message=message, ok=ok, rounds=rounds, n_rows=int(A_ub.shape[0]), nnz=int(A_ub.nnz),
                      n_vars=len(cost), seconds=seconds, violated=n_violated, objective=objective,
                      row_history=history)


# ------------------------------------------------------------------------------------------------ the module
@register_repair("lp", optimises="per trust-region LP step: the fitness-weighted hinge on first-order logit margins "
                                 "+ norm_weight ||delta / std||; a step is kept only if the exact repair fitness rises")
class LPRepair(RepairModule):
    """Sequential linear programming on the located weights (see the module docstring): each step solves an LP on
    the first-order (sigma-frozen) model of the FFN head within a trust region and keeps the result only when the
    exact repair fitness improves. One training step = one LP step; logs ``repair/best_fitness``,
    ``repair/n_patched``, ``repair/n_broken`` (exact, of the best point) and ``repair/radius`` (after the step).

    Options: ``steps`` (8), ``radius`` (1.0: initial trust region in units of the weight matrix's std),
    ``margin`` (0.1 logits), ``norm`` ("l1" | "linf"), ``norm_weight`` (1e-3), ``max_rounds`` (5 cutting-plane
    solves per step), ``time_limit`` (seconds per LP solve; None = no limit), ``hinge`` ("relative" |
    "absolute": each input's slack in units of its own hinge at the step's start, or in logits)."""

    #: refused up front on a token head (RepairModule.refuse_token_head)
    token_head_refusal = (
        "its linear programs need the logits as LayerNorm -> Linear of the block output (linear in the located "
        "W_aft weights once the final LayerNorm's sigma is frozen); on a block other than the last (or through the "
        "pooling of an average-pooled model) the located weights reach the logits through the later blocks' "
        "attention, LayerNorms and FFNs, so that first-order model is neither exact nor what 'lp' checks "
        "(repair that block with 'de', 'finetune', 'prune' or 'reinit', which run on the exact head)")

    RHO_GOOD = 0.75          # predicted-vs-exact fitness gain ratio above which an accepted step doubles the radius
    RADIUS_CAP = 8.0         # the radius grows to at most this multiple of its initial value
    RADIUS_MIN = 1.0 / 64    # the search stops once the radius falls below this multiple of its initial value

    option_ranges = {"steps": (1, None), "radius": Range(0, None, lo_open=True), "margin": (0, None),
                     "norm_weight": (0, None), "max_rounds": (1, None), "time_limit": Range(0, None, lo_open=True)}
    option_choices = {"norm": NORMS, "hinge": HINGES}

    def __init__(self, head, weights, x_neg, label_neg, x_pos, label_pos, seed: int = 0, alpha: float = 10.0,
                 fitness: str = "arachne", loss: str = "logits", steps: int = 8, radius: float = 1.0,
                 margin: float = 0.1, norm: str = "l1", norm_weight: float = 1e-3, max_rounds: int = 5,
                 time_limit: float | None = None, hinge: str = "relative"):
        super().__init__(head, weights, x_neg, label_neg, x_pos, label_pos, seed, alpha, fitness, loss)
        self.automatic_optimization = False
        head_parts(self.head)                      # refuse an unsupported head before any Trainer starts
        activation_derivative(self.head.act)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise RepairInputError(f"lp: steps must be an integer >= 1, got {steps!r}")
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise RepairInputError(f"lp: radius must be a finite number > 0 (matrix-std units), got {radius!r}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise RepairInputError(f"lp: margin must be a finite number >= 0 (logit units), got {margin!r}")
        if norm not in NORMS:
            raise RepairInputError(f"lp: unknown norm {norm!r}; expected one of {NORMS}")
        if not (isinstance(norm_weight, (int, float)) and math.isfinite(norm_weight) and norm_weight >= 0):
            raise RepairInputError(f"lp: norm_weight must be a finite number >= 0, got {norm_weight!r}")
        if isinstance(max_rounds, bool) or int(max_rounds) != max_rounds or max_rounds < 1:
            raise RepairInputError(f"lp: max_rounds must be an integer >= 1, got {max_rounds!r}")
        if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
            raise RepairInputError(f"lp: time_limit must be None or a number of seconds > 0, got {time_limit!r}")
        if hinge not in HINGES:
            raise RepairInputError(f"lp: unknown hinge {hinge!r}; expected one of {HINGES}")
        self.lp_options = {"steps": int(steps), "radius": float(radius), "margin": float(margin), "norm": norm,
                           "norm_weight": float(norm_weight), "max_rounds": int(max_rounds),
                           "time_limit": None if time_limit is None else float(time_limit), "hinge": hinge}
        lo, hi, sd = (torch.empty(len(self.weights), dtype=torch.float64) for _ in range(3))
        for k, W in enumerate(self.head.weights()):
            sel = self.weights[:, 0] == k
            lo[sel], hi[sel] = matrix_bounds(W.detach())
            std = matrix_init_stats(W.detach())[1]
            sd[sel] = std if std > 0 else 1.0
        self._lo, self._hi, self._scale = lo, hi, sd
        self._input_weight = input_weights(self.is_neg.cpu(), alpha, fitness)
        self._fitness = None
        self._restored: dict[str, Any] | None = None
        self.slp: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------------------- bookkeeping
    @property
    def max_steps(self) -> int:
        return self.lp_options["steps"]

    def options(self) -> dict[str, Any]:
        return dict(self.lp_options)

    def _exact(self, values: Tensor) -> dict[str, Any]:
        res = self._fitness(values[None])
        return {"fitness": float(res.fitness[0]), "n_patched": int(res.n_patched[0]),
                "n_broken": int(res.n_broken[0])}

    def _as_head_dtype(self, values: Tensor) -> Tensor:
        """Values rounded to the head's dtype (what a patch writes), held in float64."""
        return values.to(self.head.fc_bef.weight.dtype).to(torch.float64)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        t = time.perf_counter()
        self._fitness = self.fitness_evaluator()
        self.timings["fitness_setup_s"] = self.timings.get("fitness_setup_s", 0.0) + time.perf_counter() - t
        if self._restored is not None:
            self.slp, self._restored = self._restored, None
            return
        if self.slp is not None:
            return
        cur = self._as_head_dtype(self.old_values.to(torch.float64))
        ex = self._exact(cur)
        self.slp = {"step": 0, "current": cur, "current_exact": ex, "best": cur.clone(), "best_exact": dict(ex),
                      "best_step": 0, "radius": self.lp_options["radius"], "accepted": 0, "done": False,
                      "stop_reason": None, "lp_seconds": 0.0, "lp_solves": 0, "lp_rows_max": 0, "lp_nnz_max": 0,
                      "last": {}, "original_exact": dict(ex)}

    # ---------------------------------------------------------------------------------------------- one step
    def lp_step(self) -> dict[str, Any]:
        """One SLP step on the module's state (see the module docstring); returns the step's record."""
        st, o = self.slp, self.lp_options
        cur = st["current"]
        t0 = time.perf_counter()
        lin = linearize(self.head, self.weights, cur, self.x)
        sol = solve_margin_lp(lin, self.label, self.is_neg, self._input_weight, self._scale, self._lo - cur,
                              self._hi - cur, radius=st["radius"], margin=o["margin"], norm=o["norm"],
                              norm_weight=o["norm_weight"], max_rounds=o["max_rounds"], time_limit=o["time_limit"],
                              hinge=o["hinge"])
        cand = self._as_head_dtype(torch.minimum(torch.maximum(cur + sol.delta.cpu(), self._lo), self._hi))
        ex = self._exact(cand)                                          # the exact head decides
        pred = repair_fitness(lin.logits((cand - cur).to(lin.s.device)), self.label, self.is_neg,
                              **self.fitness_options)
        pred = {"fitness": float(pred.fitness), "n_patched": int(pred.n_patched), "n_broken": int(pred.n_broken)}
        gain_pred = pred["fitness"] - st["current_exact"]["fitness"]
        gain = ex["fitness"] - st["current_exact"]["fitness"]
        rho = gain / gain_pred if gain_pred > 0 else float("nan")
        moved = bool((cand != cur).any())
        accepted = moved and ex["fitness"] > st["current_exact"]["fitness"]
        radius_used = st["radius"]
        st["step"] += 1
        if accepted:
            st["current"], st["current_exact"] = cand, ex
            st["accepted"] += 1
            if rho >= self.RHO_GOOD:
                st["radius"] = min(2.0 * st["radius"], self.RADIUS_CAP * o["radius"])
        else:
            st["radius"] = 0.5 * st["radius"]
        if st["current_exact"]["fitness"] > st["best_exact"]["fitness"]:  # ties: the earlier
            st["best"], st["best_exact"], st["best_step"] = st["current"].clone(), dict(st["current_exact"]), st["step"]
        st["lp_seconds"] += sol.seconds
        st["lp_solves"] += sol.rounds
        st["lp_rows_max"] = max(st["lp_rows_max"], sol.n_rows)
        st["lp_nnz_max"] = max(st["lp_nnz_max"], sol.nnz)
        slack = float(sol.slack.sum())
        ce = st["current_exact"]
        if ce["n_patched"] == self.n_neg and ce["n_broken"] == 0:  # the fitness's maximum: nothing can beat it
            st["done"], st["stop_reason"] = True, "repaired"
        elif sol.ok and not moved:
            st["done"], st["stop_reason"] = True, "stationary"
        elif st["radius"] < self.RADIUS_MIN * o["radius"]:
            st["done"], st["stop_reason"] = True, "radius"
        elif st["step"] >= o["steps"]:
            st["done"], st["stop_reason"] = True, "steps"
        st["last"] = {"step": st["step"], "accepted": accepted, "radius_used": radius_used, "rho": rho,
                      "predicted_fitness": pred["fitness"], "predicted_n_patched": pred["n_patched"],
                      "predicted_n_broken": pred["n_broken"], "exact_fitness": ex["fitness"],
                      "exact_n_patched": ex["n_patched"], "exact_n_broken": ex["n_broken"], "slack": slack,
                      "lp_status": sol.status, "lp_message": sol.message, "lp_rounds": sol.rounds,
                      "lp_rows": sol.n_rows, "lp_nnz": sol.nnz, "lp_vars": sol.n_vars, "lp_seconds": sol.seconds,
                      "lp_violated": sol.violated, "max_abs_u": float(sol.u.abs().max()),
                      "step_seconds": time.perf_counter() - t0}
        return st["last"]

    def training_step(self, batch, batch_idx):
        if self.slp["done"]:  # e.g. resumed from a checkpoint of a finished search
            self.trainer.should_stop = True
            return None
        t = time.perf_counter()
        self.lp_step()
        self.timings["search_s"] = self.timings.get("search_s", 0.0) + time.perf_counter() - t
        self._count_step()
        best = self.slp["best_exact"]
        self.log("repair/best_fitness", best["fitness"], prog_bar=True, on_step=True, batch_size=1)
        self.log_dict({"repair/n_patched": float(best["n_patched"]), "repair/n_broken": float(best["n_broken"]),
                       "repair/radius": float(self.slp["radius"])}, on_step=True, batch_size=1)
        if self.slp["done"]:
            self.trainer.should_stop = True
        return None

    # ---------------------------------------------------------------------------------------------- results
    def new_values(self) -> Tensor:
        if self.slp is None:
            raise RuntimeError("lp has not run yet: call Trainer.fit (or fit_repair) first")
        return self.slp["best"]

    def search_summary(self) -> dict[str, Any]:
        st = self.slp
        if st is None:
            return {}
        solves = max(st["lp_solves"], 1)
        last = st["last"]
        return {"steps_run": st["step"], "accepted_steps": st["accepted"], "best_step": st["best_step"],
                "radius_initial": self.lp_options["radius"], "radius_final": st["radius"],
                "lp_solves": st["lp_solves"], "lp_seconds": st["lp_seconds"],
                "lp_seconds_per_solve": st["lp_seconds"] / solves, "lp_rows_last": last.get("lp_rows"),
                "lp_nnz_last": last.get("lp_nnz"), "lp_rows_max": st["lp_rows_max"], "lp_nnz_max": st["lp_nnz_max"],
                "fitness_best": st["best_exact"]["fitness"], "best_n_patched": st["best_exact"]["n_patched"],
                "best_n_broken": st["best_exact"]["n_broken"],
                "last_step": {k: v for k, v in last.items() if k != "lp_message"},
                "last_lp_message": last.get("lp_message"), "stop_reason": st["stop_reason"]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.slp is not None:
            checkpoint["repair_lp"] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.slp.items()}
            checkpoint["repair_weights"] = self.weights.clone()
            checkpoint["repair_options"] = dict(self.lp_options)
            checkpoint["repair_timings"] = dict(self.timings)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "repair_lp" not in checkpoint:
            return
        if not torch.equal(checkpoint["repair_weights"], self.weights):
            raise RepairInputError("the checkpoint's LP repair was run on other located weights")
        if checkpoint.get("repair_options") != self.lp_options:
            raise RepairInputError(f"the checkpoint's LP repair used options {checkpoint.get('repair_options')}, "
                                   f"this one {self.lp_options}")
        self._restored = dict(checkpoint["repair_lp"])
        self.timings.update(checkpoint.get("repair_timings", {}))
