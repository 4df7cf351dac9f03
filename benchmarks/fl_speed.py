"""FL speed and memory benchmark (run on demand; not a test).

Synthetic cached states at ViT-B/16 shapes (d = 768, d_ff = 3072, 100 classes: 4,718,592 last-FFN weights) or,
with ``--quick``, small shapes. For each N (``--n``, default 1000 10000) and each method it runs
:func:`vitfl.localization.ranking.localize` (data pass + compute + selection) and reports wall time, the time as a ratio
to one forward + backward pass of the FFN head over the same inputs (cross-entropy, gradients of W_bef and W_aft,
same batching, timed again right before every run of a method; ``x ref`` is the median over ``--repeats`` of
each run's ratio to the reference just before it, ``x ref range`` their min-max), and peak memory above the start
of the method (CPU: the process's peak RSS, reset through /proc/self/clear_refs; CUDA: torch's peak allocated
memory).

Target: every method within 3x the reference pass (IG, with m = 20 scaled copies, within 3m x), BL's Pareto front
over all weights in bounded memory. ``--quick`` is a smoke run: at its tiny shapes the reference pass takes about a
millisecond, so the ratios there measure each method's fixed cost (state set-up, checks, selection), not its
scaling. On a shared CPU, ``--threads 1`` gives steadier numbers than competing OpenMP threads.

    python benchmarks/fl_speed.py --quick
    python benchmarks/fl_speed.py --n 1000 --methods grad_loss bl ours ig
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitfl.localization.base import get_localizer, registered_localizers  # noqa: E402
from vitfl.localization.ffn import FFNHead  # noqa: E402
from vitfl.localization.ranking import localize  # noqa: E402

OWN_SELECTION = {"bl", "bl_reptran"}  # budget "front"


def make_head(d: int, d_ff: int, c: int, device: str, seed: int = 0) -> FFNHead:
    torch.manual_seed(seed)
    head = FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf")
    return head.to(device).eval()


def make_states(n: int, d: int, c: int, device: str, neg_fraction: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    label = torch.randint(0, c, (n,), generator=g)
    is_neg = torch.rand(n, generator=g) < neg_fraction
    return x.to(device), label.to(device), is_neg.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_pass(head: FFNHead, x, label, batch_size: int, device: str) -> float:
    """One forward + backward of the FFN head (summed cross-entropy; grads of W_bef and W_aft), in batches."""
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, x.shape[0], batch_size):
        loss = F.cross_entropy(head(x[s:s + batch_size]), label[s:s + batch_size], reduction="sum")
        torch.autograd.grad(loss, [head.fc_bef.weight, head.fc_aft.weight])
    _sync(device)
    return time.perf_counter() - t0


class PeakMemory:
    """Peak memory (MiB) above the level at entry: CUDA allocator stats, or the process's peak RSS on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mib: float | None = None

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0  # kB -> MiB
        except OSError:
            return None
        return None

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
        else:
            try:  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                self._reset = True
            except OSError:
                self._reset = False
            self._base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20 - self._base
        elif self._reset and self._base is not None:
            hwm = self._status("VmHWM")
            self.peak_mib = None if hwm is None else hwm - self._base
        return False


def run(args) -> list[dict]:
    if args.quick:
        d, d_ff, c = 64, 256, 10
        ns = args.n or [200]
    else:
        d, d_ff, c = 768, 3072, 100
        ns = args.n or [1000, 10000]
    methods = args.methods or registered_localizers()
    for m in methods:
        get_localizer(m)  # unknown names fail before any work
    device = args.device
    head = make_head(d, d_ff, c, device)
    total = 2 * d * d_ff
    budget = min(args.budget, total)
    rows = []
    print(f"# FL speed: d={d}, d_ff={d_ff}, classes={c}, weights={total:,}, device={device}, "
          f"threads={torch.get_num_threads()}, batch_size={args.batch_size}, budget={budget} (BL: front)",
          flush=True)
    for n in ns:
        x, label, is_neg = make_states(n, d, c, device, args.neg_fraction)
        reference_pass(head, x[: min(n, args.batch_size)], label[: min(n, args.batch_size)], args.batch_size,
                       device)  # warm-up
        ref = statistics.median(reference_pass(head, x, label, args.batch_size, device) for _ in range(3))
        print(f"\n## N = {n} (I_neg {int(is_neg.sum())}, I_pos {int((~is_neg).sum())}); reference forward+backward "
              f"of the FFN head: {ref:.3f} s", flush=True)
        header = f"{'method':24s} {'level':7s} {'time_s':>9s} {'x ref':>8s} {'x ref range':>13s} {'target':>7s} " \
                 f"{'ok':>3s} {'peak_MiB':>9s} {'selected':>9s}"
        print(header)
        print("-" * len(header))
        for m in methods:
            b = "front" if m in OWN_SELECTION else budget
            times, refs, ratios, peak, res = [], [], [], None, None
            for _ in range(args.repeats):
                res = None
                gc.collect()
                # the reference is timed again right before each run: a shared machine's speed drifts over a
                # sweep, and a ratio to a reference taken minutes earlier would carry that drift
                ref_now = reference_pass(head, x, label, args.batch_size, device)
                with PeakMemory(device) as pm:
                    _sync(device)
                    t0 = time.perf_counter()
                    res = localize(head, x, label, is_neg, m, b, batch_size=args.batch_size)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                refs.append(ref_now)
                ratios.append(times[-1] / ref_now)
                peak = pm.peak_mib if peak is None or pm.peak_mib is None else max(peak, pm.peak_mib)
            t = statistics.median(times)
            target = 3.0 * (20 if m == "ig" else 1)
            ratio = statistics.median(ratios)
            row = {"n": n, "method": m, "level": res.level, "time_s": t, "ratio": ratio, "ratio_min": min(ratios),
                   "ratio_max": max(ratios), "repeats": len(ratios), "target": target,
                   "ok": ratio <= target, "peak_mib": peak, "selected": int(res.weights.shape[0]),
                   "ref_s": ref, "ref_run_s": statistics.median(refs), "d": d, "d_ff": d_ff, "classes": c,
                   "device": device}
            rows.append(row)
            peak_s = "n/a" if peak is None else f"{max(peak, 0.0):9.0f}"
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            print(f"{m:24s} {res.level:7s} {t:9.3f} {ratio:8.2f} {spread:>13s} {target:7.0f} "
                  f"{'yes' if row['ok'] else 'NO':>3s} "
                  f"{peak_s:>9s} {row['selected']:9d}", flush=True)
            del res
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", help="numbers of cached inputs (default 1000 10000; quick: 200)")
    p.add_argument("--quick", action="store_true", help="small shapes (d=64, d_ff=256, 10 classes)")
    p.add_argument("--methods", nargs="+", help="registered FL methods (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per update (localize's default)")
    p.add_argument("--budget", type=int, default=944, help="weights to select (BL: its front)")
    p.add_argument("--neg-fraction", type=float, default=0.3, help="share of inputs marked I_neg")
    p.add_argument("--repeats", type=int, default=1, help="runs per method (median time, max peak)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--csv", type=Path, help="also write the rows to this csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
