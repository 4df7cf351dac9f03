"""The testbed step: what the model's last FFN does for its predictions and what the checkpoint benchmark
measures (:mod:`vitfl.evaluation.testbed`), written once per set of checkpoints to ``report/testbed.json``, which the
report draws."""
from __future__ import annotations

from typing import Any, Callable

from vitfl.core.runstore import RunStore

__all__ = ["step_testbed"]


def step_testbed(store: RunStore, log: Callable[[str], None] = print) -> dict[str, int]:
    """Layer study (test accuracy with each block's FFN removed), the per-block curve and, with two or more
    checkpoints, the checkpoint diagnostics; skipped when ``report/testbed.json`` was made from the same checkpoint
    files (their content hashes are its identity). Returns counts (done / skipped) for the experiment log."""
    from vitfl.evaluation.testbed import testbed_checks

    epochs = store.checkpoint_epochs()
    if not epochs:
        raise FileNotFoundError(f"testbed: {store.checkpoints} holds no checkpoint: train first")
    identity = {"kind": "testbed", "checkpoints": {str(e): store.file_hash(store.checkpoint(e)) for e in epochs}}
    path = store.path("testbed")
    if store.read_result(path, identity) is not None:
        return {"skipped": 1}
    out: dict[str, Any] = testbed_checks(store)
    store.write_result(path, identity, out)
    lm = out["layer_matters"].get("test") or next(iter(out["layer_matters"].values()))
    log(f"testbed: test accuracy {lm['acc']:.4f}, {lm['acc_zeroed']:.4f} with the last FFN's output removed "
        f"(n = {lm['n']})")
    return {"done": 1}
