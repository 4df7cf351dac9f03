"""Regenerate the ``--help`` blocks of docs/cli.md from the scripts as they are now.

    python docs/regen_cli.py      # rewrites every "`python scripts/<name>.py --help` (generated):" block
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, ".venv", "bin", "python") if os.path.exists(os.path.join(ROOT, ".venv")) else sys.executable
p = f"{ROOT}/docs/cli.md"
s = open(p).read()
pat = re.compile(r"(`python scripts/(\w+)\.py(?: (\w+))? --help` \(generated\):\n\n```text\n)(.*?)(\n```)", re.S)
def rep(m):
    name, sub = m.group(2), m.group(3)
    cmd = [PY, f"scripts/{name}.py"] + ([sub] if sub else []) + ["--help"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="110")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        sys.exit(f"{name} --help failed: {out.stderr[-2000:]}")
    t = out.stdout.replace(ROOT + "/", "<repo>/").replace(ROOT, "<repo>").rstrip()
    return m.group(1) + t + m.group(5)
s2, n = pat.subn(rep, s)
open(p, "w").write(s2)
print("regenerated", n, "help blocks")
# the stored subcommand help of scripts/train.py (served without importing Lightning while its sources are unchanged)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import train  # noqa: E402

for sub in train.CACHED_HELP:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="110", VITFL_LIVE_HELP="1")
    out = subprocess.run([PY, "scripts/train.py", sub, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        sys.exit(f"train.py {sub} --help failed: {out.stderr[-2000:]}")
    print("wrote", train.write_help_cache(sub, out.stdout))
