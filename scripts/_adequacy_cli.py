"""The shared command line of scripts/adequacy_rq{1..5}.py and scripts/adequacy_rq.py (jsonargparse): the keys of
configs/adequacy/*.yaml are the options (``--data.name``, ``--model.checkpoint``, ``--idc.round_centroids`` ...), so
``--config a.yaml --config b.yaml`` merges key by key, flags override both, and ``--print_config`` prints the merged
config. configs/adequacy/default.yaml is always read first; ``--quick`` merges configs/adequacy/quick.yaml right after
it.

:data:`RQS` is the one table of the research questions: each scripts/adequacy_rqN.py is a thin entry point whose
docstring and ``--help`` come from :func:`doc` (its RQ's paragraph, usage examples, where the results go);
``scripts/adequacy_rq.py --rq rqN`` runs the same."""
from __future__ import annotations

import os
import re
import sys
import textwrap
from typing import Any, Dict, List, Literal, Optional

import _cli
import _bootstrap

DEFAULT = os.path.join(_bootstrap.ROOT, "configs", "adequacy", "default.yaml")
QUICK = os.path.join(_bootstrap.ROOT, "configs", "adequacy", "quick.yaml")

#: RQ -> its one-paragraph description (DeepImportance's research questions; the science is adequacy/experiments.py)
RQS: Dict[str, str] = {
    "rq1": "RQ1 (critical neurons): accuracy drop after pruning the top-n important neurons vs n random neurons, per "
           "attribution method and by rank voting.",
    "rq2": "RQ2 (diversity): coverage of the test pool U_O, of U_I (noise on the most important pixels) and of U_R "
           "(noise on random pixels).",
    "rq3": "RQ3 (sensitivity): normalised coverage change when 1/5/10% of a correctly classified suite are replaced "
           "by FGSM / PGD / C&W examples.",
    "rq4": "RQ4 (correlation): Pearson r of each criterion's coverage with the output impartiality J of stratified "
           "clean and C&W suites.",
    "rq5": "RQ5 (overhead): time per attribution method and per criterion; IDC per mode (layer, layer by layer, end "
           "to end, per class).",
}
_WIDTH = 116
_OUTPUT = ("Tables (CSV + Markdown), plots (PNG + PDF) and a JSON of the config and provenance go to\n"
           "<run_dir>/adequacy/{rq}/ (configs/adequacy/default.yaml; --quick merges configs/adequacy/quick.yaml).")


def _known(rq: str) -> str:
    if rq not in RQS:
        raise ValueError(f"unknown research question {rq!r}; known: {', '.join(RQS)}")
    return rq


def doc(rq: str) -> str:
    """The docstring and ``--help`` description of scripts/adequacy_{rq}.py: the RQ's paragraph (:data:`RQS`),
    usage examples, and where the results go."""
    rq = _known(rq)
    cmd = f"python scripts/adequacy_{rq}.py --run_dir outputs/digits"
    by_name = f"python scripts/adequacy_rq.py --rq {rq} --run_dir outputs/digits --quick"
    return (textwrap.fill(RQS[rq], _WIDTH) + "\n\n"
            f"    {cmd + ' --quick':<70}# digits + LeNet-5, about a minute\n"
            f"    {cmd} --model.checkpoint outputs/digits/checkpoints/epoch=040.ckpt\n"
            f"    {by_name:<70}# the same through scripts/adequacy_rq.py\n\n"
            + _OUTPUT.format(rq=rq) + "\n")


def doc_all() -> str:
    """The ``--help`` description of scripts/adequacy_rq.py: every RQ of :data:`RQS`."""
    rqs = "\n".join(textwrap.fill(f"{rq}  {text}", _WIDTH, initial_indent="  ", subsequent_indent=" " * 7)
                    for rq, text in RQS.items())
    return ("Test adequacy (DeepImportance's research questions): --rq names the one to run; the same as\n"
            "scripts/adequacy_<rq>.py (`scripts/adequacy_rq.py --rq rq3 --help` shows that RQ's description).\n\n"
            f"{rqs}\n\n"
            f"    {'python scripts/adequacy_rq.py --rq rq1 --run_dir outputs/digits --quick':<70}# digits + LeNet-5, "
            "about a minute\n\n" + _OUTPUT.format(rq="<rq>") + "\n")


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
_RUN_KEYS = ("config", "__default_config__", "run_dir", "quick", "progress", "debug", "rq")


def build_parser(doc: str = __doc__, rq_option: bool = False):
    """The parser of every adequacy script; ``rq_option``: also the required ``--rq`` (scripts/adequacy_rq.py)."""
    p = _cli.make_parser(doc)
    p.default_config_files = [DEFAULT]
    if rq_option:
        p.add_argument("--rq", type=Literal[tuple(RQS)], required=True,
                       help="the research question to run (" + "; ".join(
                           f"{rq}: {re.search(r'[(](.*?)[)]', text)[1]}" for rq, text in RQS.items()) + ")")
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


def _with_quick(argv: List[str]) -> List[str]:
    """``--quick``: quick.yaml right after the default, before the user's configs and flags."""
    return ["--config", QUICK, *argv] if "--quick" in argv else argv


def _run(rq: str, a) -> None:
    _cli.quiet()
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.adequacy import run_rq

    out = run_rq(rq, config_dict(a), RunStore(a.run_dir).adequacy_dir, progress=a.progress != "none")
    for name, df in ((k, v) for k, v in out["results"].items() if k != "detail"):
        print(f"\n== {rq} {name} ==")
        print(df.to_string(index=False, max_rows=60))
    print("\nwritten:", *out["paths"], sep="\n  ")


@_cli.guard(lambda rq, *args, **kwargs: f"adequacy_{rq}")
def main(rq: str, description: Optional[str] = None, argv: Optional[List[str]] = None) -> None:
    """scripts/adequacy_{rq}.py; ``description`` (default: :func:`doc` of ``rq``) is its ``--help`` text."""
    argv = _with_quick(list(sys.argv[1:] if argv is None else argv))
    a = build_parser(doc(rq) if description is None else description).parse_args(argv)
    _run(rq, a)


def _rq_in(argv: List[str]) -> Optional[str]:
    """The value of ``--rq`` in ``argv`` if it names a known RQ (for the ``--help`` description)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--rq" and i + 1 < len(argv) else arg[5:] if arg.startswith("--rq=") else None
        if value in RQS:
            return value
    return None


@_cli.guard("adequacy_rq")
def main_any(argv: Optional[List[str]] = None) -> None:
    """scripts/adequacy_rq.py: ``--rq rqN`` and the options of scripts/adequacy_rqN.py."""
    argv = _with_quick(list(sys.argv[1:] if argv is None else argv))
    rq = _rq_in(argv)
    a = build_parser(doc(rq) if rq else doc_all(), rq_option=True).parse_args(argv)
    _run(a.rq, a)
