"""Repair fitness (docs/methods.md, section 6) and three evaluators of it for a whole population of candidate values of the
located weights.

Fitness (maximised; Arachne, ``variant="arachne"``)::

    F = (N_intact + sum_{x in I_pos, now wrong} 1/(L(x)+1))
        + alpha (N_patched + sum_{x in I_neg, still wrong} 1/(L(x)+1))

with L the cross-entropy on the logits, N_intact the inputs of I_pos still correct and N_patched the inputs of
I_neg now correct. ``variant="reptran"`` (RepTran's normalised form; no rescaling of Arachne's unless
|I_pos| = |I_neg|)::

    F = 1/(1+alpha) * bracket_pos / |I_pos| + alpha/(1+alpha) * bracket_neg / |I_neg|

``loss="softmax_ce"`` reproduces an upstream quirk (cross-entropy applied to softmax probabilities,
L = logsumexp(p) - p_y with p = softmax(logits)); the default ``"logits"`` is L = logsumexp(z) - z_y.

Evaluators (all return :class:`FitnessResult` for ``values [P, K]``, the candidate values of the K located weights):

- :class:`LoopFitness` (``"loop"``): the published way, one candidate at a time: write the values into a copy of
  the FFN head, run the whole head on every cached input. Cost per candidate and input ~ 2 d 4d + d C MACs.
- :class:`FullBatchFitness` (``"full"``): the whole head batched over a chunk of candidates (one weight matrix
  per candidate, ``bmm``). Same arithmetic, fewer Python calls.
- :class:`SparseFitness` (``"sparse"``, the default): only the located weights differ between candidates, so the
  unchanged part is computed once for every cached x (h = LN(x), z0 = W_bef h + b_bef, a0 = GELU(z0),
  o0 = W_aft a0 + b_aft, r0 = x + ls(o0)) and each candidate's change is applied as a sparse update:

  * changed W_bef weights (j, c) change z of their neurons j only: dz_j = sum_c dW_bef[j, c] h_c, so GELU is
    recomputed for the touched neurons J alone, u_J = GELU(z0_J + dz_J) - a0_J;
  * changed W_aft weights (i, j) add dW_aft[i, j] a_j to output i (with a_j the new activation when j is in J),
    grouped per output row I: S_i = sum_j dW_aft[i, j] a_j;
  * so the FFN output changes by delta = ls * (W_aft[:, J] u_J + e_I S_I) (f = [u_J; S_I], m = |J| + |I| features).

  Two kernels finish the job (``kernel="auto"`` takes the cheaper by MAC count):

  * ``"explicit"``: delta in d-space ([P N, |J|] x [|J|, d] plus a scatter into the rows I), r = r0 + delta,
    logits = post(r) with the head's own ``post`` (any post); ~ |J| d + d C MACs per candidate and input;
  * ``"folded"`` (post = LayerNorm -> Linear, as HF and timm with token pooling; layer scale identity or
    ``gamma``): the LayerNorm and the classifier are folded into the features u_J and S' = ls_I S_I. With
    B_J = ls * W_aft[:, J] (``[d, |J|]``), G = diag(gamma_LN) W_cls^T (``[d, C]``), r0_c = r0 - mean(r0)::

        delta . G     = u (B_J^T G) + S' G_I                                  (the classifier's linear part)
        sum(delta)    = u . colsum(B_J) + sum(S')
        r0_c . delta  = u . (B_J^T r0_c) + S' . r0_c[I]
        |delta|^2     = u^T (B_J^T B_J) u + 2 u^T B_J[I]^T S' + |S'|^2        (the e_i are orthonormal)
        mean(r) = mean(r0) + sum(delta) / d
        var(r)  = (|r0_c|^2 + 2 r0_c . delta + |delta|^2 - sum(delta)^2 / d) / d
        logits  = (r0 G + delta G - mean(r) 1^T G) / sqrt(var(r) + eps) + beta_LN W_cls^T + b_cls

    With s = 1^T G, b' = beta_LN W_cls^T + b_cls and std = sqrt(var(r) + eps), the logits times std are linear
    in the features f = [u_J; S'_I; std] plus a per-input base (the mean's change sum(delta)/d = f . [colsum; 1]/d
    folds into the product, the bias into the std feature)::

        z std = f^T M + base,   M = [B_J^T G - colsum s^T / d;  G_I - 1 s^T / d;  b'],   base = r0 G - mean(r0) s

    and var(r) d = |r_c|^2 = |r0_c + delta|^2 - sum(delta)^2 / d needs no [p N]-wide pass per term: split d-space
    into the rows I and the rest ~I and take a thin QR of the rest of B_J, B_J[~I] = Q R (Q orthonormal
    ``[d - |I|, k]``, k = min(d - |I|, |J|)); since B_J[~I]^T (1 - Q Q^T) = 0::

        |r0_c + delta|^2 = |S' + B_J[I] u + r0_c[I]|^2 + |R u + Q^T r0_c[~I]|^2 + |(1 - Q Q^T) r0_c[~I]|^2

    (the last term is per input: no candidate changes it). So var(r) is one ``[|I| + k + 1, |J|] x [|J|, p N]``
    product ([B_J[I]; R; colsum] u, the last row giving colsum . u for sum(delta)) added onto per-input constants,
    then one sum of squares. Per chunk of candidates one ``[p N, m + 1] x [m + 1, C]`` product writes the only
    ``[p N, C]`` tensor: ~ (|J| + |I| + 1) C + |J| (|I| + k + 1) MACs per candidate and input, growing with the
    touched neurons and rows, not with the layer. ``"auto"`` takes it whenever the head is foldable and its MACs
    are below 1.5 x the explicit kernel's (it writes no ``[p N, d]`` tensors, so it wins at equal MACs).

  The fitness pass is fused (:meth:`SparseFitness.__call__`): since std > 0, the prediction test runs on z std
  (the label's logit against the largest other logit, an exact tie resolved like ``argmax``: the first index
  wins), and the loss (logsumexp minus the label logit) is computed only for the inputs still wrong (on CUDA: for
  all, to avoid a host synchronisation); ``epilogue="compiled"`` runs :func:`fused_scores` through
  ``torch.compile`` instead (one read of the logits for the base, the test, logsumexp and the label logit, for
  every input). Work tensors are reused across chunks and generations. W_aft weights on
  the columns of touched neurons (which see the new activation) are one ``bmm`` per chunk with the per-candidate
  [|I|, |J|] matrix of their changes when that is cheap, else an ``index_add_`` into their rows. The touched
  neurons' new pre-activations z0_J + dz_J come from one grouped product with z0_J as its bias, and an exact GELU
  (or ReLU) is applied in place.

**Any block's FFN** (a :class:`~vitfl.localization.ffn.TokenFFNHead`, ``ffn_head(model, block)``: the cached
states are every token entering block L's FFN, ``x [N, T, d]``, and ``post`` is the rest of the network). Every
evaluator gives the exact fitness there too. The FFN acts on each token alone, so the sparse update above is exact
per token: SparseFitness computes u_J, S_I for all N T token rows and the FFN output's change delta ``[p, N, T, d]``
(explicit kernel), adds it to the unchanged block output r0 = x + ls(o0) and runs ``post`` (the later blocks, the
final norm, the pooling and the classifier) per candidate, in chunks of candidates that bound the ``[p N, T, .]``
work tensors of the later blocks. The folded kernel is not exact there (post is not LayerNorm -> Linear): ``"auto"``
takes the explicit kernel and ``info()`` records it (``"kernel": "explicit"``, ``"states": "tokens"``);
``kernel="folded"`` on a token head is an error. The cost per candidate is the later blocks' forward on N T tokens
(benchmarks/ffn_block_cost.py); the last-block CLS head's path is unchanged.

``tests/test_repair_fitness.py`` checks every evaluator and kernel against :class:`LoopFitness` in float64;
``tests/test_block_repair.py`` checks them on token heads against the full model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vitfl.lightning_modules.repair.patch import RepairInputError, check_weights, read_values, write_values
from vitfl.localization.ffn import FFNHead

__all__ = ["FITNESS_VARIANTS", "LOSSES", "EPILOGUES", "EVALUATORS", "FitnessResult", "NonFiniteFitnessError",
           "repair_fitness", "combine_scores", "per_input_loss", "fused_scores", "PopulationFitness", "LoopFitness",
           "FullBatchFitness", "SparseFitness", "kernel_macs", "make_fitness"]

FITNESS_VARIANTS = ("arachne", "reptran")
LOSSES = ("logits", "softmax_ce")
EPILOGUES = ("eager", "compiled")


class NonFiniteFitnessError(FloatingPointError):
    """A fitness came out NaN or inf (a bad cached state or head weight); the search cannot rank candidates."""


@dataclass
class FitnessResult:
    """``fitness [P]`` (float64), ``n_patched [P]`` (I_neg inputs now correct), ``n_broken [P]`` (I_pos inputs
    now wrong)."""

    fitness: Tensor
    n_patched: Tensor
    n_broken: Tensor

    def __getitem__(self, idx) -> "FitnessResult":
        return FitnessResult(self.fitness[idx], self.n_patched[idx], self.n_broken[idx])

    @staticmethod
    def cat(parts: list[FitnessResult]) -> FitnessResult:
        """The results of consecutive chunks of candidates, as one."""
        return FitnessResult(*(torch.cat([getattr(r, k) for r in parts]) for k in ("fitness", "n_patched", "n_broken")))


def per_input_loss(logits: Tensor, label: Tensor, loss: str = "logits") -> Tensor:
    """Cross-entropy per input, ``logits [..., N, C]``, ``label [N]`` -> ``[..., N]``.

    ``"logits"``: L = logsumexp(z) - z_y;  ``"softmax_ce"`` (upstream quirk): the same applied to softmax(z)."""
    if loss not in LOSSES:
        raise RepairInputError(f"unknown fitness loss {loss!r}; expected one of {LOSSES}")
    z = logits.softmax(-1) if loss == "softmax_ce" else logits
    idx = label.view(*([1] * (z.ndim - 2)), -1, 1).expand(*z.shape[:-1], 1)
    return torch.logsumexp(z, -1) - z.gather(-1, idx).squeeze(-1)


def fused_scores(z: Tensor, label: Tensor, base: Tensor | None = None, istd: Tensor | None = None,
                 loss: str = "logits") -> tuple[Tensor, Tensor]:
    """Per-input fitness terms of candidate logits in one pass: ``z [p, N, C]`` (with ``base [N, C]`` and
    ``istd [p, N]``: the logits are ``(z + base) * istd``, ``istd > 0``), ``label [N]`` -> (score ``[p, N]``
    float64: 1 where argmax == label, else 1 / (L + 1); correct ``[p, N]`` bool).

    The prediction test is argmax's, the first index winning a tie: the label's logit beats every logit before it
    and is not below any after it. Written for ``torch.compile`` (``SparseFitness(epilogue="compiled")``), which
    fuses the base, the test, logsumexp and the label logit into one read of ``z``; eager, it is several passes."""
    if base is not None:
        z = z + base
    c = torch.arange(z.shape[-1], device=z.device)
    y = label[:, None]                                                       # [N, 1]
    zy = z.gather(-1, y.expand(z.shape[0], -1, 1)).squeeze(-1)               # [p, N]
    before = torch.where(c < y, z, float("-inf")).amax(-1)
    after = torch.where(c > y, z, float("-inf")).amax(-1)
    correct = (zy > before) & (zy >= after)
    L = per_input_loss(z * istd[..., None] if istd is not None else z, label, loss)
    return torch.where(correct, 1.0, 1.0 / (L.double() + 1.0)), correct


_COMPILED_SCORES: Any = None


def _compiled_scores(*args: Any) -> tuple[Tensor, Tensor]:
    """:func:`fused_scores` through ``torch.compile`` (compiled once per process, dynamic shapes: any p, N, C)."""
    global _COMPILED_SCORES
    if _COMPILED_SCORES is None:
        _COMPILED_SCORES = torch.compile(fused_scores, dynamic=True)
    try:
        return _COMPILED_SCORES(*args)
    except Exception as e:  # a missing C++ compiler (CPU) or Triton (CUDA) surfaces here, on the first call
        raise RepairInputError(f"epilogue='compiled': torch.compile of the fitness pass failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); use epilogue='eager'") from e


def repair_fitness(logits: Tensor, label: Tensor, is_neg: Tensor, alpha: float = 10.0, variant: str = "arachne",
                   loss: str = "logits") -> FitnessResult:
    """Fitness of each candidate from its logits ``[P, N, C]`` (or ``[N, C]`` for one) on I_neg and I_pos.

    ``label [N]``, ``is_neg [N]`` bool (True: the input is in I_neg, else in I_pos). Returns ``[P]`` tensors.

    >>> z = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])      # one candidate, two inputs, both predicted right
    >>> repair_fitness(z, torch.tensor([0, 1]), torch.tensor([True, False])).fitness
    tensor([11.], dtype=torch.float64)
    """
    if variant not in FITNESS_VARIANTS:
        raise RepairInputError(f"unknown fitness variant {variant!r}; expected one of {FITNESS_VARIANTS}")
    single = logits.ndim == 2
    lg = logits.unsqueeze(0) if single else logits
    is_neg = is_neg.to(torch.bool)
    correct = lg.argmax(-1) == label
    # a correct input scores 1 whatever its loss: the loss is needed for the wrong ones only
    score = torch.ones(correct.shape, dtype=torch.float64, device=lg.device)
    wrong = ~correct
    if bool(wrong.any()):
        p_idx, n_idx = wrong.nonzero(as_tuple=True)
        L = per_input_loss(lg[p_idx, n_idx].unsqueeze(0), label[n_idx], loss)[0]
        score[p_idx, n_idx] = 1.0 / (L.double() + 1.0)  # sums in float64: candidates are ranked by them
    res = combine_scores(score, correct, is_neg, alpha, variant)
    return res[0] if single else res


def combine_scores(score: Tensor, correct: Tensor, is_neg: Tensor, alpha: float, variant: str,
                   counts: tuple[int, int] | None = None) -> FitnessResult:
    """The fitness (module docstring) from per-input terms: ``score [P, N]`` float64 (1 where right, else
    1 / (L + 1)), ``correct [P, N]``, ``is_neg [N]``; ``counts`` (|I_neg|, |I_pos|) when known (no host sync)."""
    w_neg = is_neg.to(torch.float64)
    neg = score @ w_neg
    pos = score @ (1.0 - w_neg)
    if variant == "arachne":
        fit = pos + alpha * neg
    else:
        n_neg, n_pos = counts if counts is not None else (int(is_neg.sum()), int((~is_neg).sum()))
        fit = (alpha / (1.0 + alpha)) * neg / max(n_neg, 1) + (1.0 / (1.0 + alpha)) * pos / max(n_pos, 1)
    return FitnessResult(fit, (correct & is_neg).sum(-1), (~correct & ~is_neg).sum(-1))


class PopulationFitness:
    """Base of the evaluators: the fitness of candidate values ``[P, K]`` of the located weights ``[K, 3]`` on the
    cached states ``x [N, d]`` (I_neg and I_pos together, ``is_neg [N]``), ``label [N]``.

    The head is not modified (evaluators that write weights use a private copy). Values are cast to the head's
    dtype; every evaluation checks that the fitness is finite (:class:`NonFiniteFitnessError` otherwise)."""

    name: ClassVar[str] = "?"

    def __init__(self, head: FFNHead, weights: Tensor, x: Tensor, label: Tensor, is_neg: Tensor, alpha: float = 10.0,
                 variant: str = "arachne", loss: str = "logits"):
        if variant not in FITNESS_VARIANTS:
            raise RepairInputError(f"unknown fitness variant {variant!r}; expected one of {FITNESS_VARIANTS}")
        if loss not in LOSSES:
            raise RepairInputError(f"unknown fitness loss {loss!r}; expected one of {LOSSES}")
        p = head.fc_bef.weight
        self.dtype, self.device = p.dtype, p.device
        self.head = head
        self.weights = check_weights(weights, head.index)
        x = torch.as_tensor(x)
        #: whether the states carry a token axis (a TokenFFNHead: x [N, T, d]); False: CLS states [N, d]
        self.tokens = bool(getattr(head, "token_axis", False))
        if self.tokens:
            if x.ndim != 3 or x.shape[2] != head.d or x.shape[1] < head.min_tokens:
                raise RepairInputError(f"the FFN head of block {head.block} takes the token states entering that "
                                       f"block's FFN, [N, T >= {head.min_tokens}, d={head.d}], got {tuple(x.shape)}")
        elif x.ndim != 2 or x.shape[1] != head.d:
            raise RepairInputError(f"cached states must be [N, d={head.d}], got {tuple(x.shape)}")
        label = torch.as_tensor(label).to(torch.long).reshape(-1)
        is_neg = torch.as_tensor(is_neg).to(torch.bool).reshape(-1)
        if not (len(x) == len(label) == len(is_neg)):
            raise RepairInputError(f"x, label and is_neg differ in length: {len(x)}, {len(label)}, {len(is_neg)}")
        if not bool(is_neg.any()):
            raise RepairInputError("I_neg is empty: there is nothing to repair")
        if not bool(torch.isfinite(x).all()):
            raise RepairInputError(f"{int((~torch.isfinite(x)).reshape(len(x), -1).any(1).sum())} cached states hold "
                                   "NaN or inf")
        self.x = x.to(self.device, self.dtype)
        #: the states as FFN rows ``[N T, d]`` (token heads; the FFN acts per token) or ``[N, d]`` (``x`` itself)
        self.x_rows = self.x.reshape(-1, head.d) if self.tokens else self.x
        #: the shape of one input's state (post's input per input): ``(T, d)`` or ``(d,)``
        self.state_shape = tuple(self.x.shape[1:])
        self.label = label.to(self.device)
        self.is_neg = is_neg.to(self.device)
        self.alpha, self.variant, self.loss = float(alpha), variant, loss
        with torch.no_grad():
            self.num_classes = head.post(self.x[:1] * 0).shape[-1]
        if int(label.min()) < 0 or int(label.max()) >= self.num_classes:
            raise RepairInputError(f"labels outside 0..{self.num_classes - 1}")
        self.old = read_values(head, self.weights)  # [K]
        self.evaluations = 0

    @property
    def n(self) -> int:
        return len(self.x)

    def logits_chunks(self, values: Tensor):  # pragma: no cover - abstract
        """Yields the logits ``[p, N, C]`` of consecutive chunks of candidates."""
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, values: Tensor) -> Tensor:
        """Logits ``[P, N, C]`` of every candidate on every cached input."""
        return torch.cat(list(self.logits_chunks(self._values(values))))

    def _values(self, values: Tensor) -> Tensor:
        values = torch.as_tensor(values)
        if values.ndim == 1:
            values = values.unsqueeze(0)
        if values.ndim != 2 or values.shape[1] != len(self.weights):
            raise RepairInputError(f"candidate values must be [P, K={len(self.weights)}], got {tuple(values.shape)}")
        return values.to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, values: Tensor) -> FitnessResult:
        values = self._values(values)
        parts = [repair_fitness(lg, self.label, self.is_neg, self.alpha, self.variant, self.loss)
                 for lg in self.logits_chunks(values)]
        res = FitnessResult.cat(parts)
        return self._counted(res, len(values))

    def _counted(self, res: FitnessResult, n: int) -> FitnessResult:
        """Count ``n`` evaluations and refuse a non-finite fitness (the search could not rank it)."""
        self.evaluations += n
        if not bool(torch.isfinite(res.fitness).all()):
            bad = int((~torch.isfinite(res.fitness)).sum())
            raise NonFiniteFitnessError(
                f"{bad} of {n} candidates have a NaN/inf fitness: the cached states or the head's weights "
                "hold non-finite values (or the candidate values overflow); re-create the state cache")
        return res

    def info(self) -> dict[str, Any]:
        out = {"evaluator": self.name, "n_weights": len(self.weights),
               "n_bef": int((self.weights[:, 0] == 0).sum()), "n_aft": int((self.weights[:, 0] == 1).sum()),
               "n_inputs": self.n, "n_neg": int(self.is_neg.sum()), "dtype": str(self.dtype).replace("torch.", "")}
        if self.tokens:  # a token head: which block, how many tokens, and that post runs the later blocks
            out.update({"states": "tokens", "block": self.head.block, "tokens": int(self.x.shape[1]),
                        "later_blocks": len(getattr(self.head.post, "blocks", ()))})
        return out


class LoopFitness(PopulationFitness):
    """One candidate at a time on a copy of the whole head (the published way)."""

    name = "loop"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._work = self.head.copy().eval()

    def logits_chunks(self, values: Tensor):
        try:
            for v in values:
                write_values(self._work, self.weights, v)
                yield self._work(self.x).unsqueeze(0)
        finally:
            write_values(self._work, self.weights, self.old)


class FullBatchFitness(PopulationFitness):
    """The whole head batched over chunks of candidates: per candidate its own W_bef, W_aft (``bmm``)."""

    name = "full"

    def __init__(self, *args, chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        h = self.head
        with torch.no_grad():
            self._h = h.norm(self.x)
        d, d_ff, n = h.d, h.d_ff, len(self.x_rows)  # n: FFN rows (inputs, or input tokens of a token head)
        # two matrices and z, a per candidate; keep a chunk around 2^25 elements
        self.chunk_size = chunk_size or max(1, (1 << 25) // (2 * d * d_ff + 2 * n * d_ff + 2 * n * d))
        m, r, c = self.weights.to(self.device).unbind(1)
        self._sel = [(m == k, r[m == k], c[m == k]) for k in (0, 1)]

    def logits_chunks(self, values: Tensor):
        h = self.head
        (Wb, Wa), bb, ba = h.weights(), h.fc_bef.bias, h.fc_aft.bias
        for v in values.split(self.chunk_size):
            p = len(v)
            mats = []
            for W, (sel, r, c) in zip((Wb, Wa), self._sel):
                Wp = W.detach().expand(p, *W.shape).clone()
                Wp[:, r, c] = v[:, sel]
                mats.append(Wp)
            if self.tokens:  # token rows [N T, d]; post takes each input's [T, d]
                z = torch.bmm(self._h.reshape(1, -1, h.d).expand(p, -1, -1), mats[0].mT)
            else:
                z = torch.bmm(self._h.expand(p, -1, -1), mats[0].mT)
            if bb is not None:
                z += bb
            o = torch.bmm(h.act(z), mats[1].mT)
            if ba is not None:
                o += ba
            r_ = self.x_rows + h.layer_scale(o)
            yield h.post(r_.reshape(-1, *self.state_shape)).view(p, self.n, -1)


class _GroupedProduct:
    """out[g, p, n] = bias[g, n] + sum_{k in group g} w[p, k] src[k, n] for ``w [p, K]`` (per call), a fixed
    ``src [K, N]`` and an optional fixed ``bias [num_groups, N]``.

    The groups (e.g. the located weights of one neuron) are bucketed by size, each bucket padded to the next power
    of two (at most 2x the MACs) and computed with one ``bmm`` per bucket (one ``addcmul`` for groups of one), so
    no ``[K, p, N]`` intermediate is written. Output rows follow ``self.order`` (group ids, by bucket then id)."""

    def __init__(self, group: Tensor, num_groups: int, src: Tensor, bias: Tensor | None = None):
        group = group.cpu()
        sizes = torch.bincount(group, minlength=num_groups)
        bucket = torch.ceil(torch.log2(sizes.double())).long()
        self.order = torch.tensor(sorted(range(num_groups), key=lambda g: (int(bucket[g]), g)), dtype=torch.long)
        members = [[] for _ in range(num_groups)]
        for k, g in enumerate(group.tolist()):
            members[g].append(k)
        K, dev = len(group), src.device
        src_ext = torch.cat([src, src.new_zeros(1, src.shape[1])])            # row K: zeros (padding)
        self.buckets = []
        start = 0
        for b in sorted(set(bucket.tolist())):
            gs = [g for g in self.order.tolist() if int(bucket[g]) == b]
            kmax = 1 << b
            idx = torch.full((len(gs), kmax), K, dtype=torch.long)
            for i, g in enumerate(gs):
                idx[i, :len(members[g])] = torch.tensor(members[g])
            idx = idx.to(dev)
            bb = None if bias is None else bias[torch.tensor(gs, dtype=torch.long, device=bias.device)][:, None, :]
            self.buckets.append((start, start + len(gs), idx, src_ext[idx], bb))  # H: [g_b, kmax, N]
            start += len(gs)
        self.num_groups, self.N = num_groups, src.shape[1]

    def __call__(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        p = w.shape[0]
        w_ext = torch.cat([w, w.new_zeros(p, 1)], 1)
        out = w.new_empty(self.num_groups, p, self.N) if out is None else out.view(self.num_groups, p, self.N)
        for start, end, idx, H, bb in self.buckets:
            wb, o = w_ext[:, idx].permute(1, 0, 2), out[start:end]                 # [g_b, p, kmax]
            if idx.shape[1] == 1:  # groups of one: an outer product per group (one elementwise pass)
                torch.mul(wb, H, out=o) if bb is None else torch.addcmul(bb, wb, H, out=o)
            else:
                torch.bmm(wb, H, out=o)
                if bb is not None:
                    o.add_(bb)
        return out


def _inplace_act(act: nn.Module):
    """``act`` applied in place when it is an exact GELU or a ReLU (the work tensor is scratch: no fresh
    allocation per chunk); other activations run out of place."""
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return lambda z: torch.ops.aten.gelu_(z, approximate=act.approximate)
    if name == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu:  # transformers' GELU
        return lambda z: torch.ops.aten.gelu_(z)
    if isinstance(act, nn.ReLU):
        return torch.relu_
    return act


def _foldable_post(post: nn.Module, d: int) -> tuple[nn.LayerNorm, nn.Linear] | None:
    """(LayerNorm, Linear) when ``post`` is a Sequential of LayerNorm(d) -> Identity/Dropout* -> Linear, else None."""
    if not isinstance(post, nn.Sequential):
        return None
    leaves = []
    stack = list(post.children())
    while stack:
        mod = stack.pop(0)
        if isinstance(mod, nn.Sequential):
            stack = list(mod.children()) + stack
        elif not isinstance(mod, (nn.Identity, nn.Dropout)):
            leaves.append(mod)
    if (len(leaves) == 2 and type(leaves[0]) is nn.LayerNorm and tuple(leaves[0].normalized_shape) == (d,)
            and type(leaves[1]) is nn.Linear):
        return leaves[0], leaves[1]
    return None


def _layer_scale_vector(ls: nn.Module, d: int) -> Tensor | None:
    """ls as an elementwise vector when it is Identity or a LayerScale (``x * gamma``), else None."""
    if isinstance(ls, nn.Identity):
        return torch.ones(d)
    gamma = getattr(ls, "gamma", None)
    if type(ls).__name__ == "LayerScale" and isinstance(gamma, Tensor) and gamma.shape == (d,):
        return gamma.detach()
    return None


def _post_cost(post: nn.Module, d: int, tokens: int) -> tuple[int, int]:
    """(widest per-token work tensor, MACs per input) of a token head's ``post``: each later block's attention
    (q, k, v, proj: 4 d^2 per token, scores and mix: 2 T d) and MLP (2 d d_ff per token), then the readout."""
    macs, width = 0, d
    for blk in getattr(post, "blocks", ()):
        fc = [m for m in blk.modules() if isinstance(m, nn.Linear)]
        d_ff = max((m.out_features for m in fc), default=d)
        width = max(width, d_ff, 3 * d)
        macs += tokens * (4 * d * d + 2 * tokens * d + 2 * d * d_ff)
    lin = [m for m in post.modules() if isinstance(m, nn.Linear)]
    return width, macs + (lin[-1].in_features * lin[-1].out_features if lin else 0)


def kernel_macs(n_neurons: int, n_rows: int, d: int, num_classes: int) -> dict[str, int]:
    """Multiply-adds per candidate and input of the products of each :class:`SparseFitness` kernel, for
    ``n_neurons`` touched neurons |J| and ``n_rows`` touched output rows |I|: explicit |J| d + d C; folded
    (|J| + |I| + 1) C + |J| (|I| + k + 1), k = min(d - |I|, |J|) (see the module docstring)."""
    nJ, nI, C = n_neurons, n_rows, num_classes
    return {"explicit": nJ * d + d * C, "folded": (nJ + nI + 1) * C + nJ * (nI + min(d - nI, nJ) + 1)}


class _ExplicitKernel:
    """The explicit kernel (module docstring): the FFN output's change delta in d-space, added onto the residual
    stream, then the head's own ``post``; it works for any ``post`` and any layer scale.

    A kernel precomputes what its chunks share in ``__init__``; :meth:`terms` takes the :class:`SparseFitness` it
    serves per call (holding none: no reference cycle keeps the evaluator's work tensors alive)."""

    name = "explicit"
    base = None  # the terms are the logits: nothing to add

    def __init__(self, fit: SparseFitness, inter: dict[str, Tensor], lam: Tensor | None):
        """``inter``: the head's intermediates on the cached states; ``lam``: the layer scale as a vector (None:
        not elementwise, so it is applied to o_raw0 + delta per chunk)."""
        self._WJT = fit.head.fc_aft.weight.detach()[:, fit._J].T.contiguous()  # [|J|, d]
        self._lam_I = None  # the layer scale of the rows I when not folded into W_aft[:, J] (None: identity)
        self._linear_ls = lam is not None
        if lam is not None:
            if not bool((lam == 1).all()):
                self._WJT *= lam
                self._lam_I = lam[fit._I, None]
            self._onto = fit.x_rows + inter["o"]                             # r = r0 + delta
        else:
            self._onto = fit.head.fc_aft(inter["a"])                        # r = x + ls(o_raw0 + delta)

    def terms(self, fit: SparseFitness, v: Tensor) -> tuple[Tensor, None]:
        """The logits ``[p, N, C]`` of one chunk of candidates ``v [p, K]``, and None (no 1 / std)."""
        h, N, d, p = fit.head, fit.n, fit.head.d, len(v)
        R = fit._rows  # = N for CLS states; N T token rows for a token head
        u, S = fit._features(v - fit.old)
        delta = u.T @ self._WJT if u is not None else torch.zeros(p * R, d, dtype=fit.dtype, device=fit.device)
        if S is not None:
            if self._lam_I is not None:
                S = S * self._lam_I
            delta.index_add_(1, fit._I, S.T)
        delta = delta.view(p, R, d).add_(self._onto)
        r = delta if self._linear_ls else h.layer_scale(delta).add_(fit.x_rows)
        return h.post(r.view(p * N, *fit.state_shape)).view(p, N, -1), None


class _FoldedKernel:
    """The folded kernel (module docstring): the final LayerNorm and the classifier folded into the features
    f = [u_J; S'_I; std], so that z std = f^T M + base, and the only ``[p N, C]`` tensor of a chunk is one product.
    Needs post = LayerNorm -> Linear and an elementwise layer scale. Like :class:`_ExplicitKernel`, it is given
    its :class:`SparseFitness` per call."""

    name = "folded"

    def __init__(self, fit: SparseFitness, inter: dict[str, Tensor], lam: Tensor, fold: tuple[nn.LayerNorm, nn.Linear]):
        """``inter``: the head's intermediates on the cached states; ``lam``: the layer scale as a vector;
        ``fold``: the (LayerNorm, Linear) of ``post``."""
        h, dt, dev = fit.head, fit.dtype, fit.device
        d, C, J, I = h.d, fit.num_classes, fit._J, fit._I
        nI = len(I)
        ln, lin = fold
        r0 = fit.x + inter["o"]                                              # residual stream after the block
        BJ = lam[:, None] * h.fc_aft.weight.detach()[:, J]                   # [d, |J|]
        gamma = ln.weight.detach() if ln.weight is not None else torch.ones(d, dtype=dt, device=dev)
        beta = ln.bias.detach() if ln.bias is not None else torch.zeros(d, dtype=dt, device=dev)
        Wc = lin.weight.detach()
        G = gamma[:, None] * Wc.T                                            # [d, C]
        s = G.sum(0)                                                         # [C]
        bprime = beta @ Wc.T + (lin.bias.detach() if lin.bias is not None else 0)
        self._eps = ln.eps
        r0c = r0 - r0.mean(1, keepdim=True)
        colsum = BJ.sum(0)                                                   # [|J|]
        # features f = [u_J; S'_I; std] (feature-major [m + 1, p N]); the logits' numerator is one product
        #   z * std = f^T M + base,  M = [B_J^T G - colsum s^T / d;  G_I - 1 s^T / d;  b']   ([m + 1, C])
        #   base = r0 G - mean(r0) s                                                           ([N, C])
        # (the mean's change sum(delta)/d is linear in f and the bias times std is the last feature), so the
        # logits are never formed in d-space and only one [p N, C] tensor is written per chunk
        self._M = torch.cat([BJ.T @ G - colsum[:, None] * s[None, :] / d, G[I] - s[None, :] / d,
                             bprime.reshape(1, C).expand(1, C)], 0).contiguous()
        self.base = (r0 @ G - r0.mean(1, keepdim=True) * s[None, :]).contiguous()           # [N, C]
        # var(r) d = |r_c|^2 = |r0_c + delta|^2 - sum(delta)^2 / d (r0_c sums to zero), delta = E_I S' + B_J u.
        # Split d-space into the rows I and the rest ~I, and take a thin QR of the rest, B_J[~I] = Q R (Q
        # orthonormal [d - |I|, k], k = min(d - |I|, |J|)): since B_J[~I]^T (1 - Q Q^T) = 0,
        #   |r0_c + delta|^2 = |S' + B_J[I] u + r0_c[I]|^2 + |R u + Q^T r0_c[~I]|^2 + e,
        #   e = |(1 - Q Q^T) r0_c[~I]|^2   (per input; what no candidate changes),
        # so the whole variance is one product [B_J[I]; R; colsum] u added onto per-input constants, then one
        # sum of squares: (|I| + k + 1) |J| MACs, and no [p N]-wide pass per term. Computed in float64.
        notI = torch.ones(d, dtype=torch.bool, device=dev)
        notI[I] = False
        B64, r0c64 = BJ.double(), r0c.double()
        c1 = r0c64[:, I]                                                     # [N, |I|]
        rest = r0c64[:, notI]                                                # [N, d - |I|]
        if len(J):
            Q, R = torch.linalg.qr(B64[notI])                                # [d - |I|, k], [k, |J|]
            c2 = rest @ Q                                                    # [N, k]
            self._R = torch.cat([B64[I], R, B64.sum(0, keepdim=True)]).to(dt).contiguous()
            rest = rest - c2 @ Q.T
        else:
            c2 = rest[:, :0]
            self._R = None
        self._nY = nI + c2.shape[1]                                          # rows of y summed in squares
        self._cT = torch.cat([c1, c2], 1).T.to(dt).contiguous()              # [|I| + k, N]
        self._e = (rest * rest).sum(1).to(dt)                                # [N]
        self._lamI = None if bool((lam == 1).all()) else lam[I][:, None]     # [|I|, 1]; None: identity

    def terms(self, fit: SparseFitness, v: Tensor) -> tuple[Tensor, Tensor]:
        """One chunk of candidates ``v [p, K]``: (z * std - base ``[p, N, C]``, 1 / std ``[p, N]``), with z the
        logits and std = sqrt(var(r) + eps) of the final LayerNorm."""
        p, N, d = len(v), fit.n, fit.head.d
        nJ, nI, C, nY = len(fit._J), len(fit._I), fit.num_classes, self._nY
        f = fit._buffer("f", (fit.m + 1, p * N))                                     # [u; S'; std]
        u, S = fit._features(v - fit.old, f[:nJ] if nJ else None, f[nJ:nJ + nI] if nI else None)
        if S is not None and self._lamI is not None:
            S.mul_(self._lamI)                                                       # S' = lam_I S_I
        # y = [S' + r0_c[I]; Q^T r0_c[~I]; 0] + [B_J[I]; R; colsum] u: its first nY rows' squares sum to the
        # candidate's part of var(r) d, its last row is colsum . u (sum(delta) without S')
        y = fit._buffer("y", (nY + (nJ > 0), p, N))
        if nI:
            torch.add(S.view(nI, p, N), self._cT[:nI, None, :], out=y[:nI])
        y[nI:nY].copy_(self._cT[nI:, None, :])
        y = y.view(-1, p * N)
        sum_d = S.sum(0) if nI else None
        if nJ:
            y[nY].zero_()
            y.addmm_(self._R, u)
            sum_d = y[nY] if sum_d is None else sum_d.add_(y[nY])
        vard = y[:nY].square_().sum(0)
        vard.view(p, N).add_(self._e)
        if sum_d is not None:
            vard.sub_(sum_d.square_().div_(d))
        std = f[-1]
        torch.sqrt(vard.div_(d).add_(self._eps), out=std)
        num = torch.mm(f.T, self._M, out=fit._buffer("num", (p * N, C)))
        return num.view(p, N, C), std.reciprocal().view(p, N)


class SparseFitness(PopulationFitness):
    """Changed-weights-only evaluator (see the module docstring for the algebra); ``kernel`` in
    {"auto", "explicit", "folded"}; ``chunk_size`` candidates per batched step (auto: ~2^23 elements per
    ``[p N, width]`` tensor); ``epilogue`` the fitness pass over the logits: "eager" (PyTorch ops; the loss of the
    wrong inputs only) or "compiled" (:func:`fused_scores` through ``torch.compile``: one read of the logits for
    every input; a one-time compile of seconds per process; on the CPU it is faster only while many inputs are
    wrong, see docs/benchmarks.md).

    The sparse update (the features u_J, S_I) is computed here; the chosen kernel (:class:`_ExplicitKernel` or
    :class:`_FoldedKernel`) turns it into logits."""

    name = "sparse"
    KERNELS = ("auto", "explicit", "folded")
    CHUNK_ELEMENTS = 1 << 22  # folded: ~16 MB (float32) per [p N, width] work tensor, reused across chunks
    # (2^21 .. 2^24 measured at ViT-B shapes: 2^22 fastest in every placement, by up to 29% where |I| >> |J|)

    @torch.no_grad()
    def __init__(self, *args, kernel: str = "auto", chunk_size: int | None = None, epilogue: str = "eager",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if kernel not in self.KERNELS:
            raise RepairInputError(f"unknown sparse-fitness kernel {kernel!r}; expected one of {self.KERNELS}")
        if epilogue not in EPILOGUES:
            raise RepairInputError(f"unknown sparse-fitness epilogue {epilogue!r}; expected one of {EPILOGUES}")
        self.epilogue = epilogue
        h, dev = self.head, self.device
        d, C, N = h.d, self.num_classes, self.n
        inter = h.intermediates(self.x)
        #: FFN rows per candidate: the inputs (CLS states) or every token of every input (token states)
        self._rows = len(self.x_rows)
        if self.tokens:  # the FFN acts per token: the sparse update runs on the N T token rows
            inter = {k: (v.reshape(self._rows, v.shape[-1]) if k != "logits" else v) for k, v in inter.items()}
        self._plan_features(inter)
        nJ, nI = len(self._J), len(self._I)
        self._buffers: dict[Any, Tensor] = {}
        # CUDA: no data-dependent shapes in the fitness pass (argmax and the loss of every input), so a generation
        # runs without host synchronisation; the CPU path computes the loss of the wrong inputs only
        self.sync_free = dev.type == "cuda"
        self._n_neg, self._n_pos = int(self.is_neg.sum()), int((~self.is_neg).sum())

        lam = _layer_scale_vector(h.layer_scale, d)
        fold = _foldable_post(h.post, d) if lam is not None else None
        macs = kernel_macs(nJ, nI, d, C)  # the products; plus the element-wise work per candidate and input
        cost_explicit = macs["explicit"] + 10 * d
        cost_folded = macs["folded"] + 4 * (nJ + nI)
        if self.tokens:
            if kernel == "folded":
                raise RepairInputError(
                    f"kernel='folded' is not exact on the FFN head of block {h.block} ({h.pooling} pooling): its "
                    "post runs the later blocks / the pooling, not LayerNorm -> Linear on the block output; use "
                    "kernel='auto' or 'explicit' (the exact per-token delta, then post per candidate)")
            fold = None  # "auto": the explicit kernel, the only exact one on token states
        if kernel == "folded" and fold is None:
            raise RepairInputError("kernel='folded' needs post = LayerNorm -> Linear and a linear layer scale")
        folded = kernel == "folded" or (kernel == "auto" and fold is not None and cost_folded < 1.5 * cost_explicit)
        self.macs_per_input = cost_folded if folded else cost_explicit
        width = max(C + nJ + nI + 1 if folded else d, len(self._ka1), 2 * nJ, 1)
        budget = (self.CHUNK_ELEMENTS if folded else 1 << 23) * (32 if dev.type == "cuda" else 1)
        if self.tokens:
            # per candidate: the sparse update on T token rows per input, then post (the later blocks) on [N, T, d]
            T = self.x.shape[1]
            post_w, post_macs = _post_cost(h.post, d, T)
            self.macs_per_input = T * cost_explicit + post_macs
            self.chunk_size = chunk_size or max(1, budget // (N * T * max(width, post_w)))
        else:
            self.chunk_size = chunk_size or max(1, budget // (N * width))  # CUDA: the whole population at once
        lam = lam.to(dev, self.dtype) if lam is not None else None
        self._kernel = _FoldedKernel(self, inter, lam, fold) if folded else _ExplicitKernel(self, inter, lam)

    @property
    def kernel(self) -> str:
        """The kernel in use: "explicit" or "folded"."""
        return self._kernel.name

    def info(self) -> dict[str, Any]:
        """The evaluator's set-up: the kernel that runs ("explicit" on every token head), the touched neurons and
        rows, chunk size and MACs per candidate and input (on a token head: its T token rows plus ``post``)."""
        return {**super().info(), "kernel": self.kernel, "epilogue": self.epilogue, "touched_neurons": len(self._J),
                "touched_rows": len(self._I), "features": self.m, "chunk_size": self.chunk_size,
                "macs_per_candidate_input": self.macs_per_input}

    def _plan_features(self, inter: dict[str, Tensor]) -> None:
        """The index sets and grouped products of the sparse update that :meth:`_features` runs: the touched
        neurons J (W_bef rows), the touched output rows I (W_aft rows), and the path of each W_aft weight (its
        column a touched neuron or not)."""
        dev = self.device
        w = self.weights.to(dev)
        is_bef = w[:, 0] == 0
        self._kb, self._ka = is_bef.nonzero().squeeze(1), (~is_bef).nonzero().squeeze(1)
        rows_b, cols_b = w[self._kb, 1], w[self._kb, 2]
        J, inv_b = torch.unique(rows_b, return_inverse=True)                 # touched neurons
        nJ = len(J)
        # dz_J = sum over each neuron's located weights of dW_bef h_c: a grouped product (rows in its order)
        # (the pre-activations z0_J of the touched neurons are its bias: it writes z_J = z0_J + dz_J)
        self._dz = (_GroupedProduct(inv_b, nJ, inter["h"][:, cols_b].T.contiguous(), inter["z"][:, J].T)
                    if nJ else None)
        self._J = J[self._dz.order.to(dev)] if nJ else J
        self._act = _inplace_act(self.head.act)
        self._a0T = inter["a"][:, self._J].T.contiguous()                   # [|J|, N]
        rows_a, cols_a = w[self._ka, 1], w[self._ka, 2]
        posJ = {int(j): i for i, j in enumerate(self._J.tolist())}
        in_J = torch.tensor([int(c) in posJ for c in cols_a.tolist()], dtype=torch.bool, device=dev)
        # W_aft weights whose column is not a touched neuron see the old activation a0: a grouped product by
        # output row; those whose column is touched see the new one: elementwise, then summed per row
        I0, inv0 = torch.unique(rows_a[~in_J], return_inverse=True)
        self._ka0, self._ka1 = self._ka[~in_J], self._ka[in_J]
        self._S0 = (_GroupedProduct(inv0, len(I0), inter["a"][:, cols_a[~in_J]].T.contiguous())
                    if len(I0) else None)
        I0 = I0[self._S0.order.to(dev)] if len(I0) else I0
        rows1 = rows_a[in_J]
        extra = torch.unique(rows1[~torch.isin(rows1, I0)])
        self._I = torch.cat([I0, extra])                                     # touched output rows
        nI, self._nI0 = len(self._I), len(I0)
        posI = {int(i): k for k, i in enumerate(self._I.tolist())}
        self._a1_posJ = torch.tensor([posJ[int(c)] for c in cols_a[in_J].tolist()], dtype=torch.long, device=dev)
        # (else: their products, added into their output rows of S)
        self._seg_a1 = (torch.tensor([posI[int(r)] for r in rows1.tolist()], dtype=torch.long, device=dev)
                        if len(rows1) else None)
        self.m = nJ + nI
        # W_aft weights on touched columns: S_I += D_p a_J per candidate p, with D_p the [|I|, |J|] matrix of their
        # changes, as one bmm when its |I| |J| MACs cost less than ~3 elementwise passes over [Ka1, p N]
        self._a1_flat = None
        if len(rows1) and nI * nJ <= 16 * len(rows1):
            self._a1_flat = torch.tensor([posI[int(r)] * nJ + posJ[int(c)] for r, c in
                                          zip(rows1.tolist(), cols_a[in_J].tolist())], dtype=torch.long, device=dev)
            self._seg_a1 = None

    def _label_flat(self, p: int) -> Tensor:
        """Flat positions of the label logits in a ``[p N, C]`` tensor (cached)."""
        flat = self._buffers.get(("label_flat", p))
        if flat is None:
            lab = self._labels(p)
            flat = torch.arange(len(lab), device=self.device) * self.num_classes + lab
            self._buffers[("label_flat", p)] = flat
        return flat

    def _labels(self, p: int) -> Tensor:
        """``label`` repeated for ``p`` candidates ``[p N]`` (cached)."""
        lab = self._buffers.get(("labels", p))
        if lab is None:
            lab = self._buffers[("labels", p)] = self.label.repeat(p)
        return lab

    def _buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A reused work tensor (fresh large allocations cost page faults on every generation)."""
        buf = self._buffers.get(name)
        n = 1
        for k in shape:
            n *= k
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def _features(self, dW: Tensor, out_u: Tensor | None = None,
                  out_S: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """u_J ``[|J|, p N]`` (activation change of the touched neurons) and S_I ``[|I|, p N]`` (W_aft changes
        times the new activations, summed per output row), written into ``out_u`` / ``out_S`` when given."""
        p, N = dW.shape[0], self._rows  # FFN rows: inputs (CLS) or input tokens (token head)
        u = aJ = S = None
        if self._dz is not None:
            z = self._dz(dW[:, self._kb], self._buffer("dz", (len(self._J), p, N)) if out_u is not None
                         else None)                                                   # z0_J + dz_J [|J|, p, N]
            aJ = self._act(z)
            u = torch.sub(aJ, self._a0T[:, None, :], out=out_u.view(len(self._J), p, N)) if out_u is not None \
                else aJ - self._a0T[:, None, :]
            u = u.view(len(self._J), p * N)
        if len(self._ka):
            nJ, nI = len(self._J), len(self._I)
            S = out_S if out_S is not None else torch.empty(nI, p * N, dtype=self.dtype, device=self.device)
            if self._S0 is not None:
                self._S0(dW[:, self._ka0], S[:self._nI0])
            if self._a1_flat is not None:
                S[self._nI0:].zero_()
                D = dW.new_zeros(p, nI * nJ)
                D[:, self._a1_flat] = dW[:, self._ka1]
                # S[:, q] += D_q a_J[:, q] for every candidate q, written in place through a strided view
                S.view(nI, p, N).transpose(0, 1).baddbmm_(D.view(p, nI, nJ), aJ.transpose(0, 1))
            elif self._seg_a1 is not None:
                S[self._nI0:].zero_()
                s1 = aJ.index_select(0, self._a1_posJ).mul_(dW[:, self._ka1].T[:, :, None])  # [Ka1, p, N]
                S.index_add_(0, self._seg_a1, s1.view(len(self._ka1), p * N))
        return u, S

    def _terms(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """One chunk of candidates ``v [p, K]`` through the kernel: (z ``[p, N, C]``, 1 / std ``[p, N]`` or None),
        the logits being z * istd (istd > 0: z has their argmax), the kernel's base added into z."""
        z, istd = self._kernel.terms(self, v)
        if self._kernel.base is not None:
            z.add_(self._kernel.base)
        return z, istd

    def logits_chunks(self, values: Tensor):
        for v in values.split(self.chunk_size):
            z, istd = self._terms(v)
            yield z if istd is None else z * istd[..., None]

    @torch.no_grad()
    def __call__(self, values: Tensor) -> FitnessResult:
        """The fitness of every candidate, chunk by chunk, with the correctness test and the loss fused: one
        max over the classes gives the prediction, the loss (logsumexp minus the label logit) is computed only
        for the inputs that are still wrong, and the logits of a chunk are never written out again."""
        values = self._values(values)
        N = self.n
        parts: list[FitnessResult] = []
        for v in values.split(self.chunk_size):
            p = len(v)
            if self.epilogue == "compiled":  # one fused pass: base, prediction test, loss
                z, istd = self._kernel.terms(self, v)
                score, correct = _compiled_scores(z, self.label, self._kernel.base, istd, self.loss)
                parts.append(self._combine(score, correct))
                continue
            z, istd = self._terms(v)
            num, istd = z.view(p * N, -1), istd.view(-1) if istd is not None else None
            lab = self._labels(p)
            if self.sync_free:
                correct = num.argmax(1) == lab
            else:  # argmax == label without CPU argmax (14x slower than amax here): the label's logit against the
                # largest other one; a tie goes to the first index, as argmax does (resolved row by row)
                flat, nv = self._label_flat(p), num.view(-1)
                zy = nv[flat]
                nv[flat] = float("-inf")
                other = num.amax(1)
                nv[flat] = zy
                correct = zy > other
                tied = (zy == other).nonzero().squeeze(1)
                if len(tied):
                    correct[tied] = num[tied].argmax(1) == lab[tied]
            score = torch.ones(p * N, dtype=torch.float64, device=self.device)
            if self.sync_free:  # no host synchronisation: the loss of every input, kept where wrong
                z = num * istd[:, None] if istd is not None else num
                L = per_input_loss(z[None], lab, self.loss)[0]
                score = torch.where(correct, score, 1.0 / (L.double() + 1.0))
            else:
                wrong = (~correct).nonzero().squeeze(1)
                if len(wrong):
                    zw = num[wrong]
                    if istd is not None:
                        zw.mul_(istd[wrong, None])
                    L = per_input_loss(zw[None], lab[wrong], self.loss)[0]
                    score[wrong] = 1.0 / (L.double() + 1.0)
            parts.append(self._combine(score.view(p, N), correct.view(p, N)))
        res = FitnessResult.cat(parts)
        return self._counted(res, len(values))

    def _combine(self, score: Tensor, correct: Tensor) -> FitnessResult:
        """One chunk's fitness from its per-input ``score`` and ``correct`` ``[p, N]``."""
        return combine_scores(score, correct, self.is_neg, self.alpha, self.variant, (self._n_neg, self._n_pos))


EVALUATORS: dict[str, type[PopulationFitness]] = {"sparse": SparseFitness, "full": FullBatchFitness,
                                                  "loop": LoopFitness}


def make_fitness(evaluator: str, head: FFNHead, weights: Tensor, x: Tensor, label: Tensor, is_neg: Tensor,
                 **options: Any) -> PopulationFitness:
    """An evaluator by name ("sparse", "full", "loop")."""
    if evaluator not in EVALUATORS:
        raise RepairInputError(f"unknown fitness evaluator {evaluator!r}; expected one of {sorted(EVALUATORS)}")
    return EVALUATORS[evaluator](head, weights, x, label, is_neg, **options)
