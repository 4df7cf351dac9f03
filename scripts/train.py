"""Train / validate / test / predict a classifier from YAML configs (LightningCLI).

    python scripts/train.py fit --config configs/data/digits.yaml --config configs/model/vit_digits.yaml \
        --config configs/trainer/cpu.yaml
    python scripts/train.py fit --print_config ...

Resuming a stopped or killed fit (same configs and run directory): add ``--ckpt_path last``; it continues from
``<run>/checkpoints/last.ckpt`` (written after every epoch) and ends with the same weights as an uninterrupted run.
Checking every image once before training: ``--data.init_args.verify_images true`` (lists every unreadable file);
``--data.init_args.on_bad_image skip`` leaves unreadable images out instead.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_modules.cli import ToolkitCLI  # noqa: E402

if __name__ == "__main__":
    ToolkitCLI()
