"""Train / validate / test / predict a classifier from YAML configs (LightningCLI).

    python scripts/train.py fit --config configs/data/digits.yaml --config configs/model/vit_digits.yaml \
        --config configs/trainer/cpu.yaml
    python scripts/train.py fit --print_config ...

Resuming a stopped or killed fit (same configs and run directory): add ``--ckpt_path last``; it continues from
``<run>/checkpoints/last.ckpt`` (written after every epoch) and ends with the same weights as an uninterrupted run.
Checking every image once before training: ``--data.init_args.verify_images true`` (lists every unreadable file);
``--data.init_args.on_bad_image skip`` leaves unreadable images out instead.

A known failure (no checkpoint to resume from, a data root that is not there, an unreadable image, a checkpoint of
another architecture) ends with one paragraph on stderr and exit status 1; ``--debug`` (anywhere on the line) or
``VITFL_DEBUG=1`` shows the traceback instead.
"""
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cli  # noqa: E402


@_cli.guard("train")
def main(argv: Optional[List[str]] = None) -> None:
    from lightning_modules.cli import ToolkitCLI

    if argv is None:  # LightningCLI reads sys.argv itself; --debug is this script's flag, not the CLI's
        sys.argv = [a for a in sys.argv if a != "--debug"]
        ToolkitCLI()
    else:
        ToolkitCLI(args=[a for a in argv if a != "--debug"])


if __name__ == "__main__":
    main()
