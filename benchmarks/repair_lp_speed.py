"""Speed (and in-sample result) of one LP repair run against one DE run at ViT-B/16 shapes (on demand; prints a
table).

The problems are :mod:`benchmarks.repair_speed`'s (imported from it, not copied): d = 768, 4d = 3072, 100 classes,
|I_neg| = 100, |I_pos| = 500, float32, budgets N = 236 / 472 / 944 located weights placed ``random`` (uniform over
both matrices of a random FFN head), ``clustered`` (top weights of a rank-1-like score) or ``fl:<method>`` (the
weights an FL method locates on the last FFN of a random-weight HF ViT-B/16 over synthetic token states).

Each row runs, through :func:`~vitfl.lightning_modules.repair.base.fit_repair` on the same problem,

- ``lp``: :class:`~vitfl.lightning_modules.repair.lp.LPRepair` with its defaults (``--lp_steps`` steps at most), and
- ``de``: :class:`~vitfl.lightning_modules.repair.de.DERepair` with its defaults (population 100, 50 generations, early
  stop after max(int(50 / 10), 10) generations without improvement),

and reports seconds per run, the LP's steps (run / accepted), its seconds per LP solve (HiGHS; cutting-plane
re-solves counted), the largest LP's rows and nonzeros, DE's generations, and the in-sample n_patched / n_broken
of both (exact head, I_neg + I_pos). On these synthetic problems I_neg's labels are random classes, most far
beyond what the located weights can move within DE's value bounds, so few or no inputs can be fixed by any method:
the table measures speed, and whether the two agree that nothing (or how much) is repairable.

    python benchmarks/repair_lp_speed.py                                 # every budget, random + clustered
    python benchmarks/repair_lp_speed.py --placements random clustered fl:ours
    python benchmarks/repair_lp_speed.py --quick                         # smoke run: N = 64, 2 LP steps, 3 DE gens
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from repair_speed import (PLACEMENTS, _table, fl_located, located, make_head, make_states,  # noqa: E402
                          vit_b16_head_and_states)

from vitfl.lightning_modules.repair.base import fit_repair  # noqa: E402
from vitfl.lightning_modules.repair.de import DERepair  # noqa: E402
from vitfl.lightning_modules.repair.lp import LPRepair  # noqa: E402


def run_lp(h, w, x, label, is_neg, **options) -> tuple[float, dict]:
    m = LPRepair(h, w, x[is_neg], label[is_neg], x[~is_neg], label[~is_neg], **options)
    t = time.perf_counter()
    fit_repair(m, enable_progress_bar=False)
    return time.perf_counter() - t, m.summary()


def run_de(h, w, x, label, is_neg, **options) -> tuple[float, dict]:
    m = DERepair(h, w, x[is_neg], label[is_neg], x[~is_neg], label[~is_neg], **options)
    t = time.perf_counter()
    fit_repair(m, enable_progress_bar=False)
    return time.perf_counter() - t, m.summary()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", type=int, default=[236, 472, 944])
    p.add_argument("--placements", nargs="+", default=["random", "clustered"], choices=PLACEMENTS)
    p.add_argument("--lp_steps", type=int, default=None, help="LP steps (default: LPRepair's)")
    p.add_argument("--de_generations", type=int, default=None, help="DE generations (default: DERepair's)")
    p.add_argument("--no_de", action="store_true", help="time the LP only")
    p.add_argument("--quick", action="store_true", help="smoke run: N = 64, random, 2 LP steps, 3 DE generations")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--n_neg", type=int, default=100)
    p.add_argument("--n_pos", type=int, default=500)
    p.add_argument("--images", type=int, default=4, help="random images whose token states feed the ViT-B head")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.budgets, a.placements = [64], ["random"]
        a.lp_steps, a.de_generations = a.lp_steps or 2, a.de_generations or 3
    lp_opts = {} if a.lp_steps is None else {"steps": a.lp_steps}
    de_opts = {} if a.de_generations is None else {"generations": a.de_generations}
    import scipy

    load0 = tuple(round(v, 2) for v in os.getloadavg())
    d, C = a.d, a.classes
    head = make_head(d, 4 * d, C)
    x, label, is_neg = make_states(head, a.n_neg, a.n_pos)
    heads = {"synthetic": (head, x, label, is_neg)}
    if any(pl.startswith("fl:") for pl in a.placements):
        if d != 768:
            raise SystemExit("fl:* placements use ViT-B/16 (d = 768)")
        t = time.perf_counter()
        heads["vit"] = vit_b16_head_and_states(a.n_neg, a.n_pos, C, a.images)
        print(f"ViT-B/16 head and {a.n_neg + a.n_pos} token states built in {time.perf_counter() - t:.1f} s")
    print(f"torch {torch.__version__}, scipy {scipy.__version__} (HiGHS), {torch.get_num_threads()} threads; d={d}, "
          f"4d={4 * d}, C={C}, |I_neg|={a.n_neg}, |I_pos|={a.n_pos}, float32; LP options {lp_opts or 'defaults'}, "
          f"DE options {de_opts or 'defaults'}; load average before: {load0}", flush=True)
    cols = ["N", "placement", "LP s/run", "LP steps", "LP s/solve", "solves", "rows", "nonzeros", "LP stop",
            "LP patched/broken", "DE s/run", "DE gens", "DE patched/broken"]
    rows = []
    for n in a.budgets:
        for placement in a.placements:
            h, xs, ys, negs = heads["vit" if placement.startswith("fl:") else "synthetic"]
            w = (fl_located(h, xs, ys, negs, placement[3:], n) if placement.startswith("fl:")
                 else located(h, n, placement))
            row = {"N": n, "placement": placement}
            s_lp, lp = run_lp(h, w, xs, ys, negs, **lp_opts)
            row.update({"LP s/run": f"{s_lp:.1f}", "LP steps": f"{lp['steps_run']} ({lp['accepted_steps']} acc.)",
                        "LP s/solve": f"{lp['lp_seconds_per_solve']:.2f}", "solves": lp["lp_solves"],
                        "rows": lp["lp_rows_max"], "nonzeros": lp["lp_nnz_max"], "LP stop": lp["stop_reason"],
                        "LP patched/broken": f"{lp['n_patched']}/{lp['n_broken']}"})
            if not a.no_de:
                s_de, de = run_de(h, w, xs, ys, negs, **de_opts)
                row.update({"DE s/run": f"{s_de:.1f}", "DE gens": de["generations_run"],
                            "DE patched/broken": f"{de['n_patched']}/{de['n_broken']}"})
            rows.append(row)
            print(" | ".join(f"{k}={row.get(k, '')}" for k in cols), flush=True)
    print(f"\nload average after: {tuple(round(v, 2) for v in os.getloadavg())}\n")
    print(_table(rows, cols))
    print("\nLP steps: steps run (accepted). LP s/solve: HiGHS seconds per LP solve (cutting-plane re-solves "
          "included); solves: all LP solves of the run; rows / nonzeros: of the largest LP (constraint matrix). "
          "patched/broken: in-sample n_patched of |I_neg| and n_broken of |I_pos| on the exact head. DE gens: "
          "generations run (early stop after 10 without improvement).")
    return rows


if __name__ == "__main__":
    main()
