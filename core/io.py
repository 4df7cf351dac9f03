"""Atomic, strict, safe file I/O: the only way the toolkit writes a file.

* **Atomic**: every write goes to a temporary file in the target's folder and is renamed into place
  (``os.replace``), so a reader sees the old file or the whole new one, never a part. The file gets the mode the
  user's umask gives (``0666 & ~umask``), not ``mkstemp``'s 0600.
* **Strict JSON**: NaN and +-inf are written as ``null`` (JSON has no NaN); :func:`read_json` refuses the
  non-standard constants ``NaN`` / ``Infinity`` and names the file on any parse error.
* **No code execution**: nothing here unpickles. Tensors are stored with safetensors (:func:`atomic_save_tensors`,
  :func:`load_tensors`); provenance is plain JSON types (:func:`to_jsonable`).
* **Fault injection** (for the kill-at-every-write test): with ``VITFL_FAULT_AT=k`` in the environment the process
  kills itself (SIGKILL) at its k-th write point, after the temporary file is complete and before the rename; with
  ``VITFL_WRITE_LOG=<file>`` each write point appends one line ``<n>\\t<path>`` there, so a harness can enumerate
  the write points of a step and then kill it at each one.
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_save_tensors", "atomic_savefig",
           "read_json", "load_tensors", "to_jsonable", "dumps_strict", "FileFormatError", "versions",
           "provenance", "append_csv_row", "is_rank_zero", "sha256_file"]


class FileFormatError(ValueError):
    """A file exists but is not what it should be (unparsable JSON, a folder where a file belongs, ...)."""


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()
_write_count = 0


def _write_point(path: Path) -> None:
    """Count a write point; kill the process here when the fault-injection harness asks for it."""
    global _write_count
    _write_count += 1
    log = os.environ.get("VITFL_WRITE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{_write_count}\t{path}\n")
    at = os.environ.get("VITFL_FAULT_AT")
    if at and int(at) == _write_count:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; a directory at ``path`` is an error."""
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, but a file belongs there: remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        _write_point(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: tensors and arrays to lists, numpy scalars to numbers, NaN / inf to None, paths and other
    objects (e.g. ``torch.torch_version.TorchVersion``) to strings, tuples to lists."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in (sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj)]
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist())
        if isinstance(obj, torch.dtype):
            return str(obj).replace("torch.", "")
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return to_jsonable(obj.item())
        except Exception:  # noqa: BLE001
            pass
    return str(obj)


def dumps_strict(obj: Any, indent: int | None = 2) -> str:
    """JSON text of ``obj`` after :func:`to_jsonable` (NaN/inf as null); never writes a non-standard constant."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps_strict(obj) + "\n")


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file strictly; a missing file raises FileNotFoundError, anything else unreadable raises
    :class:`FileFormatError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, but a JSON file belongs there: remove it")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise FileFormatError(f"{path} is not valid JSON ({e}); delete it and rerun the step that writes it") \
            from None


def atomic_save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                        ) -> Path:
    """Write tensors with safetensors (no pickle), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))


def load_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a clear error naming an unreadable file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - truncated or foreign file
        raise FileFormatError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def atomic_savefig(fig, path: str | Path, **kw) -> Path:
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), **kw))


def append_csv_row(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one row to a CSV log (header first if new), rewriting the file atomically so a kill never leaves a
    half row; rows whose columns differ from the header get the header's columns (extra keys dropped)."""
    import csv
    import io

    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    fields = next(csv.reader(io.StringIO(old))) if old else list(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    if not old:
        w.writeheader()
    w.writerow({k: to_jsonable(row.get(k, "")) for k in fields})
    atomic_write_text(path, old + buf.getvalue())


def is_rank_zero() -> bool:
    """True unless this is a non-zero rank of a distributed run (only rank 0 writes)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("RANK", "0") in ("", "0") and os.environ.get("LOCAL_RANK", "0") in ("", "0")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Package versions for provenance, as plain strings."""
    out = {"python": platform.python_version()}
    for mod in ("torch", "lightning", "torchmetrics", "transformers", "timm", "numpy", "scipy", "captum"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:  # noqa: BLE001 - optional
            pass
    return out


def provenance(**extra: Any) -> dict[str, Any]:
    """The provenance block every artifact carries (plain JSON types): creation time, host, versions, plus what the
    caller passes (config, input hashes, seed, wall time, ...)."""
    import datetime

    return to_jsonable({"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "host": platform.node(), "versions": versions(), **extra})
