import _adequacy_cli

__doc__ = _adequacy_cli.doc_all()  # `--rq rqN` runs scripts/adequacy_rqN.py's RQ (the table RQS in _adequacy_cli.py)
if __name__ == "__main__":
    _adequacy_cli.main_any()
