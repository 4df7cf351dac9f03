"""Cost of the block-addressed FFN head (vitfl.localization.ffn.ffn_head) at ViT-B/16 shapes (run on demand; not a test).

A randomly initialised timm ``VisionTransformer`` with ViT-B/16 shapes (d = 768, d_ff = 3072, 12 blocks, 12 heads,
224 px -> T = 197 tokens; ``--classes`` outputs) in float32 on the CPU (nothing is downloaded). For a small batch
(``--batch``) it times, as the median of ``--repeats`` runs after one warm-up, one forward (no grad) of

* the full model from pixels (reference),
* today's last-block CLS head on ``x [N, d]`` (``ffn_head(model, -1)`` = ``last_ffn_head``),
* the token-carrying head of the last block (forced, ``tokens=True``) on ``x [N, T, d]``,
* the token heads of a middle block and of block 0 (the remaining blocks run per call),

and one forward + backward (cross-entropy, gradients of that block's W_bef and W_aft: what gradient FL methods pay
per input), and prints the per-input milliseconds. It also states the memory of the state caches per input: the CLS
state (d x 4 bytes), a token cache of x (T x d x 4 bytes = 197 x 768 x 4 = 605,184 bytes) and of the activations
a (T x d_ff x 4 bytes), and what 10,000 inputs of each take.

**DE fitness on a block** (the repair's cost per candidate): for the same heads it builds the repair fitness
(``SparseFitness``, ``kernel="auto"``) of ``--located`` random located weights of that block (over both matrices) on
the batch's states and times one evaluation of ``--population`` candidates (median of ``--repeats``), printed as
milliseconds per candidate and input (the CLS head, whose per-call overhead would dominate so small a call, is
timed at a DE run's own size instead: ``--cls-population`` 100 candidates on ``--cls-inputs`` 600 inputs, the
batch's states repeated), and what one DE run takes at that rate (population 100, 51 evaluation rounds,
|I_neg| + |I_pos| = 600 inputs). On the last-block CLS head a candidate costs the sparse update plus the final
norm and classifier; on a token head the sparse update runs on all T tokens and the remaining blocks run per
candidate (``post``), so the cost is about one forward of the later blocks per candidate and input. Each row also
gives the largest logit difference against the loop evaluator (the published way: the candidate's values written
into a copy of the head, the whole head run) on two candidates.

With ``--average-pooling`` the model uses ``global_pool='avg'`` (then even the last block carries tokens).
``--depth`` / ``--tokens`` / ``--dim`` shrink the model for a smoke run (the table then states its shapes).

    python benchmarks/ffn_block_cost.py                      # ViT-B/16, batch 8
    python benchmarks/ffn_block_cost.py --batch 2 --repeats 2 --threads 2
    python benchmarks/ffn_block_cost.py --dim 192 --depth 4 --heads 3 --img 64 --batch 4   # smoke shapes
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitfl.localization.ffn import ffn_head  # noqa: E402


def build(dim: int, depth: int, heads: int, img: int, patch: int, classes: int, avg: bool):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                              num_classes=classes, global_pool="avg" if avg else "token")
    return model.eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def capture(model, block: int, pixels):
    store = {}
    blk = model.blocks[block]
    h = blk.norm2.register_forward_pre_hook(lambda _m, a: store.__setitem__("x", a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        h.remove()
    return store["x"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--average-pooling", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_rehearsal.sh runs it on the GPU)")
    ap.add_argument("--population", type=int, default=4, help="DE fitness: candidates per timed evaluation")
    ap.add_argument("--located", type=int, default=236,
                    help="DE fitness: located weights of the block (random over W_bef and W_aft; 236 = 0.005%% of "
                         "ViT-B's FFN, the sweep's smallest published budget)")
    ap.add_argument("--cls-population", type=int, default=100, help="DE fitness of the CLS head: candidates")
    ap.add_argument("--cls-inputs", type=int, default=600, help="DE fitness of the CLS head: inputs (repeated)")
    ap.add_argument("--no-fitness", action="store_true", help="skip the DE fitness timing")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args.dim, args.depth, args.heads, args.img, args.patch, args.classes, args.average_pooling).to(dev)
    n = args.batch
    pixels = torch.randn(n, 3, args.img, args.img, generator=torch.Generator().manual_seed(1)).to(dev)
    label = (torch.arange(n) % args.classes).to(dev)
    with torch.no_grad():
        full = model(pixels)
    mid = args.depth // 2
    rows = []

    def add(name: str, head, x, block: int) -> None:
        with torch.no_grad():
            err = float((head(x) - full).abs().max())
        fwd = timed(lambda: head(x).sum().item(), args.repeats)

        def fwd_bwd():
            w = [head.fc_bef.weight, head.fc_aft.weight]
            loss = F.cross_entropy(head(x), label, reduction="sum")
            torch.autograd.grad(loss, w)

        with torch.enable_grad():
            bwd = timed(fwd_bwd, args.repeats)
        rows.append((name, block, args.depth - 1 - block, tuple(x.shape[1:]), fwd, bwd, err))

    with torch.no_grad():
        ref = timed(lambda: model(pixels).sum().item(), args.repeats)
    x_last = capture(model, -1, pixels)
    last = ffn_head(model, -1)
    if not last.token_axis:
        add("last block, CLS head (today)", last, x_last[:, 0], args.depth - 1)
    add("last block, token head", ffn_head(model, -1, tokens=True), x_last, args.depth - 1)
    x_mid, x_0 = capture(model, mid, pixels), capture(model, 0, pixels)
    add(f"block {mid}, token head", ffn_head(model, mid), x_mid, mid)
    add("block 0, token head", ffn_head(model, 0), x_0, 0)

    fit_rows = []

    def add_fitness(name: str, head, x, block: int, inputs: int = n, pop: int = args.population) -> None:
        from vitfl.lightning_modules.repair.fitness import LoopFitness, SparseFitness

        g = torch.Generator().manual_seed(2)
        flat = torch.randperm(head.index.total, generator=g)[:args.located]
        weights = head.index.to_triples(flat)
        rows = torch.arange(inputs) % n
        xs, ys = x[rows.to(dev)], label[rows.to(dev)]
        is_neg = (torch.arange(inputs) < max(1, inputs // 2)).to(dev)
        ev = SparseFitness(head, weights, xs, ys, is_neg)
        vals = ev.old + 0.05 * torch.randn(pop, len(weights), generator=g).to(ev.old)
        t = timed(lambda: ev(vals), args.repeats)
        loop = LoopFitness(head, weights, xs, ys, is_neg)
        err = float((ev.logits(vals[:2]) - loop.logits(vals[:2])).abs().max())
        per = t / (pop * inputs)
        fit_rows.append((name, block, args.depth - 1 - block, ev.kernel, f"{pop} x {inputs}", per,
                         per * 100 * 51 * 600, err))

    if not args.no_fitness:
        if not last.token_axis:
            add_fitness("last block, CLS head (today)", last, x_last[:, 0], args.depth - 1, args.cls_inputs,
                        args.cls_population)
        add_fitness("last block, token head", ffn_head(model, -1, tokens=True), x_last, args.depth - 1)
        add_fitness(f"block {mid}, token head", ffn_head(model, mid), x_mid, mid)
        add_fitness("block 0, token head", ffn_head(model, 0), x_0, 0)

    T, d = x_last.shape[1], x_last.shape[2]
    d_ff = last.d_ff
    print(f"ffn_head cost: timm VisionTransformer d={d} d_ff={d_ff} blocks={args.depth} T={T} classes="
          f"{args.classes} pooling={'avg' if args.average_pooling else 'token'}, float32, "
          + (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)")
          + f", batch {n}, median of {args.repeats}")
    print()
    print("| head | block | later blocks | state per input | forward ms/input | fwd+bwd ms/input | max |logit err| |")
    print("|---|---|---|---|---|---|---|")
    print(f"| full model from pixels | - | - | image | {1e3 * ref / n:.2f} | - | - |")
    for name, b, later, shape, fwd, bwd, err in rows:
        print(f"| {name} | {b} | {later} | {list(shape)} | {1e3 * fwd / n:.3f} | {1e3 * bwd / n:.3f} | {err:.1e} |")
    print()
    print("| cache per input (float32) | bytes | MiB per 10,000 inputs |")
    print("|---|---|---|")
    for name, numel in (("CLS state x [d] (today)", d), ("token states x [T, d]", T * d),
                        ("CLS activation a [d_ff] (today)", d_ff), ("token activations a [T, d_ff]", T * d_ff)):
        print(f"| {name} | {4 * numel:,} | {4 * numel * 10_000 / 2**20:,.1f} |")
    if fit_rows:
        print()
        print(f"DE fitness (SparseFitness, kernel auto): {args.located} located weights (random, both matrices); "
              "a DE run = population 100 x 51 rounds x 600 inputs at the measured rate")
        print()
        print("| head | block | later blocks | kernel | candidates x inputs timed | fitness ms per candidate and "
              "input | one DE run | max |logit err| vs loop |")
        print("|---|---|---|---|---|---|---|---|")
        for name, b, later, kernel, size, per, run_s, err in fit_rows:
            run = f"{run_s:.1f} s" if run_s < 3600 else f"{run_s / 3600:.1f} h"
            print(f"| {name} | {b} | {later} | {kernel} | {size} | {1e3 * per:.4f} | {run} | {err:.1e} |")


if __name__ == "__main__":
    main()
