"""Speed of one DE repair run at ViT-B/16 shapes against a bound of what cannot be avoided (on demand; prints a
table).

d = 768, 4d = 3072, 100 classes, |I_neg| = 100, |I_pos| = 500, budgets N = 236 / 472 / 944 located weights,
population 100, 50 generations (+ the initial population: 51 evaluation rounds), no early stop.

Placements (``--placements``):

- ``random``: uniform over both matrices of a random FFN head (touches ~N/2 neurons: the worst case for (c));
- ``clustered``: the top weights of a rank-1-like score (|u_row| x |v_col| per matrix), as gradient-based FL picks;
- ``fl:<method>`` (``fl:ours``, ``fl:arachne_w``, ``fl:random``): the weights that FL method locates with
  :func:`vitfl.localization.ranking.localize` on the last FFN head of an HF ViT-B/16 (``transformers.ViTConfig()``,
  random weights, 100 labels) over synthetic cached states: the residual streams of every token of a few random
  images entering the last FFN (``--images``), labelled by the head's own prediction (I_pos) or another class
  (I_neg). The random placements and ``clustered`` use a random head of the same shapes (HF layout).

Three ways to evaluate the fitness: (a) published, one candidate at a time on the full head with in-place updates
(``update="immediate"``, ``LoopFitness``); (b) the full head batched over the population (``FullBatchFitness``);
(c) batched, changed weights only (``SparseFitness``, the default). (a) and (b) take minutes per run and are skipped
unless asked for (``--with_ab``; timed over ``--measure_ab`` generations and extrapolated, marked ``*``).

The bound for (c) counts what cannot be avoided per evaluation round, measured in the same run:

- MACs: P |I| (min over the two kernels of the MACs per candidate and input: explicit |J| d + d C, folded
  (|J| + |I| + 1) C + |J| (|I| + k + 1) with k = min(d - |I|, |J|)), at the measured float32 GEMM rate
  (``[15 P, d] x [d, d]``);
- memory: one read and one write pass over the ``[P, |I|, C]`` candidate logits, at the bandwidth of a
  ``torch.add`` of two tensors of that size into a third (measured; the large-array bandwidth is printed too);
- activation (column ``act s``, reported beside the bound, and in ``ratio+act``): every candidate changes the
  pre-activations of its |J| touched neurons on every input, so the exact activation (GELU: an erf per element)
  is evaluated P |I| |J| times per round at least, at the head activation's measured rate per element. It is
  no MAC and no pass over the logits, but no exact evaluator avoids it (on the CPU it is small beside the MACs).

bound = 51 x (MAC time + memory time); ratio = (c) s/run / bound; ratio+act = (c) s/run / (bound + act s). The machine may be shared: the load average is
printed before and after, and only ratios measured in one run should be compared.

Where the time goes (``--profile_gens`` further generations of the same run under ``torch.profiler``; 0: off):
``prod s`` is the time (c) spends inside matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``: the BLAS calls at
the shapes the kernel really has, thin inner dimensions included) per run, extrapolated to 51 rounds, and
``prod x bound`` its ratio to the bound. Where it is well above 1, the products alone, at the rate the BLAS reaches
on their shapes, are slower than the bound allows the whole run, so no fusion of the element-wise work around them
can reach the bound; the rest of the run (``(c) s/run - prod s``) is element-wise passes and bookkeeping.

    python benchmarks/repair_speed.py                                   # every placement and budget
    python benchmarks/repair_speed.py --quick                           # N = 944, random + clustered, 10 gens
    python benchmarks/repair_speed.py --budgets 944 --placements clustered --with_ab --measure_ab 1
    python benchmarks/repair_speed.py --device cuda --placements random clustered
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vitfl.lightning_modules.repair.de import DifferentialEvolution, matrix_bounds, matrix_init_stats  # noqa: E402
from vitfl.lightning_modules.repair.fitness import (EPILOGUES, FullBatchFitness, LoopFitness,  # noqa: E402
                                             SparseFitness, kernel_macs)
from vitfl.localization.ffn import FFNHead  # noqa: E402

FL_METHODS = ("ours", "arachne_w", "random")
PLACEMENTS = ("random", "clustered") + tuple(f"fl:{m}" for m in FL_METHODS)


def make_head(d: int, d_ff: int, C: int, seed: int = 0) -> FFNHead:
    torch.manual_seed(seed)
    h = FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                nn.Sequential(nn.LayerNorm(d), nn.Linear(d, C)), "hf")
    with torch.no_grad():  # non-trivial LayerNorms
        for ln in (h.norm, h.post[0]):
            ln.weight.add_(0.1 * torch.randn(d))
            ln.bias.add_(0.1 * torch.randn(d))
    return h.eval()


def label_states(head: FFNHead, x: torch.Tensor, n_neg: int, seed: int = 1):
    """Labels: the head's prediction for the last |I_pos| states (I_pos), another class for the first n_neg."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pred = head(x).argmax(1).cpu()
    C = head.num_classes
    label = pred.clone()
    label[:n_neg] = (pred[:n_neg] + 1 + torch.randint(0, C - 1, (n_neg,), generator=g)) % C
    is_neg = torch.arange(len(x)) < n_neg
    return label, is_neg


def make_states(head: FFNHead, n_neg: int, n_pos: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_neg + n_pos, head.d, generator=g, dtype=head.fc_bef.weight.dtype)
    return (x, *label_states(head, x, n_neg, seed))


def vit_b16_head_and_states(n_neg: int, n_pos: int, classes: int, images: int, seed: int = 0):
    """The last FFN head of a random-weight HF ViT-B/16 and ``n_neg + n_pos`` residual streams entering it (every
    token of ``images`` random images, drawn without replacement)."""
    from transformers import ViTConfig, ViTForImageClassification

    from vitfl.localization.ffn import last_ffn_head

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(num_labels=classes)).eval()
    head = last_ffn_head(model)
    store = []
    handle = head.norm.register_forward_pre_hook(lambda _m, args: store.append(args[0].detach().reshape(-1, head.d)))
    need = n_neg + n_pos
    images = max(images, -(-need // 197))
    with torch.no_grad():
        model(pixel_values=torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(seed)))
    handle.remove()
    pool = torch.cat(store)
    x = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))[:need]].contiguous()
    head = head.copy().eval()  # detached from the model
    del model
    return (head, x, *label_states(head, x, n_neg, seed))


def located(head: FFNHead, n: int, placement: str, seed: int = 2) -> torch.Tensor:
    """``random``: uniform over both matrices; ``clustered``: the top weights of a rank-1-like score."""
    g = torch.Generator().manual_seed(seed)
    idx = head.index
    if placement == "random":
        flat = torch.randperm(idx.total, generator=g)[:n]
    elif placement == "clustered":
        scores = []
        for rows, cols in ((idx.d_ff, idx.d), (idx.d, idx.d_ff)):
            u = torch.rand(rows, generator=g) ** 8
            v = torch.rand(cols, generator=g) ** 8
            scores.append((u[:, None] * v[None, :]).reshape(-1))
        flat = torch.topk(torch.cat(scores), n).indices
    else:
        raise ValueError(f"unknown synthetic placement {placement!r}; expected random or clustered")
    return idx.to_triples(flat)


def fl_located(head, x, label, is_neg, method: str, n: int, seed: int = 0) -> torch.Tensor:
    from vitfl.localization.ranking import localize
    return localize(head, x, label, is_neg, method, n, seed=seed).weights


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process: on a shared machine it
# leaves out the time the scheduler gives to other processes; meaningful with --threads 1 on the CPU)


def _best_time(f, reps: int, device) -> float:
    f()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = CLOCK()
        f()
        _sync(device)
        best = min(best, CLOCK() - t)
    return best


def gemm_rate(m: int, k: int, n: int, device, reps: int = 3) -> float:
    """float32 GEMM FLOP/s at [m, k] x [k, n] (best of ``reps``)."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    return 2 * m * k * n / _best_time(lambda: torch.mm(a, b, out=out), reps, device)


def add_pass_seconds(numel: int, device, reps: int = 5) -> float:
    """Seconds of ``c = a + b`` over float32 tensors of ``numel`` elements: two reads and one write, i.e. 1.5 x one
    read + write pass; returned scaled to one read + write pass (2 x numel x 4 bytes)."""
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)
    c = torch.empty_like(a)
    return _best_time(lambda: torch.add(a, b, out=c), reps, device) / 1.5


def act_seconds_per_element(act, device, numel: int = 1 << 22, reps: int = 3) -> float:
    """Seconds per element of the head's activation (e.g. exact GELU) on a float32 tensor (best of ``reps``)."""
    t = torch.randn(numel, device=device)
    with torch.no_grad():
        return _best_time(lambda: act(t), reps, device) / numel


#: the matrix products of (c) as the profiler names them (self time: a product's BLAS call, not its callers)
PRODUCT_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
                         "aten::addbmm", "aten::addbmm_"})


def product_seconds(de: DifferentialEvolution, generations: int, device) -> tuple[float, float]:
    """(seconds in matrix products, seconds in all) per generation over ``generations`` more generations of ``de``
    under ``torch.profiler`` (CUDA: the products' kernel time on the device)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=acts) as prof:
        t = CLOCK()
        for _ in range(generations):
            de.step()
        _sync(device)
        total = CLOCK() - t
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"  # microseconds
    prod = sum(getattr(e, attr) for e in prof.key_averages() if e.key in PRODUCT_OPS) / 1e6
    return prod / generations, total / generations


def de_for(head, weights, fitness, update, generations, seed=0, device="cpu"):
    lo, hi, mu, sd = (torch.empty(len(weights), dtype=torch.float64) for _ in range(4))
    for k, W in enumerate(head.weights()):
        sel = (weights[:, 0] == k).cpu()
        lo[sel], hi[sel] = matrix_bounds(W.detach())
        mu[sel], sd[sel] = matrix_init_stats(W.detach())
    return DifferentialEvolution(fitness, lo, hi, mu, sd, pop_size=100, generations=generations, update=update,
                                 patience=10 ** 9, seed=seed, num_vars=len(weights), device=device,
                                 dtype=head.fc_bef.weight.dtype)


def time_run(de: DifferentialEvolution, measure: int, generations: int, device="cpu") -> tuple[float, bool]:
    """Seconds of a full run (init + generations), extrapolated when ``measure < generations``."""
    _sync(device)
    t = CLOCK()
    de.initialize()
    _sync(device)
    init_s = CLOCK() - t
    measure = min(measure, generations)
    t = CLOCK()
    for _ in range(measure):
        de.step()
    _sync(device)
    gen_s = (CLOCK() - t) / max(measure, 1)
    return init_s + generations * gen_s, measure < generations


def _table(rows, cols) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", type=int, default=[236, 472, 944])
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    p.add_argument("--generations", type=int, default=50)
    p.add_argument("--measure_c", type=int, default=None, help="generations timed for (c) (default: all)")
    p.add_argument("--with_ab", action="store_true", help="also time (a) and (b) (minutes per run)")
    p.add_argument("--measure_ab", type=int, default=2, help="generations timed for (a) and (b)")
    p.add_argument("--quick", action="store_true", help="N = 944, random + clustered, (c) over 10 generations")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed seconds; cpu: CPU seconds of this process (shared machine, --threads 1)")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--n_neg", type=int, default=100)
    p.add_argument("--n_pos", type=int, default=500)
    p.add_argument("--images", type=int, default=4, help="random images whose token states feed the ViT-B head")
    p.add_argument("--no_check", action="store_true", help="skip the (c)-vs-full-head fitness check")
    p.add_argument("--profile_gens", type=int, default=5,
                   help="generations run again under torch.profiler for the prod s column (0: off)")
    p.add_argument("--kernel", default="auto", choices=SparseFitness.KERNELS, help="(c)'s kernel")
    p.add_argument("--epilogue", default="eager", choices=EPILOGUES,
                   help="(c)'s fitness pass over the logits (compiled: torch.compile, once per process, untimed)")
    a = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.clock == "cpu" and (a.device != "cpu" or (a.threads or torch.get_num_threads()) != 1):
        raise SystemExit("--clock cpu needs --device cpu --threads 1 (CPU seconds of several threads are no time)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.budgets, a.placements, a.measure_c = [944], ["random", "clustered"], a.measure_c or 10
    dev = torch.device(a.device)
    measure_c = a.measure_c or a.generations
    d, d_ff, C, P = a.d, 4 * a.d, a.classes, 100
    load0 = tuple(round(v, 2) for v in os.getloadavg())
    head = make_head(d, d_ff, C)
    x, label, is_neg = make_states(head, a.n_neg, a.n_pos)
    heads = {"synthetic": (head, x, label, is_neg)}
    if any(pl.startswith("fl:") for pl in a.placements):
        if d != 768:
            raise SystemExit("fl:* placements use ViT-B/16 (d = 768)")
        t = time.perf_counter()
        heads["vit"] = vit_b16_head_and_states(a.n_neg, a.n_pos, C, a.images)
        print(f"ViT-B/16 head and {a.n_neg + a.n_pos} token states built in {time.perf_counter() - t:.1f} s; "
              f"the head predicts {len(heads['vit'][2][~heads['vit'][3]].unique())} distinct classes on I_pos")
    N = a.n_neg + a.n_pos
    evals = a.generations + 1
    rate = gemm_rate(15 * P, d, d, dev)
    mem_pass = add_pass_seconds(P * N * C, dev)
    big = 1 << 26
    big_pass = add_pass_seconds(big, dev, reps=3)
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, {a.clock} clock; "
          f"d={d}, 4d={d_ff}, C={C}, "
          f"|I_neg|={a.n_neg}, |I_pos|={a.n_pos}, P={P}, {a.generations} generations (+ initial population)")
    print(f"measured: float32 GEMM {rate / 1e9:.1f} GFLOP/s ([{15 * P}, {d}] x [{d}, {d}]); one read+write pass "
          f"over [P, N, C] = {P * N * C * 4 / 1e6:.0f} MB: {mem_pass * 1e3:.2f} ms "
          f"({2 * P * N * C * 4 / mem_pass / 1e9:.1f} GB/s; {big * 4 >> 20} MB arrays: "
          f"{2 * big * 4 / big_pass / 1e9:.1f} GB/s); load average before: {load0}")
    cols = ["N", "placement", "|J|", "|I|", "kernel", "epilogue", "(c) s/run", "MAC s", "mem s", "bound s", "ratio",
            "act s", "ratio+act"]
    if a.profile_gens:
        cols += ["prod s", "prod x bound"]
    if a.with_ab:
        cols[7:7] = ["(a) s/run", "(b) s/run"]
    cols.append("max|dF|")
    rows = []
    for n in a.budgets:
        for placement in a.placements:
            h, xs, ys, negs = heads["vit" if placement.startswith("fl:") else "synthetic"]
            t = time.perf_counter()
            hdev = h.fc_bef.weight.device  # Module.to moves in place: the head may already be on the device
            w = (fl_located(h, xs.to(hdev), ys.to(hdev), negs.to(hdev), placement[3:], n)
                 if placement.startswith("fl:") else located(h, n, placement))
            fl_s = time.perf_counter() - t
            hd = h.to(dev)
            xd, yd, nd = xs.to(dev), ys.to(dev), negs.to(dev)
            row = {"N": n, "placement": placement}
            sparse = SparseFitness(hd, w, xd, yd, nd, kernel=a.kernel, epilogue=a.epilogue)
            t = time.perf_counter()
            sparse(sparse.old[None].expand(3, -1))  # warm-up: the one-time torch.compile is not part of a run
            warm_s = time.perf_counter() - t
            if a.epilogue == "compiled":
                print(f"(c) warm-up (torch.compile of the fitness pass, once per process and kernel): {warm_s:.1f} s")
            info = sparse.info()
            nJ, nI = info["touched_neurons"], info["touched_rows"]
            macs = min(kernel_macs(nJ, nI, d, C).values())
            rate = gemm_rate(15 * P, d, d, dev)          # re-measured beside each run: the load changes
            mem_pass = add_pass_seconds(P * N * C, dev)
            mac_s = evals * P * N * 2 * macs / rate
            mem_s = evals * mem_pass
            act_s = evals * P * N * nJ * act_seconds_per_element(hd.act, dev)
            row.update({"|J|": nJ, "|I|": nI, "kernel": sparse.kernel, "epilogue": a.epilogue,
                        "MAC s": f"{mac_s:.2f}", "mem s": f"{mem_s:.2f}", "bound s": f"{mac_s + mem_s:.2f}"})
            # (room for the profiled generations after the timed ones: a finished search no longer steps)
            de_c = de_for(hd, w, sparse, "deferred", a.generations + a.profile_gens, device=dev)
            s_c, ext = time_run(de_c, measure_c, a.generations, dev)
            row["(c) s/run"] = f"{s_c:.2f}{'*' if ext else ''}"
            if a.profile_gens:  # the same search, a few generations further, under the profiler
                prod_g, _ = product_seconds(de_c, a.profile_gens, dev)
                ok = prod_g > 0  # none recorded (a profiler without this backend's events): say so, not 0
                row["prod s"] = f"{evals * prod_g:.2f}" if ok else "n/a"
                row["prod x bound"] = f"{evals * prod_g / (mac_s + mem_s):.2f}" if ok else "n/a"
            row["ratio"] = f"{s_c / (mac_s + mem_s):.2f}"
            row["act s"], row["ratio+act"] = f"{act_s:.2f}", f"{s_c / (mac_s + mem_s + act_s):.2f}"
            row["_c_s"], row["_bound_s"], row["_fl_s"] = s_c, mac_s + mem_s, fl_s
            if a.with_ab:
                for k, ev, upd in (("b", FullBatchFitness, "deferred"), ("a", LoopFitness, "immediate")):
                    s, ext = time_run(de_for(hd, w, ev(hd, w, xd, yd, nd), upd, a.generations, device=dev),
                                      a.measure_ab, a.generations, dev)
                    row[f"({k}) s/run"] = f"{s:.1f}{'*' if ext else ''}"
            if not a.no_check:  # (c) against the full head on 10 candidates of an initial population
                de = de_for(hd, w, sparse, "deferred", 1, device=dev)
                de.initialize()
                loop = LoopFitness(hd, w, xd, yd, nd)
                row["max|dF|"] = f"{float((sparse(de.pop[:10]).fitness - loop(de.pop[:10]).fitness).abs().max()):.1e}"
            rows.append(row)
            print(" | ".join(f"{k}={row.get(k, '')}" for k in cols), flush=True)
    print(f"\nload average after: {tuple(round(v, 2) for v in os.getloadavg())}\n")
    print(_table(rows, cols))
    print("\n* extrapolated from the timed generations. |J| touched neurons (rows of W_bef), |I| touched output rows "
          f"of W_aft. MAC s / mem s: the two parts of the bound ({evals} rounds); act s: the touched neurons' "
          "activations (see the module docstring). max|dF|: largest fitness "
          "difference (c) vs the full head on 10 candidates (in the head's dtype). prod s: (c)'s time inside matrix "
          f"products per run ({a.profile_gens} generations profiled, scaled to {evals} rounds); prod x bound: its ratio "
          "to the bound.")
    return rows


if __name__ == "__main__":
    main()
