"""scripts/train.py fit / test --help without importing Lightning: the stored text (scripts/help/) is served only
while it was made from the current sources and package versions; otherwise the live LightningCLI help is printed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train  # noqa: E402


@pytest.mark.parametrize("sub", train.CACHED_HELP)
def test_the_stored_help_is_current(sub):
    first = (REPO / "scripts" / "help" / f"train_{sub}.txt").read_text().splitlines()[0]
    assert first == f"# sources: {train.help_fingerprint()}", \
        "the stored help is stale: run `python docs/regen_cli.py` (it rewrites scripts/help/)"


def test_a_stale_or_missing_help_is_not_served(monkeypatch, tmp_path):
    assert train.cached_help("fit") is not None
    monkeypatch.setattr(train, "help_fingerprint", lambda: "0" * 16)  # a source changed since it was stored
    assert train.cached_help("fit") is None
    monkeypatch.undo()
    monkeypatch.setattr(train, "HELP_DIR", str(tmp_path))
    assert train.cached_help("fit") is None and train.cached_help("validate") is None


def test_the_fingerprint_follows_the_sources(monkeypatch):
    before = train.help_fingerprint()
    monkeypatch.setattr(train, "HELP_SOURCES", train.HELP_SOURCES[:-1])
    assert train.help_fingerprint() != before


def test_fit_help_is_served_without_lightning():
    code = ("import sys; sys.argv = ['train.py', 'fit', '--help']; sys.path.insert(0, 'scripts'); import train; "
            "train.main(); assert 'lightning' not in sys.modules and 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: train.py [options] fit")


@pytest.mark.slow  # builds the LightningCLI (imports torch, Lightning, the model: ~12 s)
@pytest.mark.parametrize("sub", train.CACHED_HELP)
def test_the_stored_help_equals_the_live_one(sub):
    env = {**os.environ, "COLUMNS": "110", "VITFL_LIVE_HELP": "1"}
    live = subprocess.run([sys.executable, "scripts/train.py", sub, "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert live.returncode == 0, live.stderr[-2000:]
    assert train.cached_help(sub) == live.stdout.rstrip() + "\n"
