import _adequacy_cli

__doc__ = _adequacy_cli.doc("rq3")  # RQ3's description, usage and outputs: the table RQS in scripts/_adequacy_cli.py
if __name__ == "__main__":
    _adequacy_cli.main("rq3")
