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
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_contracts_can_fail(tmp_path):
    """The checker itself catches a forbidden import (so the test above can fail)."""
    cfg = tmp_path / "contracts.toml"
    cfg.write_text('[tool.importlinter]\nroot_packages = ["localization", "core"]\n\n'
                   '[[tool.importlinter.contracts]]\nname = "core must not import localization"\n'
                   'type = "forbidden"\nsource_modules = ["localization"]\nforbidden_modules = ["core"]\n')
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
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
