r"""Train / validate / test / predict a classifier from YAML configs (LightningCLI).

    python scripts/train.py fit --config configs/data/digits.yaml --config configs/model/vit_digits.yaml \
        --config configs/trainer/cpu.yaml
    python scripts/train.py fit --print_config ...

Resuming a stopped or killed fit (same configs and run directory): add ``--ckpt_path last``; it continues from
``<run>/checkpoints/last.ckpt`` (written after every epoch) and ends with the same weights as an uninterrupted run.
Checking every image once before training: ``--data.init_args.verify_images true`` (lists every unreadable file);
``--data.init_args.on_bad_image skip`` leaves unreadable images out instead.

A known failure (no checkpoint to resume from, a data root that is not there, an unreadable image, a checkpoint of
another architecture) ends with one paragraph on stderr and exit status 1; ``--debug`` (anywhere on the line) or
``VITFL_DEBUG=1`` shows the traceback instead. A fit stopped by SIGTERM / SIGINT exits non-zero and prints the
command that resumes it (with ``--ckpt_path last``). Option names are never abbreviated; an unknown one gets a
"did you mean".
"""
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cli  # noqa: E402


SUBCOMMANDS = {"fit": "train the model (per-epoch checkpoints, last-FFN weight files, TensorBoard)",
               "validate": "one validation pass of a checkpoint", "test": "test a checkpoint",
               "predict": "predictions of a checkpoint"}


def short_help() -> str:
    """``train.py --help``: the subcommands, without importing Lightning (each subcommand's ``--help`` lists its
    options: it builds the whole LightningCLI, which imports torch, Lightning and the model)."""
    lines = ["usage: train.py [-h] [--debug] {" + ",".join(SUBCOMMANDS) + "} ...", "", __doc__.strip(), "",
             "subcommands:"]
    lines += [f"  {name:10s}{what}" for name, what in SUBCOMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this help and exit",
              f"  --debug     show the traceback of an error instead of its one-paragraph message ({_cli.DEBUG_ENV}=1)",
              "", "Every option of a subcommand, with its type and default: python scripts/train.py fit --help",
              "(it imports Lightning and the model first, so it takes longer)."]
    return "\n".join(lines)


def cli_class():
    """ToolkitCLI with this toolkit's command-line vocabulary: no abbreviated option names, "did you mean" on an
    unknown one (main parser and subcommand parsers)."""
    from lightning.pytorch.cli import LightningArgumentParser

    from lightning_modules.cli import ToolkitCLI

    class Parser(_cli.SuggestingParser, LightningArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

    return lambda **kw: ToolkitCLI(parser_class=Parser, **kw)


@_cli.guard("train")
def main(argv: Optional[List[str]] = None) -> None:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]
    if args in (["-h"], ["--help"]):  # no Lightning import for the list of subcommands
        print(short_help())
        return
    cli = cli_class()
    if argv is None:  # LightningCLI reads sys.argv itself; --debug is this script's flag, not the CLI's
        sys.argv = [a for a in sys.argv if a != "--debug"]
        cli()
    else:
        cli(args=args)


if __name__ == "__main__":
    main()
