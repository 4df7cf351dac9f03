"""Cache the FFN states of a trained run's splits (one Trainer.predict pass each).

    python scripts/cache_states.py --run_dir outputs/digits [--splits [repair,test]] [--epoch E] [--block L] [--devices 2]

The last epoch's cache is ``states/{split}.safetensors``; ``--epoch E`` for another epoch writes
``states/{split}.epoch=EEE.safetensors`` and leaves the last epoch's untouched. An existing cache is replaced only
once the new one is complete; a checkpoint that does not match the run's config or data is refused first.
``--block L`` for a block other than the last of a CLS-pooled model caches the token states entering that block's
FFN in ``states/{split}.block=L.safetensors`` (what ``scripts/localize.py --block L`` reads).
"""
import sys
from typing import List, Optional

import _cli

#: datamodules.base.SPLITS, spelled out so that --help imports no torch (tests/test_cli_vocabulary.py checks they
#: agree)
SPLITS = ("train", "val", "eval", "repair", "test")


def build_parser():
    p = _cli.make_parser(__doc__)
    p.add_argument("--run_dir", type=str, default="outputs/digits", help="the run directory")
    p.add_argument("--splits", type=List[str], default=["repair", "test"],
                   help=f"splits to cache, some of {list(SPLITS)}")
    p.add_argument("--epoch", type=Optional[int], default=None, help="checkpoint epoch (null: the last)")
    p.add_argument("--block", type=int, default=-1,
                   help="transformer block whose FFN states are cached (0 the first, -1 the last); another block than "
                        "the last of a CLS-pooled model: its token states, states/{split}.block=L.safetensors")
    p.add_argument("--accelerator", type=str, default="cpu", help="Trainer accelerator")
    p.add_argument("--devices", type=int, default=1, help="Trainer devices (> 1: strategy ddp)")
    return p


def parse(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    bad = [s for s in a.splits if s not in SPLITS]
    if bad or not a.splits:
        p.error(f"--splits {a.splits}: expected some of {list(SPLITS)}")
    if a.devices < 1:
        p.error(f"--devices must be >= 1, got {a.devices}")
    if a.epoch is not None and a.epoch < 0:
        p.error(f"--epoch must be >= 0, got {a.epoch}")
    from vitfl.core.runstore import RunStore

    if not RunStore(a.run_dir).root.is_dir():
        p.error(f"--run_dir {a.run_dir} is not a directory (train first: scripts/train.py fit ... "
                f"--trainer.default_root_dir {a.run_dir})")
    return a


@_cli.guard("cache_states")
def main(argv=None) -> int:
    a = parse(argv)
    _cli.quiet()
    from vitfl.core.runstore import RunStore
    from vitfl.lightning_modules.runs import cache_run_states

    kw = {"accelerator": a.accelerator, "devices": a.devices}
    if a.devices > 1:
        kw["strategy"] = "ddp"
    for path in cache_run_states(RunStore(a.run_dir), a.splits, a.epoch, trainer_kwargs=kw, block=a.block):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
