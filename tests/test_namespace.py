"""One import namespace: every package is ``vitfl.<name>``; the bare names fail clearly; an install puts nothing but
``vitfl`` at the top of site-packages; runs written before the namespace still load."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitfl

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", vitfl.PACKAGES)
def test_a_bare_name_fails_naming_the_namespace(name):
    out = _run(f"import {name}", REPO)  # the checkout's folder is on sys.path (cwd) and still refuses
    assert out.returncode != 0
    assert f"'vitfl.{name}'" in out.stderr and "ImportError" in out.stderr, out.stderr[-1500:]


def test_the_namespace_maps_the_checkout_folders():
    out = _run("import vitfl.core.runstore as r, vitfl.pipeline.experiment as e; print(r.__file__); print(e.__file__)",
               REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(REPO / "core" / "runstore.py"), str(REPO / "pipeline" / "experiment.py")]


def test_no_module_or_script_imports_a_bare_name():
    """import-linter's contract covers the packages; this covers scripts/, tests/, benchmarks/ and docs/ too."""
    offenders = []
    for root in ("scripts", "tests", "benchmarks", "docs", *vitfl.PACKAGES):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in vitfl.PACKAGES]
    assert not offenders, offenders


def test_an_install_puts_only_vitfl_at_the_top(tmp_path):
    """setup.py's package list: every package folder of the checkout, each under vitfl (nothing generic on top)."""
    code = ("import setuptools, json, runpy\n"
            "seen = {}\n"
            "setuptools.setup = lambda **kw: seen.update(kw)\n"
            "runpy.run_path('setup.py')\n"
            "print(json.dumps(seen))\n")
    out = _run(code, REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    kw = json.loads(out.stdout)
    assert {p.split(".")[0] for p in kw["packages"]} == {"vitfl"}
    expected = {"vitfl"} | {"vitfl." + str(init.parent.relative_to(REPO)).replace(os.sep, ".")
                            for name in vitfl.PACKAGES for init in (REPO / name).rglob("__init__.py")}
    assert set(kw["packages"]) == expected
    assert kw["package_dir"] == {"vitfl": "vitfl", **{f"vitfl.{n}": n for n in vitfl.PACKAGES}}


def test_runs_written_before_the_namespace_still_name_their_classes():
    from vitfl.datamodules.digits import DigitsDataModule
    from vitfl.lightning_modules.runs import UnsafeConfigError, resolve_datamodule_class

    for path in ("vitfl.datamodules.digits.DigitsDataModule", "datamodules.digits.DigitsDataModule",
                 "vitfl.datamodules.DigitsDataModule", "datamodules.DigitsDataModule"):
        assert resolve_datamodule_class(path) is DigitsDataModule
    for bad in ("vitfl.datamodules.base.subprocess.run", "vitfl.core.io.atomic_write_json", "vitfl.vitfl.datamodules.x",
                "other.datamodules.digits.DigitsDataModule"):
        with pytest.raises(UnsafeConfigError):
            resolve_datamodule_class(bad)
