"""The published exp-repair-4 grid as a benchmark (on demand; prints a table).

exp-repair-4 (RepTran replication, CIFAR-100) ran 9 misclassification settings (src_tgt, tgt_fp, tgt_fn, ranks
1-3) x 5 repetitions x 3 budgets (236 / 472 / 944 weights) x 3 FL methods (ours, ArachneW, random) = 405 DE runs;
its notes give ~400 s a run, ~45 h in all, on an RTX 4090 (Tiny-ImageNet: 80.4 h measured).

Here every run is the project's DE (population 100, 50 generations, deferred updates, the sparse fitness, float32)
at CIFAR-100 shapes (d = 768, d_ff = 3072, C = 100) on the last FFN head of a random-weight HF ViT-B/16 and
synthetic cached states (the residual streams of every token of a few random images entering that FFN), with
|I_pos| = 500 and |I_neg| per setting from ``--n_neg`` (default: typical sizes of the published CIFAR-100
settings, assumed, not measured here: src_tgt ranks 1-3 = 20 / 15 / 12 inputs, tgt_fp = 60 / 50 / 45,
tgt_fn = 55 / 48 / 42). The located weights come from :func:`vitfl.localization.ranking.localize` with the FL method on
the setting's I_neg / I_pos (random: a new seed per repetition); localisation is timed apart from the search.
By default a run has no early stop (all 50 generations: the slowest case); ``--early_stop`` uses the default
patience.

Runs go to ``--procs`` worker processes (default: one per core, each with one thread) or, with ``--device cuda``,
one process per GPU. ``--limit K`` runs K runs spread evenly over the grid (every method, budget and setting
represented) and extrapolates the total from the mean time of each (method, budget) cell; the report says which.

    python benchmarks/repair_grid.py --limit 18          # a quick sample, extrapolated
    python benchmarks/repair_grid.py                      # all 405 runs, measured
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # repair_speed (shared helpers)

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SETTINGS = [f"{kind}_r{r}" for kind in ("src_tgt", "tgt_fp", "tgt_fn") for r in (1, 2, 3)]
DEFAULT_N_NEG = [20, 15, 12, 60, 50, 45, 55, 48, 42]
METHODS = ("ours", "arachne_w", "random")
BUDGETS = (236, 472, 944)
REPS = 5
PUBLISHED_S_PER_RUN, PUBLISHED_TOTAL_H = 400.0, 45.0


def grid() -> list[tuple[int, int, int, str]]:
    """Every (setting index, rep, budget, method), in an order that interleaves methods and budgets."""
    return [(s, r, b, m) for s, r in itertools.product(range(len(SETTINGS)), range(REPS))
            for b, m in itertools.product(BUDGETS, METHODS)]


def spread(tasks: list, k: int) -> list:
    """k tasks stratified over the (budget, method) cells: every cell gets k // cells of them (the first k % cells
    one more), evenly spaced over its settings and repetitions (offset per cell, so the cells sample different
    settings); returned cell by cell in turn. With k >= the number of cells every cell is measured."""
    if k >= len(tasks):
        return list(tasks)
    cells: dict = {}
    for t in tasks:
        cells.setdefault((t[2], t[3]), []).append(t)
    picked = []
    for c, members in enumerate(cells.values()):
        n = k // len(cells) + (1 if c < k % len(cells) else 0)
        step = len(members) / max(n, 1)
        picked.append([members[int((j + c / len(cells)) * step) % len(members)] for j in range(n)])
    return [cell[j] for j in range(max(map(len, picked))) for cell in picked if j < len(cell)]


def prepare(path: str, n_neg: list[int], n_pos: int, images: int, seed: int = 0) -> None:
    """Build the ViT-B/16 head and a pool of states once; workers load them from ``path``."""
    from repair_speed import vit_b16_head_and_states
    need = max(n_neg) * len(SETTINGS) + n_pos
    head, x, _, _ = vit_b16_head_and_states(0, need, 100, images, seed)  # labels are set per setting
    torch.save({"head": head, "pool": x, "n_neg": n_neg, "n_pos": n_pos}, path)


def _worker_init(path: str, device: str, threads: int) -> None:
    global _STATE
    torch.set_num_threads(threads)
    data = torch.load(path, weights_only=False)
    if device == "cuda":  # one process per GPU: the worker's rank picks its GPU
        ident = mp.current_process()._identity
        device = f"cuda:{(ident[0] - 1) % torch.cuda.device_count()}" if ident else "cuda:0"
    data["device"] = device
    data["head"], data["pool"] = data["head"].to(device), data["pool"].to(device)
    _STATE = data


def _states(setting: int):
    """I_neg (n_neg[setting] states relabelled to another class) and I_pos (500 states, the head's labels)."""
    from repair_speed import label_states
    st = _STATE
    n_neg, n_pos, pool = st["n_neg"][setting], st["n_pos"], st["pool"]
    g = torch.Generator().manual_seed(1000 + setting)
    neg_idx = n_pos + torch.randperm(len(pool) - n_pos, generator=g)[:n_neg]
    x = torch.cat([pool[neg_idx], pool[:n_pos]])
    label, is_neg = label_states(st["head"], x, n_neg, seed=setting)
    return x, label.to(x.device), is_neg.to(x.device)


def run_one(task: tuple[int, int, int, str], generations: int = 50, early_stop: bool = False,
            epilogue: str = "eager") -> dict:
    from repair_speed import _sync, de_for
    from vitfl.lightning_modules.repair.fitness import SparseFitness
    from vitfl.localization.ranking import localize
    s, rep, budget, method = task
    st = _STATE
    dev = torch.device(st["device"])
    head = st["head"]
    x, label, is_neg = _states(s)
    t = time.perf_counter()
    w = localize(head, x, label, is_neg, method, budget, seed=rep).weights
    fl_s = time.perf_counter() - t
    hd = head.to(dev)
    t, c = time.perf_counter(), time.process_time()
    fitness = SparseFitness(hd, w, x.to(dev), label.to(dev), is_neg.to(dev), epilogue=epilogue)
    de = de_for(hd, w, fitness, "deferred", generations, seed=rep, device=dev)
    if early_stop:
        de.patience = max(int(generations / 10), 10)
    de.run()
    _sync(dev)
    return {"setting": SETTINGS[s], "rep": rep, "budget": budget, "method": method, "run_s": time.perf_counter() - t,
            "cpu_s": time.process_time() - c, "fl_s": fl_s, "generations": de.generation, "kernel": fitness.kernel,
            "epilogue": epilogue,
            "touched_neurons": fitness.info()["touched_neurons"], "touched_rows": fitness.info()["touched_rows"],
            "pid": os.getpid()}


def _run_star(args):
    return run_one(*args)


def machine_gemm_rate(device: str, threads: int) -> float:
    """float32 GEMM GFLOP/s at ``[1500, 768] x [768, 768]`` with a worker's thread count (as repair_speed.py
    measures it): printed before and after the grid, so a slow sitting can be told apart from a slow change."""
    from repair_speed import gemm_rate
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return gemm_rate(1500, 768, 768, device) / 1e9
    finally:
        torch.set_num_threads(old)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="run only this many runs, spread over the grid")
    p.add_argument("--procs", type=int, default=None, help="worker processes (default: cores, or GPUs with cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--generations", type=int, default=50)
    p.add_argument("--early_stop", action="store_true", help="default patience (else all generations run)")
    p.add_argument("--epilogue", default="eager", choices=["eager", "compiled"],
                   help="the sparse fitness pass (compiled: torch.compile once per worker, inside its first run)")
    p.add_argument("--n_neg", type=int, nargs=9, default=DEFAULT_N_NEG, metavar="N",
                   help="|I_neg| of the 9 settings (src_tgt r1-3, tgt_fp r1-3, tgt_fn r1-3)")
    p.add_argument("--n_pos", type=int, default=500)
    p.add_argument("--images", type=int, default=8, help="random images whose token states form the pool")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    procs = a.procs or (torch.cuda.device_count() if a.device == "cuda" else os.cpu_count() or 1)
    tasks = grid()
    chosen = spread(tasks, a.limit) if a.limit else tasks
    load0 = tuple(round(v, 2) for v in os.getloadavg())
    gemm0 = machine_gemm_rate(a.device, a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "grid_state.pt")
        t0 = time.perf_counter()
        prepare(path, a.n_neg, a.n_pos, a.images)
        prep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ctx = mp.get_context("spawn")
        with ctx.Pool(procs, initializer=_worker_init, initargs=(path, a.device, a.threads)) as pool:
            results = []
            for r in pool.imap_unordered(_run_star, [(t, a.generations, a.early_stop, a.epilogue)
                                                          for t in chosen]):
                results.append(r)
                print(f"[{len(results)}/{len(chosen)}] {r['setting']} rep {r['rep']} N={r['budget']} "
                      f"{r['method']}: {r['run_s']:.2f} s, CPU {r['cpu_s']:.2f} s ({r['generations']} gens, "
                      f"{r['kernel']}/{r['epilogue']}, "
                      f"|J|={r['touched_neurons']}, |I|={r['touched_rows']}; FL {r['fl_s']:.2f} s)", flush=True)
        wall = time.perf_counter() - t0
    load1 = tuple(round(v, 2) for v in os.getloadavg())
    gemm1 = machine_gemm_rate(a.device, a.threads)
    cells, cpu_cells = {}, {}
    for r in results:
        cells.setdefault((r["method"], r["budget"]), []).append(r["run_s"])
        cpu_cells.setdefault((r["method"], r["budget"]), []).append(r["cpu_s"])
    per_cell = len(tasks) // (len(METHODS) * len(BUDGETS))
    print(f"\n{len(results)} of {len(tasks)} runs on {procs} {a.device} worker(s) x {a.threads} thread(s); "
          f"set-up {prep_s:.1f} s; load average before {load0}, after {load1}; float32 GEMM at [1500, 768] x "
          f"[768, 768] with {a.threads} thread(s): {gemm0:.0f} GFLOP/s before, {gemm1:.0f} after\n")
    print("| method | N | runs | mean s/run (wall) | max s/run (wall) | mean CPU s/run |")
    print("|---|---|---|---|---|---|")
    for m, b in itertools.product(METHODS, BUDGETS):
        v = cells.get((m, b), [])
        if v:
            print(f"| {m} | {b} | {len(v)} | {statistics.mean(v):.2f} | {max(v):.2f} | "
                  f"{statistics.mean(cpu_cells[(m, b)]):.2f} |")
        else:
            print(f"| {m} | {b} | 0 | not sampled | not sampled | not sampled |")
    busy = sum(r["run_s"] + r["fl_s"] for r in results)
    out = {"runs": len(results), "wall_s": wall, "procs": procs, "busy_s": busy, "gemm_gflops": (gemm0, gemm1)}
    if len(results) == len(tasks):
        out["total_s"], out["kind"] = wall, "measured"
    elif len(cells) == len(METHODS) * len(BUDGETS):
        est_busy = sum(statistics.mean(v) * per_cell for v in cells.values())
        fl_mean = statistics.mean(r["fl_s"] for r in results)
        eff = busy / (wall * procs) if wall > 0 else 1.0  # how well the workers were kept busy in the sample
        out["total_s"] = (est_busy + fl_mean * len(tasks)) / (procs * max(min(eff, 1.0), 1e-9))
        out["kind"] = "extrapolated from the sample (per-cell mean x 45 runs, over the workers)"
        if a.device == "cpu" and a.threads == 1:  # what the search costs when the cores are not shared
            cpu_total = sum(statistics.mean(v) * per_cell for v in cpu_cells.values())
            out["cpu_total_s"] = cpu_total
            print(f"CPU time of the 405 searches (extrapolated): {cpu_total / 3600:.2f} core-hours, i.e. "
                  f"{cpu_total / procs / 3600:.2f} h on {procs} unshared cores (localisation not included)")
    else:
        out["kind"] = "not extrapolated: the sample misses a (method, budget) cell; use --limit >= 9"
    total = out.get("total_s")
    print(f"\nwall time of these {len(results)} runs: {wall:.1f} s")
    if total is not None:
        print(f"all 405 runs: {total / 3600:.2f} h ({out['kind']}); published: ~{PUBLISHED_TOTAL_H:.0f} h on an "
              f"RTX 4090 ({PUBLISHED_S_PER_RUN:.0f} s a run), {PUBLISHED_TOTAL_H * 3600 / total:.0f}x faster")
    else:
        print(out["kind"])
    return out


if __name__ == "__main__":
    main()
