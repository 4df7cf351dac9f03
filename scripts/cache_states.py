"""Cache the CLS states of a trained run's splits (one Trainer.predict pass each).

    python scripts/cache_states.py --run_dir outputs/digits [--splits repair test] [--epoch E] [--devices 2]

The last epoch's cache is ``states/{split}.safetensors``; ``--epoch E`` for another epoch writes
``states/{split}.epoch=EEE.safetensors`` and leaves the last epoch's untouched. An existing cache is replaced only
once the new one is complete; a checkpoint that does not match the run's config or data is refused first.
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from datamodules.base import SPLITS
from lightning_modules.runs import RunError, cache_run_states
from core.runstore import RunStore


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="outputs/digits")
    p.add_argument("--splits", nargs="+", default=["repair", "test"], choices=SPLITS)
    p.add_argument("--epoch", type=int, default=None, help="checkpoint epoch (default: the last)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    a = p.parse_args(argv)
    if a.devices < 1:
        p.error(f"--devices must be >= 1, got {a.devices}")
    if a.epoch is not None and a.epoch < 0:
        p.error(f"--epoch must be >= 0, got {a.epoch}")
    if not RunStore(a.run_dir).root.is_dir():
        p.error(f"--run_dir {a.run_dir} is not a directory (train first: scripts/train.py fit ... "
                f"--trainer.default_root_dir {a.run_dir})")
    return a


if __name__ == "__main__":
    a = parse()
    kw = {"accelerator": a.accelerator, "devices": a.devices}
    if a.devices > 1:
        kw["strategy"] = "ddp"
    try:
        for path in cache_run_states(RunStore(a.run_dir), a.splits, a.epoch, trainer_kwargs=kw):
            print(path)
    except (RunError, ValueError) as e:
        sys.exit(f"cache_states: {e}")
