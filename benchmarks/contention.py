"""Wall time under contention: the toolkit's DE repair and FL step before and after the passive OpenMP wait
policy (:mod:`vitfl.core.threads`), against an independent numpy DE of the same scheme, each quiet and with k competing
CPU-bound processes, in one invocation (on demand; prints a Markdown table).

The problem (testbed-like shapes): an FFN head with d = 64, d_ff = 256, 10 classes (LayerNorm -> Linear after the
block, non-trivial LayerNorms), |I_neg| = 100 and |I_pos| = 300 random cached states (I_pos labelled with the
head's prediction, I_neg with another class), 300 located weights drawn uniformly over both matrices.

The toolkit runs in two child processes started by this one, identical but for the environment the OpenMP runtime
reads when torch is imported: ``before`` without any wait variable (libgomp's default: idle threads spin, as the
toolkit ran until :mod:`vitfl.core.threads`), ``after`` with :func:`vitfl.core.threads.configure_openmp`'s defaults
(``OMP_WAIT_POLICY=PASSIVE``: what ``vitfl.pipeline.parallel``'s workers get, and any process that calls it before
``import torch``). Workloads (each timed alone, ``--repeats`` times per load):

- ``DE toolkit``: :class:`DifferentialEvolution` with the default evaluator (:class:`SparseFitness`), P = 100,
  ``--generations`` generations (no early stop), seed 0: the search :class:`DERepair` runs; on the first of
  ``--threads`` (torch's default: one per core) before and after, and on each further count before. The patches
  are compared bit for bit: before and after must agree (the wait policy changes no arithmetic); other thread
  counts may not (MKL's products are not bit-identical across thread counts at every shape).
- ``DE reference``: the same scheme written plainly in numpy here (DE/rand/1/bin, P = 100, the same generations,
  CR = 0.7, F ~ U(0.5, 1) per generation, bounds and initial distribution per matrix, greedy >= replacement;
  Arachne's fitness with alpha = 10 from a float32 forward of the whole head per candidate, exact GELU via
  ``scipy.special.erf``), numpy's BLAS on ``--ref_threads`` threads (default 1: a plain single-threaded program,
  the yardstick of a fair share; 0: OpenBLAS's default, whose threads wait by spinning too): the independent
  implementation, run in the ``before`` child.
- ``FL <method>`` (``--fl_methods``; none: ``--no_fl``): :func:`vitfl.localization.ranking.localize` of the budget on the
  same head and states, ``--fl_calls`` calls per timed run, on the same thread counts before and after.

Loads: ``quiet`` (nothing started here; the machine may be shared: the load average and the cores that other
processes kept busy, from ``/proc/stat``, are printed per phase) and ``loaded``: k = ``--competitors`` (default:
one per core of this process's CPUs) processes started with ``fork``, each in its own session (as another user's
job: the scheduler's autogroups treat it so), running a Python busy loop (``--competitor python``) or float32
64 x 64 numpy products on one BLAS thread (``numpy``), killed after the phase. The repeats alternate the order of
the two loads.

Diagnosis: ``--env GOMP_SPINCOUNT=1000`` (more toolkit processes with other OpenMP variables), ``--threads 2 1 3``
(3 threads on 2 cores: libgomp spins only briefly when it has more threads than CPUs), ``--fifo 10`` (the quiet
phases with every thread of the measured processes at real-time priority: an idle machine emulated on a shared
one, where nothing else runs while they work; ``--competitors 0`` then compares it with the shared machine as is).


Per workload: the median wall time and CPU time (of its process, all threads: spinning OpenMP threads count) per
load, ``slowdown`` = median over repeats of loaded / quiet wall time, and ``x ref`` = slowdown / the reference's
slowdown. Only ratios measured in one invocation are comparable.

    python benchmarks/contention.py                                  # ~2-3 minutes on 2 cores
    python benchmarks/contention.py --repeats 3 --threads 2 1 --fl_methods arachne_w grad_loss
    python benchmarks/contention.py --threads 2 1 3 --env GOMP_SPINCOUNT=1000 GOMP_SPINCOUNT=10000
    python benchmarks/contention.py --fifo 10                            # quiet = an idle machine, emulated
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vitfl.core import threads as ct  # noqa: E402  (imports no torch: the parent never loads an OpenMP runtime)


# ------------------------------------------------------------------------------------------------ competitors
def _compete(kind: str, started) -> None:  # pragma: no cover - runs in a child until killed
    os.setsid()  # its own session: an autogroup of its own, like another user's job
    started.set()
    if kind == "numpy":
        import numpy as np
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(1)
        except ImportError:
            pass
        a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        while True:
            a = np.tanh(a @ a)
    x = 0
    while True:
        x += 1


class Competitors:
    """``k`` CPU-bound processes while the block runs (killed on exit)."""

    def __init__(self, k: int, kind: str):
        self.k, self.kind, self.procs = k, kind, []

    def __enter__(self):
        ctx = mp.get_context("fork")
        for _ in range(self.k):
            ev = ctx.Event()
            p = ctx.Process(target=_compete, args=(self.kind, ev), daemon=True)
            p.start()
            ev.wait(10)
            self.procs.append(p)
        if self.k:
            time.sleep(0.3)  # let the scheduler see them
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join()
        self.procs = []
        return False


# ------------------------------------------------------------------------------------------------ the reference
def _layer_norm(x, g, b, eps: float):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / (var + eps) ** 0.5 * g + b


class NumpyDE:
    """DE/rand/1/bin on the located weights with Arachne's fitness, plainly in numpy (float32 forward)."""

    def __init__(self, head, weights, x, label, is_neg, pop_size: int = 100, generations: int = 10,
                 alpha: float = 10.0, cr: float = 0.7, seed: int = 0):
        import numpy as np
        from scipy.special import erf

        self.np, self.erf = np, erf
        f32 = lambda t: t.detach().cpu().numpy().astype(np.float32)  # noqa: E731
        self.Wb, self.bb = f32(head.fc_bef.weight), f32(head.fc_bef.bias)
        self.Wa, self.ba = f32(head.fc_aft.weight), f32(head.fc_aft.bias)
        ln1, ln2, lin = head.norm, head.post[0], head.post[1]
        self.ln2 = (f32(ln2.weight), f32(ln2.bias), ln2.eps)
        self.Wc, self.bc = f32(lin.weight), f32(lin.bias)
        self.x = f32(x)
        self.h = _layer_norm(self.x, f32(ln1.weight), f32(ln1.bias), ln1.eps).astype(np.float32)
        self.label = label.cpu().numpy()
        self.neg = is_neg.cpu().numpy().astype(bool)
        w = weights.cpu().numpy()
        self.kb, self.ka = np.nonzero(w[:, 0] == 0)[0], np.nonzero(w[:, 0] == 1)[0]
        self.rb, self.cb = w[self.kb, 1], w[self.kb, 2]
        self.ra, self.ca = w[self.ka, 1], w[self.ka, 2]
        lo, hi, mu, sd = (np.empty(len(w)) for _ in range(4))
        for k, W in ((0, self.Wb), (1, self.Wa)):
            sel = w[:, 0] == k
            wmin, wmax = float(W.min()), float(W.max())
            lo[sel] = 2 * wmin if wmin < 0 else wmin / 2
            hi[sel] = 2 * wmax if wmax > 0 else wmax / 2
            mu[sel], sd[sel] = float(W.mean()), float(W.std())
        self.lo, self.hi, self.mu, self.sd = (v.astype(np.float32) for v in (lo, hi, mu, sd))
        self.P, self.G, self.alpha, self.cr, self.seed = pop_size, generations, alpha, cr, seed

    def fitness_one(self, v) -> float:
        np = self.np
        Wb, Wa = self.Wb.copy(), self.Wa.copy()
        Wb[self.rb, self.cb] = v[self.kb]
        Wa[self.ra, self.ca] = v[self.ka]
        z = self.h @ Wb.T + self.bb
        a = (0.5 * z * (1.0 + self.erf(z / np.float32(math.sqrt(2.0))))).astype(np.float32)
        r = self.x + (a @ Wa.T + self.ba)
        logits = _layer_norm(r, *self.ln2) @ self.Wc.T + self.bc
        zy = logits[np.arange(len(logits)), self.label]
        m = logits.max(1)
        L = m + np.log(np.exp(logits - m[:, None]).sum(1)) - zy
        score = np.where(logits.argmax(1) == self.label, 1.0, 1.0 / (L.astype(np.float64) + 1.0))
        return float(score[~self.neg].sum() + self.alpha * score[self.neg].sum())

    def run(self):
        np = self.np
        P, K = self.P, len(self.lo)
        rng = np.random.default_rng(self.seed)
        pop = (self.mu + self.sd * rng.standard_normal((P, K))).astype(np.float32)
        fit = np.array([self.fitness_one(v) for v in pop])
        for _ in range(self.G):
            F = rng.uniform(0.5, 1.0)
            keys = rng.random((P, P))
            np.fill_diagonal(keys, 2.0)
            r = np.argsort(keys, 1)[:, :3]
            mutant = np.clip(pop[r[:, 0]] + np.float32(F) * (pop[r[:, 1]] - pop[r[:, 2]]), self.lo, self.hi)
            mask = rng.random((P, K)) < self.cr
            mask[np.arange(P), rng.integers(0, K, P)] = True
            trials = np.where(mask, mutant, pop)
            tfit = np.array([self.fitness_one(v) for v in trials])
            keep = tfit >= fit
            pop, fit = np.where(keep[:, None], trials, pop), np.where(keep, tfit, fit)
        return pop[int(np.argmax(fit))]


# ------------------------------------------------------------------------------------------------ the child
def serve(a) -> None:
    """A toolkit process: builds the problem, then runs the commands it reads (JSON lines) and answers each."""
    import contextlib

    import torch

    from vitfl.lightning_modules.repair.fitness import SparseFitness
    from vitfl.localization.ranking import localize
    from repair_speed import de_for, located, make_head, make_states

    default_threads = torch.get_num_threads()
    head = make_head(a.d, a.d_ff, a.classes)
    x, label, is_neg = make_states(head, a.n_neg, a.n_pos)
    w = located(head, a.budget, "random")
    ref = NumpyDE(head, w, x, label, is_neg, generations=a.generations, seed=a.seed)

    def blas(n: int):
        if not n:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits
        return threadpool_limits(limits=n, user_api="blas")

    def de(threads: int):
        torch.set_num_threads(threads)
        fit = SparseFitness(head, w, x, label, is_neg)
        search = de_for(head, w, fit, "deferred", a.generations, seed=a.seed)
        search.patience = 10 ** 9
        t0, c0 = time.perf_counter(), time.process_time()
        best = search.run()
        out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
               "patch": hashlib.sha256(best.contiguous().numpy().tobytes()).hexdigest()[:16]}
        torch.set_num_threads(default_threads)
        return out

    def fl(method: str, threads: int, calls: int):
        torch.set_num_threads(threads)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            localize(head, x, label, is_neg, method, a.budget)
        out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
        torch.set_num_threads(default_threads)
        return out

    def reference():
        with blas(a.ref_threads):
            t0, c0 = time.perf_counter(), time.process_time()
            ref.run()
            return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}

    sparse = SparseFitness(head, w, x, label, is_neg)
    info = {"ready": True, "threads": default_threads, "torch": torch.__version__,
            "fitness_toolkit": float(sparse(sparse.old[None]).fitness[0]),
            "fitness_reference": ref.fitness_one(sparse.old.numpy()),
            "openmp_loaded_with": {k: os.environ[k] for k in ct.WAIT_VARIABLES if k in os.environ}}
    de(default_threads)  # warm-up (first allocations), untimed
    for m in a.fl_methods:
        localize(head, x, label, is_neg, m, a.budget)
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        res = (de(cmd["threads"]) if cmd["op"] == "de" else fl(cmd["method"], cmd["threads"], a.fl_calls)
               if cmd["op"] == "fl" else reference())
        print(json.dumps(res), flush=True)


class Child:
    """A toolkit process (:func:`serve`) with the given environment."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", *argv], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.info = json.loads(self.proc.stdout.readline() or "{}")
        if not self.info.get("ready"):
            raise SystemExit("a toolkit process failed to start (its error is above)")

    def schedule(self, fifo: int) -> None:
        """Every thread of the process under SCHED_FIFO ``fifo`` (0: back to the normal policy)."""
        policy = ["-f", "-p", str(fifo)] if fifo else ["-o", "-p", "0"]
        subprocess.run(["chrt", "-a", *policy, str(self.proc.pid)], check=True, stdout=subprocess.DEVNULL)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(30)


# ------------------------------------------------------------------------------------------------ the parent
def _busy_seconds() -> float | None:
    """Busy seconds (user, nice, system, irq, softirq, steal) of this process's CPUs since boot, from /proc/stat."""
    try:
        cpus = os.sched_getaffinity(0)
        total = 0
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                p = line.split()
                if p[0] != "cpu" and int(p[0][3:]) in cpus:
                    v = [int(t) for t in p[1:9]]
                    total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        return total / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each workload per load")
    p.add_argument("--competitors", type=int, default=cores, help="CPU-bound processes in the loaded phase")
    p.add_argument("--competitor", default="python", choices=["python", "numpy"])
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts: the first runs before and after, the others before only "
                        "(default: torch's default, then 1)")
    p.add_argument("--ref_threads", type=int, default=1,
                   help="numpy BLAS threads of the reference (0: BLAS's default; >0 needs threadpoolctl)")
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n_neg", type=int, default=100)
    p.add_argument("--n_pos", type=int, default=300)
    p.add_argument("--budget", type=int, default=300, help="located weights")
    p.add_argument("--fl_methods", nargs="+", default=["arachne_w"])
    p.add_argument("--fl_calls", type=int, default=10, help="localize calls per timed FL run")
    p.add_argument("--no_fl", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--env", nargs="+", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                   help="further toolkit processes, each with these OpenMP variables (e.g. GOMP_SPINCOUNT=1000): "
                        "their DE and FL rows on the first thread count")
    p.add_argument("--fifo", type=int, default=0, metavar="PRIORITY",
                   help="quiet phases with every thread of the measured processes under SCHED_FIFO PRIORITY (chrt; "
                        "needs the privilege): an idle machine emulated on a shared one; loaded phases as usual")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(raw)
    if a.no_fl:
        a.fl_methods = []
    if a.serve:
        serve(a)
        return []
    child_argv = [s for s in raw if s != "--serve"]
    base = {k: v for k, v in os.environ.items() if k not in ct.WAIT_VARIABLES}
    base["PYTHONUNBUFFERED"] = "1"
    user_wait = {k: os.environ[k] for k in ct.WAIT_VARIABLES if k in os.environ}
    print(f"load average before: {_load()}", flush=True)
    t_start = time.perf_counter()
    variants = {"before": base, "after": {**base, **ct.openmp_defaults(base)}}
    for spec in a.env:
        variants[spec] = {**base, **dict(kv.split("=", 1) for kv in spec.split(","))}
    kids = {k: Child(child_argv, env) for k, env in variants.items()}
    try:
        info = kids["before"].info
        threads = a.threads or sorted({info["threads"], 1}, reverse=True)
        T0 = threads[0]
        print(f"torch {info['torch']} ({info['threads']} threads by default); {cores} cores (this process's CPUs); "
              f"d={a.d}, d_ff={a.d_ff}, C={a.classes}, |I_neg|={a.n_neg}, |I_pos|={a.n_pos}, {a.budget} weights, "
              f"P=100, {a.generations} generations; load: {a.competitors} x {a.competitor} competitors; "
              f"{a.repeats} repeats; OpenMP wait variables: "
              + ", ".join(f"{k} {c.info['openmp_loaded_with']}" for k, c in kids.items())
              + (f" (the caller's {user_wait} are set aside)" if user_wait else "")
              + (f"; quiet phases under SCHED_FIFO {a.fifo} (an idle machine emulated)" if a.fifo else ""))
        print(f"fitness of the original weights: toolkit {info['fitness_toolkit']:.4f}, "
              f"reference {info['fitness_reference']:.4f}", flush=True)
        wait = {"before": "spin (default)", "after": ", ".join(f"{k}={v}" for k, v in ct.openmp_defaults(base).items()),
                **{k: k for k in a.env}}
        work = [(f"DE toolkit, {k}", k, T0, {"op": "de", "threads": T0}) for k in kids]
        work += [("DE toolkit", "before", T, {"op": "de", "threads": T}) for T in threads[1:]]
        work.append(("DE reference (numpy)", "before", None, {"op": "ref"}))
        for m in a.fl_methods:
            work += [(f"FL {m} x{a.fl_calls}, {k}", k, T0, {"op": "fl", "method": m, "threads": T0})
                     for k in kids]
            work += [(f"FL {m} x{a.fl_calls}", "before", T, {"op": "fl", "method": m, "threads": T})
                     for T in threads[1:]]
        res = {i: {"quiet": [], "loaded": []} for i in range(len(work))}
        others = {"quiet": [], "loaded": []}
        for rep in range(a.repeats):
            for load in (("quiet", "loaded") if rep % 2 == 0 else ("loaded", "quiet")):
                if a.fifo:
                    for kid in kids.values():
                        kid.schedule(a.fifo if load == "quiet" else 0)
                with Competitors(a.competitors if load == "loaded" else 0, a.competitor):
                    t0, b0, own = time.perf_counter(), _busy_seconds(), 0.0
                    for i, (name, kid, T, cmd) in enumerate(work):
                        r = kids[kid].ask(**cmd)
                        res[i][load].append(r)
                        own += r["cpu"]
                        thr = f"torch {T}" if T else f"BLAS {a.ref_threads or 'default'}"
                        print(f"  repeat {rep + 1} {load:6s} {name:36s} {thr:9s} wall {r['wall']:7.2f} s  "
                              f"cpu {r['cpu']:7.2f} s" + (f"  patch {r['patch']}" if "patch" in r else ""),
                              flush=True)
                    b1 = _busy_seconds()
                    if b0 is not None and b1 is not None:
                        others[load].append((b1 - b0 - own) / (time.perf_counter() - t0))
                        print(f"  repeat {rep + 1} {load:6s} other processes kept {others[load][-1]:.2f} of {cores} "
                              f"cores busy", flush=True)
    finally:
        for k in kids.values():
            k.close()
    print(f"load average after: {_load()}; {time.perf_counter() - t_start:.0f} s in all")
    ratio = lambda i: [l["wall"] / q["wall"] for q, l in zip(res[i]["quiet"], res[i]["loaded"])]  # noqa: E731
    ref_i = next(i for i, w in enumerate(work) if w[3]["op"] == "ref")
    ref_slow = statistics.median(ratio(ref_i))
    rows = []
    for i, (name, kid, T, cmd) in enumerate(work):
        rs = ratio(i)
        med = lambda load, k: statistics.median(r[k] for r in res[i][load])  # noqa: E731
        rows.append({"workload": name,
                     "threads": f"torch {T}" if T else f"numpy BLAS {a.ref_threads or 'default'}",
                     "OpenMP wait": "-" if T == 1 or not T else wait[kid],
                     "quiet wall s": f"{med('quiet', 'wall'):.2f}", "loaded wall s": f"{med('loaded', 'wall'):.2f}",
                     "slowdown": f"{statistics.median(rs):.2f}" + (f" ({min(rs):.2f}-{max(rs):.2f})"
                                                                  if len(rs) > 1 else ""),
                     "x ref": f"{statistics.median(rs) / ref_slow:.2f}",
                     "quiet CPU s": f"{med('quiet', 'cpu'):.2f}", "loaded CPU s": f"{med('loaded', 'cpu'):.2f}"})
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")
    patches = {(w[1], w[2]): {r["patch"] for ld in res[i] for r in res[i][ld]}
               for i, w in enumerate(work) if w[3]["op"] == "de"}
    same = all(patches[(k, T0)] == patches[("before", T0)] for k in kids) and len(patches[("before", T0)]) == 1
    print(f"\nslowdown: median over {a.repeats} repeats of loaded / quiet wall time (min-max); x ref: slowdown / the "
          f"reference's. Other processes kept busy (cores, per phase): "
          + "; ".join(f"{ld} " + ", ".join(f"{v:.2f}" for v in vs) for ld, vs in others.items())
          + f". DE patch the same in every process ({', '.join(kids)}; {T0} threads, every run): "
          f"{'yes' if same else 'NO'}; "
          + "; ".join(f"{T} thread(s) == {T0}: {'yes' if patches[('before', T)] == patches[('before', T0)] else 'no'}"
                      for T in threads[1:])
          + (f". Quiet phases under SCHED_FIFO {a.fifo}: an idle machine emulated (other processes ran only when "
             "the measured ones waited, or in the 5% of each second the kernel keeps from real-time threads)"
             if a.fifo else ""))
    return rows


if __name__ == "__main__":
    main()
