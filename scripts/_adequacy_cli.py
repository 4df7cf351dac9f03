"""The shared command line of scripts/adequacy_rq{1..5}.py."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import _bootstrap

from core.runstore import RunStore
from pipeline.adequacy import build_config, run_rq


def add_common_args(parser: argparse.ArgumentParser, default_config: str | Path, quick_config: str | Path
                    ) -> argparse.ArgumentParser:
    """Flags every adequacy script takes (the script parses argv)."""
    parser.add_argument("--run_dir", default="outputs/adequacy",
                        help="run directory; results go to <run_dir>/adequacy/<rq>/ (default: %(default)s)")
    parser.add_argument("--config", nargs="+", default=[str(default_config)],
                        help="YAML config(s), later ones override earlier ones (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"digits + LeNet-5 with small budgets (merges {quick_config}); about a minute")
    parser.add_argument("--data", help="data module name (digits, cifar100, tiny_imagenet)")
    parser.add_argument("--root", help="the data set's folder")
    parser.add_argument("--checkpoint", help="an ImageClassifier checkpoint to test (else the backbone is trained)")
    parser.add_argument("--backbone", help="backbone to train when no checkpoint is given (lenet5, small_cnn, ...)")
    parser.add_argument("--layer", help="layer to measure (a name in model.named_modules())")
    parser.add_argument("--method", help="attribution method for IDC (lrp, ig, conductance, deeplift, gradxact)")
    parser.add_argument("--token_reduction", choices=["cls", "mean"], help="ViT token outputs: CLS or mean")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max_train", type=int, help="cap the training split")
    parser.add_argument("--max_test", type=int, help="cap the test pool")
    parser.add_argument("--threads", type=int, help="torch CPU threads (config `threads`; null: torch's default)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.set_defaults(_quick_config=str(quick_config))
    return parser


def main(rq: str, doc: str) -> None:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, os.path.join(_bootstrap.ROOT, "configs", "adequacy", "default.yaml"),
                    os.path.join(_bootstrap.ROOT, "configs", "adequacy", "quick.yaml"))
    args = parser.parse_args()
    cfg = build_config(args.config, args._quick_config if args.quick else None, vars(args))
    out = run_rq(rq, cfg, RunStore(args.run_dir).adequacy_dir, progress=not args.no_progress)
    for name, df in ((k, v) for k, v in out["results"].items() if k != "detail"):
        print(f"\n== {rq} {name} ==")
        print(df.to_string(index=False, max_rows=60))
    print("\nwritten:", *out["paths"], sep="\n  ")
