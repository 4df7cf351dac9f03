"""A method is one file: a third-party package with one FL-method file and one repair-method file, advertised
through Python entry points, appears in ``--list``, runs in a sweep and gets its rows in the tables and statistics,
with no edit anywhere in the toolkit."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FL_FILE = '''
"""my_fl: |W| of the located weights times the I_neg count (a toy method for the plugin test)."""
import torch

from vitfl.localization.base import Localizer, register_localizer


@register_localizer("my_fl")
class MyFL(Localizer):
    """score(w) = |w| * (number of I_neg inputs seen), ``[2 d d_ff]``."""

    level = "weight"

    def __init__(self, head, seed=0, scale: float = 1.0, **kw):
        super().__init__(head, seed=seed, **kw)
        self.scale = float(scale)
        self.add_state("n_neg", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x, label, is_neg):
        self.n_neg += is_neg.sum()

    def compute(self):
        w = torch.cat([p.detach().abs().reshape(-1) for p in self.head.weights()]).double()
        return w * self.scale * self.n_neg

    def options(self):
        return {"scale": self.scale}
'''

REPAIR_FILE = '''
"""my_repair: set every located weight to half its value (a toy repair for the plugin test)."""
from vitfl.lightning_modules.repair import register_repair
from vitfl.lightning_modules.repair.base import RepairModule


@register_repair("my_repair", optimises="nothing: halves the located weights")
class HalfRepair(RepairModule):
    """w <- w / 2 for every located weight."""

    def __init__(self, head, weights, x_neg, label_neg, x_pos, label_pos, seed=0, factor: float = 0.5, **kw):
        super().__init__(head, weights, x_neg, label_neg, x_pos, label_pos, seed, **kw)
        self.automatic_optimization = False
        self.factor = float(factor)

    def training_step(self, batch, batch_idx):
        self._count_step()

    def new_values(self):
        return self.old_values * self.factor

    def options(self):
        return {"factor": self.factor}
'''


@pytest.fixture
def plugin(tmp_path):
    """A plugin installed the way pip would: a package plus its dist-info with entry points, on PYTHONPATH."""
    site = tmp_path / "site"
    pkg = site / "vitfl_plugin_demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "my_fl.py").write_text(FL_FILE)
    (pkg / "my_repair.py").write_text(REPAIR_FILE)
    dist = site / "vitfl_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vitfl-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [vitfl.fl_methods]
        my_fl = vitfl_plugin_demo.my_fl

        [vitfl.repair_methods]
        my_repair = vitfl_plugin_demo.my_repair
        """))
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    return env


def _run(args, env, timeout=300):
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_plugin_methods_are_listed_swept_and_tabulated(plugin, tmp_path, make_classifier):
    from test_repair_sweep import make_run

    listed = _run(["scripts/localize.py", "--list", "--verbose"], plugin)
    assert "my_fl: score(w) = |w|" in listed and "vitfl_plugin_demo.my_fl" in listed
    assert "my_repair" in _run(["scripts/repair_sweep.py", "--list"], plugin)
    assert "my_fl" not in _run(["scripts/localize.py", "--list"], {**plugin, "PYTHONPATH": str(REPO)})

    store, _, _ = make_run(tmp_path / "run", make_classifier)
    out = _run(["scripts/repair_sweep.py", "--run_dirs", f"demo={store.root}", "--methods", "my_fl", "random",
                "--settings", "all", "--budgets", "6", "--reps", "2", "--repair", "my_repair", "--no_tensorboard",
                "--aggregate"], plugin)
    assert "4 runs aggregated" in out
    runs = store.list_results("repair_result")
    assert sorted((r["method"], r["repair"]) for r in runs) == [("my_fl", "my_repair")] * 2 + \
        [("random", "my_repair")] * 2
    mine = [r for r in runs if r["method"] == "my_fl"]
    assert all(r["fitness"]["options"]["factor"] == 0.5 for r in mine)
    summary = (store.repair_summary_dir / "summary.md").read_text()
    assert "| my_fl |" in summary and "| my_repair |" in summary
    stats = (store.repair_summary_dir / "stats_mann_whitney.csv").read_text()
    assert "my_fl" in stats and "random" in stats  # a new FL method gets its comparison rows
