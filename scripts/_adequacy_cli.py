"""The shared command line of scripts/adequacy_rq{1..5}.py (jsonargparse): the keys of configs/adequacy/*.yaml are
the options (``--data.name``, ``--model.checkpoint``, ``--idc.round_centroids`` ...), so ``--config a.yaml
--config b.yaml`` merges key by key, flags override both, and ``--print_config`` prints the merged config.
configs/adequacy/default.yaml is always read first; ``--quick`` merges configs/adequacy/quick.yaml right after it."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import _cli
import _bootstrap

DEFAULT = os.path.join(_bootstrap.ROOT, "configs", "adequacy", "default.yaml")
QUICK = os.path.join(_bootstrap.ROOT, "configs", "adequacy", "quick.yaml")

#: (option, type, help) of every adequacy config key; defaults come from configs/adequacy/default.yaml
OPTIONS = [
    ("seed", int, "seed of sampling, training, clustering and attacks"),
    ("threads", Optional[int], "torch CPU threads (null: torch's default)"),
    ("data.name", str, "data module: digits, cifar100, tiny_imagenet"),
    ("data.root", Optional[str], "the data set's folder (not needed for digits)"),
    ("data.image_size", Optional[int], "null: the data module's default"),
    ("data.max_train", Optional[int], "cap the training split (seeded subset)"),
    ("data.max_test", Optional[int], "cap the test pool"),
    ("model.checkpoint", Optional[str], "an ImageClassifier checkpoint to test (null: train model.backbone now)"),
    ("model.backbone", str, "backbone to train when no checkpoint is given (lenet5, small_cnn, hf_vit, timm_vit)"),
    ("model.backbone_kwargs", Dict[str, Any], "keyword arguments of the backbone"),
    ("model.max_epochs", int, "training epochs of the backbone"),
    ("model.lr", float, "learning rate"),
    ("model.weight_decay", float, "weight decay"),
    ("model.batch_size", int, "training batch size"),
    ("layer", Any, "layer name(s) in model.named_modules() or 'all' (null: a ViT's last FFN / a CNN's last layer)"),
    ("token_reduction", str, "ViT token outputs: 'cls' or 'mean'"),
    ("attribution.method", Optional[str], "lrp, ig, conductance, deeplift, gradxact (null: lrp for CNNs, ig for ViTs)"),
    ("attribution.n_steps", int, "integration steps (ig, conductance)"),
    ("attribution.batch_size", int, "attribution batch size"),
    ("idc.m", int, "important neurons"),
    ("idc.ks", List[int], "candidate cluster counts (silhouette)"),
    ("idc.use_silhouette", bool, "choose k by the silhouette score"),
    ("idc.n_clusters", int, "clusters when use_silhouette is false"),
    ("idc.silhouette_sample", int, "values the silhouette score is computed on"),
    ("idc.drop_zero_activations", Any, "published: drop exact-zero training values before clustering (true)"),
    ("idc.round_centroids", Optional[int], "published: round centroids to this many decimals (2)"),
    ("criteria", Dict[str, Dict[str, Any]], "baseline coverage criteria and their hyper-parameters"),
    ("sa_labels", str, "class of a test input for LSC / DSC / MDSC: 'pred' or 'true'"),
    ("rq1.methods", List[str], "RQ1 attribution methods"),
    ("rq1.ns", List[int], "RQ1 numbers of pruned neurons"),
    ("rq1.random_reps", int, "RQ1 random draws"),
    ("rq2.frac", float, "RQ2 share of pixels perturbed"),
    ("rq2.sigma", float, "RQ2 noise std (fraction of the input range)"),
    ("rq2.iterations", int, "RQ2 iterations"),
    ("rq2.input_method", str, "RQ2 input attribution for the important pixels"),
    ("rq3.sizes", List[int], "RQ3 suite sizes"),
    ("rq3.ratios", List[float], "RQ3 shares replaced by adversarial inputs"),
    ("rq3.attacks", List[str], "RQ3 attacks"),
    ("rq3.attack_kw", Dict[str, Dict[str, Any]], "RQ3 attack options (eps: a fraction of the input range)"),
    ("rq4.sizes", List[int], "RQ4 suite sizes"),
    ("rq4.reps", int, "RQ4 repetitions"),
    ("rq4.cw_kw", Dict[str, Any], "RQ4 C&W options"),
    ("rq5.methods", List[str], "RQ5 attribution methods"),
    ("rq5.modes", List[List[Any]], "RQ5 IDC modes as [mode, per_class]"),
]
_RUN_KEYS = ("config", "__default_config__", "run_dir", "quick", "progress", "debug")


def build_parser(doc: str = __doc__):
    p = _cli.make_parser(doc)
    p.default_config_files = [DEFAULT]
    p.add_argument("--run_dir", type=str, default="outputs/adequacy",
                   help="run directory; results go to <run_dir>/adequacy/<rq>/")
    p.add_argument("--quick", action="store_true",
                   help="digits + LeNet-5 with small budgets (merges configs/adequacy/quick.yaml); about a minute")
    _cli.add_progress(p, "the attribution and coverage loops' bars and the training bar", "the same")
    for name, typ, help_ in OPTIONS:
        p.add_argument(f"--{name}", type=typ, default=None, help=help_)
    return p


def config_dict(ns) -> dict:
    d = ns.as_dict()
    for k in _RUN_KEYS:
        d.pop(k, None)
    if d.get("idc", {}).get("drop_zero_activations") is None:  # not set: IDC's own default (False)
        d.get("idc", {}).pop("drop_zero_activations", None)
    return d


@_cli.guard(lambda rq, *args, **kwargs: f"adequacy_{rq}")
def main(rq: str, doc: str, argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:  # quick.yaml right after the default, before the user's configs and flags
        argv = ["--config", QUICK, *argv]
    p = build_parser(doc.split("\n\n")[0] + "\n\n" + doc.split("\n\n", 1)[-1])
    a = p.parse_args(argv)
    _cli.quiet()
    from core.runstore import RunStore
    from pipeline.adequacy import run_rq

    out = run_rq(rq, config_dict(a), RunStore(a.run_dir).adequacy_dir, progress=a.progress != "none")
    for name, df in ((k, v) for k, v in out["results"].items() if k != "detail"):
        print(f"\n== {rq} {name} ==")
        print(df.to_string(index=False, max_rows=60))
    print("\nwritten:", *out["paths"], sep="\n  ")
