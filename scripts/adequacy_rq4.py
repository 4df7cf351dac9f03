"""RQ4 (correlation): Pearson r of each criterion's coverage with the output impartiality J of stratified clean and C&W
suites.

    python scripts/adequacy_rq4.py --quick                      # digits + LeNet-5, about a minute
    python scripts/adequacy_rq4.py --run_dir outputs/digits --model.checkpoint outputs/digits/checkpoints/epoch=040.ckpt

Tables (CSV + Markdown), plots (PNG + PDF) and a JSON of the config and provenance go to
<run_dir>/adequacy/rq4/ (configs/adequacy/default.yaml; --quick merges configs/adequacy/quick.yaml).
"""
import _adequacy_cli

if __name__ == "__main__":
    _adequacy_cli.main("rq4", __doc__)
