"""RQ2 (diversity): coverage of the test pool U_O, of U_I (noise on the most important pixels) and of U_R (noise on
random pixels).

    python scripts/adequacy_rq2.py --quick                      # digits + LeNet-5, about a minute
    python scripts/adequacy_rq2.py --run_dir outputs/digits --model.checkpoint outputs/digits/checkpoints/epoch=040.ckpt

Tables (CSV + Markdown), plots (PNG + PDF) and a JSON of the config and provenance go to
<run_dir>/adequacy/rq2/ (configs/adequacy/default.yaml; --quick merges configs/adequacy/quick.yaml).
"""
import _adequacy_cli

if __name__ == "__main__":
    _adequacy_cli.main("rq2", __doc__)
