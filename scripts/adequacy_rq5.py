"""RQ5 (overhead): time per attribution method and per criterion; IDC per mode (layer, layer by layer, end to end, per
class).

    python scripts/adequacy_rq5.py --quick                      # digits + LeNet-5, about a minute
    python scripts/adequacy_rq5.py --run_dir outputs/digits --model.checkpoint outputs/digits/checkpoints/epoch=040.ckpt

Tables (CSV + Markdown), plots (PNG + PDF) and a JSON of the config and provenance go to
<run_dir>/adequacy/rq5/ (configs/adequacy/default.yaml; --quick merges configs/adequacy/quick.yaml).
"""
import _adequacy_cli

if __name__ == "__main__":
    _adequacy_cli.main("rq5", __doc__)
