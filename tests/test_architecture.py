"""The house stays as designed: import contracts (import-linter, configured in pyproject.toml), no argv or default
output folder below scripts/, and no pointer to files a user never gets."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "localization", "datamodules", "callbacks", "lightning_modules", "evaluation", "adequacy",
            "pipeline")


def _py_files(*roots: str):
    for root in roots:
        yield from sorted((REPO / root).rglob("*.py"))


def test_import_contracts_hold():
    out = subprocess.run([sys.executable, "-c", "import sys, vitfl; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_contracts_can_fail(tmp_path):
    """The checker itself catches a forbidden import (so the test above can fail)."""
    cfg = tmp_path / "contracts.toml"
    cfg.write_text('[tool.importlinter]\nroot_packages = ["vitfl"]\n\n'
                   '[[tool.importlinter.contracts]]\nname = "localization must not import core"\n'
                   'type = "forbidden"\nsource_modules = ["vitfl.localization"]\nforbidden_modules = ["vitfl.core"]\n')
    out = subprocess.run([sys.executable, "-c", "import sys, vitfl; from importlinter.cli import lint_imports; "
                          f"sys.exit(lint_imports(config_filename={str(cfg)!r}, no_cache=True))"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "broken" in out.stdout.lower()


def test_nothing_below_scripts_reads_argv_or_builds_its_own_cli():
    offenders = []
    for path in _py_files(*PACKAGES):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} sys.argv")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "argparse" in names:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} argparse")
    assert not offenders, offenders


def test_no_default_output_folder_below_scripts():
    pat = re.compile(r"""["'](\.\/)?outputs/""")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in _py_files(*PACKAGES)
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)
                 and not line.lstrip().startswith("#")]
    assert not offenders, offenders


def test_repository_points_only_at_its_own_files():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pat = re.compile(r"\.\./shared|DESIGN\.md|seeds/0")
    offenders = []
    for name in tracked:
        if name.startswith("tests/") or not name.endswith((".py", ".md", ".yaml", ".cfg", ".toml", ".sh", ".txt")):
            continue
        p = REPO / name
        if p.is_file() and pat.search(p.read_text(errors="ignore")):
            offenders.append(name)
    assert not offenders, offenders


# ------------------------------------------------------------------------------- only the run store builds paths
#: expressions that are a run directory or one of the store's folders: joining a name onto one builds a path in a run
_STORE_DIRS = ("root", "checkpoints", "repair_summary_dir", "adequacy_dir", "report_dir", "repair_dir", "tensorboard")
_RUN_NAMES = ("run_dir", "run_root", "rundir", "run_path")


def _is_run_dir(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and node.attr in _STORE_DIRS + _RUN_NAMES:
        return True
    if isinstance(node, ast.Name) and node.id in _RUN_NAMES:
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("str", "Path", "os.fspath"):
        return bool(node.args) and _is_run_dir(node.args[0])
    return False


def run_path_joins(source: str) -> list[tuple[int, str]]:
    """Every place in ``source`` that joins a name onto a run directory or a store folder: ``x.root / "a"``,
    ``os.path.join(str(x.root), "a")``, ``Path(run_dir) / "a"``, ``f"{run_dir}/a"``."""
    hits = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) and _is_run_dir(n.left):
            hits.append((n.lineno, ast.unparse(n)))
        elif isinstance(n, ast.Call) and ast.unparse(n.func) in ("os.path.join", "join", "posixpath.join") \
                and n.args and _is_run_dir(n.args[0]):
            hits.append((n.lineno, ast.unparse(n)))
        elif isinstance(n, ast.JoinedStr) and len(n.values) > 1 and isinstance(n.values[0], ast.FormattedValue) \
                and _is_run_dir(n.values[0].value) and isinstance(n.values[1], ast.Constant) \
                and str(n.values[1].value).startswith("/"):
            hits.append((n.lineno, ast.unparse(n)))
    return hits


def test_only_the_run_store_joins_paths_onto_a_run_directory():
    """Every path inside a run comes from core/runstore.py (LAYOUT and its methods); scripts/ and benchmarks/ are
    checked too. A join elsewhere is a path the store's name checks, containment check and generated layout
    document never see."""
    found = []
    for path in _py_files(*PACKAGES, "scripts", "benchmarks"):
        rel = path.relative_to(REPO).as_posix()
        if rel == "core/runstore.py":
            continue
        found += [f"{rel}:{line}: {code}" for line, code in run_path_joins(path.read_text())]
    assert found == [], "paths joined outside the run store (add a LAYOUT entry and ask the store):\n" + \
        "\n".join(found)


def test_one_list_of_silenced_warnings():
    """Warnings are silenced by pattern only in core/quiet.py (KNOWN_WARNINGS and its named entries): a literal
    pattern elsewhere is a second list that drifts from the first."""
    literal = re.compile(r"""filterwarnings\(\s*["']ignore["']\s*,\s*(message\s*=\s*)?[rbf]?["']""")
    found = [f"{p.relative_to(REPO).as_posix()}:{i}" for p in _py_files(*PACKAGES, "scripts")
             if p.relative_to(REPO).as_posix() != "core/quiet.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert found == [], found
    assert literal.search('warnings.filterwarnings("ignore", message=".*x.*")')  # the scan can fail


def test_the_join_scanner_can_fail():
    src = ('import os\nfrom pathlib import Path\n'
           'a = store.root / "x"\nb = os.path.join(str(layout.root), "y")\nc = Path(run_dir) / "z"\n'
           'd = f"{a.run_dir}/w"\ne = store.checkpoints / "last.ckpt"\nok = store.path("fl_timing")\n')
    assert [line for line, _ in run_path_joins(src)] == [3, 4, 5, 6, 7]


def test_optional_parts_say_which_extra_they_need(monkeypatch):
    """captum and ART are the adequacy extra: without them the adequacy part names the extra, the rest imports."""
    import builtins

    import pytest

    from vitfl.adequacy import require

    real = builtins.__import__

    def no_captum(name, *a, **k):
        if name.startswith("captum"):
            raise ImportError("No module named 'captum'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_captum)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda n: no_captum(n, fromlist=["x"]))
    with pytest.raises(ImportError, match=r"\[adequacy\]"):
        require("captum.attr", "captum")
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    core = cfg["options"]["install_requires"]
    assert "captum" not in core and "adversarial-robustness-toolbox" not in core and "mlxtend" not in core
    extras = cfg["options.extras_require"]
    assert "captum" in extras["adequacy"] and "mlxtend" in extras["testbed"]
    for pkg in ("captum", "adversarial-robustness-toolbox", "mlxtend"):
        assert pkg in extras["tests"], pkg  # the suite covers every part
