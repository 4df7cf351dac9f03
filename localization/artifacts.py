"""Transitional alias: the run store now lives in :mod:`core.runstore` and file I/O in :mod:`core.io`.
Import from there; this module only re-exports them for code not yet moved."""
from core.io import (append_csv_row, atomic_savefig, atomic_write_json, atomic_write_text,  # noqa: F401
                     provenance, versions)
from core.runstore import RunStore as RunLayout  # noqa: F401


def atomic_torch_save(path, obj):  # noqa: D103 - kept for checkpoint-like files only
    import torch

    from core.io import atomic_write

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
