"""RQ1 (critical neurons): accuracy drop after pruning the top-n important neurons vs n random neurons, per attribution
method and by rank voting.

    python scripts/adequacy_rq1.py --quick                      # digits + LeNet-5, about a minute
    python scripts/adequacy_rq1.py --run_dir outputs/digits --model.checkpoint outputs/digits/checkpoints/epoch=040.ckpt

Tables (CSV + Markdown), plots (PNG + PDF) and a JSON of the config and provenance go to
<run_dir>/adequacy/rq1/ (configs/adequacy/default.yaml; --quick merges configs/adequacy/quick.yaml).
"""
import _adequacy_cli

if __name__ == "__main__":
    _adequacy_cli.main("rq1", __doc__)
