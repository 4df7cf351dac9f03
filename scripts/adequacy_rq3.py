"""RQ3 (sensitivity): normalised coverage change when 1/5/10% of a correctly classified suite are replaced by FGSM /
PGD / C&W examples.

    python scripts/adequacy_rq3.py --quick                      # digits + LeNet-5, about a minute
    python scripts/adequacy_rq3.py --run_dir outputs/digits --model.checkpoint outputs/digits/checkpoints/epoch=040.ckpt

Tables (CSV + Markdown), plots (PNG + PDF) and a JSON of the config and provenance go to
<run_dir>/adequacy/rq3/ (configs/adequacy/default.yaml; --quick merges configs/adequacy/quick.yaml).
"""
import _adequacy_cli

if __name__ == "__main__":
    _adequacy_cli.main("rq3", __doc__)
