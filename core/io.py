"""Atomic, strict, safe file I/O: the only way the toolkit writes a file.

* **Atomic**: every write goes to a temporary file in the target's folder and is renamed into place
  (``os.replace``), so a reader sees the old file or the whole new one, never a part. The file gets the mode the
  user's umask gives (``0666 & ~umask``), not ``mkstemp``'s 0600.
* **Strict JSON**: NaN and +-inf are written as ``null`` (JSON has no NaN); :func:`read_json` refuses the
  non-standard constants ``NaN`` / ``Infinity`` and names the file on any parse error.
* **No code execution**: nothing here unpickles. Tensors are stored with safetensors (:func:`atomic_save_tensors`,
  :func:`load_tensors`); provenance is plain JSON types (:func:`to_jsonable`).
* **Content checksums** (what the run store writes): a JSON object carries ``"content_sha256"`` (the sha256 of its
  canonical JSON without that key), a safetensors file the same key in its metadata (the sha256 of the other
  metadata and every tensor's name, dtype, shape and bytes), any other file (text, a checkpoint) a sidecar
  ``<name>.sha256`` (``sha256sum`` format) written after the file is renamed into place, the old sidecar removed
  just before. Readers verify before trusting: :func:`read_json` and :func:`load_tensors` whenever the key is
  there, :func:`verify_file` for a sidecar; a mismatch is :class:`CorruptFileError` naming the file. A file
  without a checksum (written before checksums were recorded, or by a writer killed between the file and its
  sidecar) is *unverified*, not corrupt. Verification is cached per (file, size, mtime, inode) in the process, so a
  large file is hashed once at write and once per process at read. The in-file hashes (JSON, safetensors: every
  result and cache) are atomic with their content, so concurrent writers and kills cannot separate them; a sidecar
  is written after its file, so two processes rewriting the *same* text file at the same moment can leave one's
  sidecar beside the other's file until the next write (the store's text files are summaries one step rewrites
  whole; their readers then see a mismatch, never wrong content accepted).
* **Append-only logs** (:func:`append_csv_row`, :func:`read_csv_log`): each row is one whole line appended with one
  ``write`` under an exclusive ``fcntl`` lock on the log; a log whose last line is cut, or that is not a CSV log,
  is renamed aside (``<name>.damaged-<timestamp>``) with a warning naming both files and a new log is started.
* **Fault injection** (for the kill-at-every-write test): with ``VITFL_FAULT_AT=k`` in the environment the process
  kills itself (SIGKILL) at its k-th write point, after the temporary file is complete and before the rename; with
  ``VITFL_WRITE_LOG=<file>`` each write point appends one line ``<n>\\t<path>`` there, so a harness can enumerate
  the write points of a step and then kill it at each one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_save_tensors", "atomic_savefig",
           "read_json", "load_tensors", "to_jsonable", "dumps_strict", "FileFormatError", "versions",
           "provenance", "append_csv_row", "read_csv_log", "is_rank_zero", "sha256_file", "ResultError",
           "CorruptFileError", "CHECKSUM_KEY", "sidecar_path", "verify_file", "write_sidecar", "LogDamagedWarning"]


class FileFormatError(ValueError):
    """A file exists but is not what it should be (unparsable JSON, a folder where a file belongs, ...)."""


class ResultError(RuntimeError):
    """A result file exists but is unusable (unreadable, a folder, corrupt, or made from other inputs).
    (Re-exported by :mod:`vitfl.core.runstore`, its home in the documentation.)"""


class CorruptFileError(ResultError, FileFormatError):
    """A file's content differs from the content hash recorded when it was written (flipped bytes, a partial copy,
    a hand edit). Never trusted: delete it and recompute it, or restore it from a backup."""


class LogDamagedWarning(UserWarning):
    """An append-only log was damaged (a cut last line, not a CSV log) and was set aside; a new one was started."""


#: the key of the content hash inside a JSON object and inside a safetensors file's metadata
CHECKSUM_KEY = "content_sha256"
#: the suffix of a sidecar checksum file (``<name>.sha256``, ``sha256sum`` format)
SIDECAR_SUFFIX = ".sha256"
#: (real path, size, mtime_ns, inode) -> the content hash verified in this process
_verified: dict[tuple[str, int, int, int], str] = {}


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


def atomic_write(path: str | Path, write: Callable[[str], None], sidecar: bool = False) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; a directory at ``path`` is an error.

    ``sidecar=True``: also record the file's sha256 in ``<path>.sha256`` (:func:`write_sidecar`): the old sidecar is
    removed just before the rename and the new one written after it, so a kill in between leaves the file without a
    checksum (unverified), never with another file's checksum."""
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, but a file belongs there: remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    digest = None
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        if sidecar:
            digest = sha256_file(tmp)
        _write_point(path)
        if sidecar:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sidecar_path(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if digest is not None:
        write_sidecar(path, digest)
    return path


def atomic_write_text(path: str | Path, text: str, sidecar: bool = False) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), sidecar=sidecar)


# ------------------------------------------------------------------------------------------------ content hashes
def _corrupt(path: Path, detail: str, advice: str | None = None) -> CorruptFileError:
    return CorruptFileError(
        f"{path} is corrupt: {detail} (flipped bytes, a partial copy or a hand edit). Its content cannot be trusted: "
        + (advice or "delete it and rerun the step that writes it (it is recomputed), or restore it from a backup"))


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def sidecar_path(path: str | Path) -> Path:
    """The sidecar checksum file of ``path``: ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, digest: str | None = None) -> Path:
    """Record ``path``'s sha256 (``digest``, or hashed now) in its sidecar, atomically (``sha256sum`` format)."""
    path = Path(path)
    digest = digest or sha256_file(path)
    atomic_write_text(sidecar_path(path), f"{digest}  {path.name}\n")
    _remember(path, digest)  # the writer hashed it: no second hash of this version in this process
    return sidecar_path(path)


def _remember(path: Path, digest: str) -> None:
    with contextlib.suppress(OSError):
        _verified[_stat_key(path)] = digest


def verify_file(path: str | Path, advice: str | None = None) -> bool:
    """Check ``path`` against its sidecar checksum: True when it matches, False when there is no sidecar (the file
    is unverified: written before checksums were recorded, or its writer was killed before recording it);
    :class:`CorruptFileError` naming the file when the content differs (``advice``: what the message tells the user
    to do; default: delete and recompute)."""
    path = Path(path)
    sc = sidecar_path(path)
    try:
        text = sc.read_text()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"its checksum file {sc.name} is unreadable ({type(e).__name__})", advice) from None
    m = re.fullmatch(r"([0-9a-f]{64})(?:[ \t]+\*?[^\n]*)?\n?", text)
    if m is None:
        raise _corrupt(path, f"its checksum file {sc.name} is not a sha256 checksum", advice)
    want = m.group(1)
    key = _stat_key(path)
    if _verified.get(key) == want:
        return True
    got = sha256_file(path)
    if got != want:
        raise _corrupt(path, f"its sha256 is {got[:16]}..., but {want[:16]}... was recorded in {sc.name} when it was "
                       "written", advice)
    _verified[key] = got
    return True


def json_content_hash(obj: Any) -> str:
    """The sha256 of a JSON value's canonical text (sorted keys, no whitespace): what a JSON object records under
    :data:`CHECKSUM_KEY` (computed without that key)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_content_hash(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str:
    """The sha256 of a safetensors file's content: its metadata (without :data:`CHECKSUM_KEY`) and every tensor's
    name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    meta = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


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


def atomic_write_json(path: str | Path, obj: Any, checksum: bool = False) -> Path:
    """Strict JSON, atomically; ``checksum=True`` (what the run store writes) adds the object's content hash under
    :data:`CHECKSUM_KEY`, which :func:`read_json` verifies and removes."""
    data = to_jsonable(obj)
    if checksum and isinstance(data, dict):
        data.pop(CHECKSUM_KEY, None)
        data[CHECKSUM_KEY] = json_content_hash(data)
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


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
        obj = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise FileFormatError(f"{path} is not valid JSON ({e}); delete it and rerun the step that writes it") \
            from None
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        want = obj.pop(CHECKSUM_KEY)
        if not isinstance(want, str) or json_content_hash(obj) != want:
            raise _corrupt(path, "its content does not match the content hash recorded in it when it was written")
    return obj


def atomic_save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                        ) -> Path:
    """Write tensors with safetensors (no pickle), atomically, with their content hash in the metadata
    (:data:`CHECKSUM_KEY`, :func:`tensors_content_hash`; :func:`load_tensors` verifies it)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    meta[CHECKSUM_KEY] = tensors_content_hash(tensors, meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    _remember(Path(path), meta[CHECKSUM_KEY])  # hashed once, here: this process reads it back unhashed
    return Path(path)


def read_tensor_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata (its header only: nothing verified, the content hash left out)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - truncated or foreign file
        raise FileFormatError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    meta.pop(CHECKSUM_KEY, None)
    return meta


def load_tensors(path: str | Path, advice: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a clear error naming an unreadable file; a file that records
    a content hash is verified (once per process and file version) and a mismatch is :class:`CorruptFileError`
    (``advice``: what its message tells the user to do). The returned metadata leaves the hash out."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    try:
        key = _stat_key(path)
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - truncated or foreign file
        raise FileFormatError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    want = meta.pop(CHECKSUM_KEY, None)
    if want is not None and _verified.get(key) != want:
        got = tensors_content_hash(tensors, meta)
        if got != want:
            raise _corrupt(path, "its tensors or metadata do not match the content hash recorded in it when it was "
                           "written", advice)
        _verified[key] = want
    return tensors, meta


def atomic_savefig(fig, path: str | Path, **kw) -> Path:
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), **kw))


#: a column name of a CSV log: printable text (no control characters, no replacement character), not empty
_HEADER_FIELD = re.compile(r"[^\x00-\x1f\x7f\ufffd]{1,200}")


def _one_line(v: Any) -> Any:
    v = to_jsonable(v)
    return v.replace("\r", " ").replace("\n", " ") if isinstance(v, str) else v


def _log_damage(data: bytes) -> tuple[list[str] | None, str | None]:
    """(the header of an existing log, or None when it is empty; why it is damaged, or None)."""
    import csv

    if not data:
        return None, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"it is not UTF-8 text (byte {e.start})"
    if "\0" in text:
        return None, "it holds NUL bytes"
    if not text.endswith("\n"):
        return None, "its last line is cut (no newline at its end)"
    first = text.split("\n", 1)[0]
    header = next(csv.reader([first]), [])
    if not header or any(not _HEADER_FIELD.fullmatch(h) for h in header):
        return None, f"its first line is not a CSV header ({first[:60]!r})"
    return header, None


def _widened_log(text: str, header: list[str], more: list[str]) -> bytes:
    """A log's text with ``more`` columns added to its header and an empty value for them on every row (a line that
    had another number of fields than the header keeps that difference: it stays a line the reader leaves out)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header + more)
    for line in text.split("\n")[1:]:
        if line:
            w.writerow(next(csv.reader([line]), []) + [""] * len(more))
    return buf.getvalue().encode()


def append_csv_row(path: str | Path, row: Mapping[str, Any], widen: bool = False) -> str | None:
    """Append one row to a CSV log (header first if new) as one whole line, with one ``write`` (+ fsync) under an
    exclusive ``fcntl`` lock on the log, so concurrent writers never lose or interleave rows. Values are kept on one
    line (line breaks become spaces); columns the header lacks are dropped, unless ``widen``: then the log is first
    rewritten with those columns added to its header (empty on every older row), written beside it and renamed over
    it under the lock (a writer waiting for the old file's lock sees the rename and locks the new log), so a log
    written before a column existed keeps its rows and gains the column. A log whose last line is cut or that is
    not a CSV log (not UTF-8, no header, none of the row's columns) is renamed to ``<name>.damaged-<timestamp>`` and
    a new log is started; the :class:`LogDamagedWarning` naming both files is issued and also returned."""
    import csv
    import datetime
    import fcntl
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {str(k): _one_line(v) for k, v in row.items()}
    note = None
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                continue  # set aside by another writer while this one waited for the lock: lock the new log
            data = os.pread(fd, st.st_size, 0)
            header, damage = _log_damage(data)
            if damage is None and header is not None and not set(header) & set(values):
                damage = f"its header ({','.join(header)[:60]}) names none of the row's columns"
            if damage is not None:
                stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
                aside = path.with_name(f"{path.name}.damaged-{stamp}")
                os.rename(path, aside)
                note = (f"the log {path} was damaged ({damage}); it was set aside as {aside} and a new log was "
                        f"started at {path}")
                warnings.warn(note, LogDamagedWarning, stacklevel=3)
                continue
            more = [k for k in values if header is not None and k not in header]
            if widen and more:
                wide = path.with_name(f".{path.name}.widen-{os.getpid()}.tmp")
                with open(wide, "wb") as f:
                    f.write(_widened_log(data.decode("utf-8"), header, more))
                    f.flush()
                    with contextlib.suppress(OSError):
                        os.fsync(f.fileno())
                _write_point(path)
                os.rename(wide, path)
                continue  # lock the widened log and append there
            fields = header or list(values)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            if header is None:
                w.writerow(fields)
            w.writerow(["" if values.get(k) is None else values.get(k) for k in fields])
            out = buf.getvalue().encode()
            _write_point(path)
            while out:
                out = out[os.write(fd, out):]
            with contextlib.suppress(OSError):
                os.fsync(fd)
            return note
        finally:
            os.close(fd)
    raise OSError(f"could not lock the log {path} (it was replaced 100 times while waiting)")


def read_csv_log(path: str | Path) -> tuple[list[str], list[list[str]], list[str]]:
    """The header, the good rows and the problems of a CSV log written by :func:`append_csv_row`: a line that is not
    UTF-8, is cut (the last one without a newline), or has another number of fields than the header is left out
    and reported (with its line number); a missing log is empty with no problem."""
    import csv

    path = Path(path)
    if not path.is_file():
        return [], [], []
    data = path.read_bytes()
    problems: list[str] = []
    lines = data.split(b"\n")
    cut = lines.pop()  # b"" when the log ends with a newline
    header: list[str] = []
    rows: list[list[str]] = []
    for i, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
            if "\0" in text:
                raise ValueError("NUL byte")
            fields = next(csv.reader([text]), [])
        except (UnicodeDecodeError, ValueError, csv.Error) as e:
            problems.append(f"{path}: line {i} is unreadable ({type(e).__name__}); left out")
            if i == 1:
                break
            continue
        if i == 1:
            header = fields
            if not header or any(not _HEADER_FIELD.fullmatch(h) for h in header):
                problems.append(f"{path}: line 1 is not a CSV header; the whole log is left out")
                header = []
                break
            continue
        if len(fields) != len(header):
            problems.append(f"{path}: line {i} has {len(fields)} fields, the header {len(header)}; left out")
            continue
        rows.append(fields)
    if cut:
        problems.append(f"{path}: line {len(lines) + 1} is cut (no newline at its end); left out")
    if not header and lines and not problems:
        problems.append(f"{path}: no header line; the whole log is left out")
    return header, rows if header else [], problems


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
