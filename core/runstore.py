"""The run store: the one module that knows a path inside a run directory.

Everything of one experiment lives under one run directory. The store names, writes (atomically, through
:mod:`vitfl.core.io`), reads, lists and resolves every artifact; no other code builds a path inside a run, parses a file
name or globs. Paths kept inside artifacts are relative to the run root, so a run directory can be moved, copied or
archived and still reads only its own files.

Two kinds of artifacts:

* **fixed** ones, one per run (checkpoints, configs, caches, the misclassification settings, logs): named by
  :data:`LAYOUT`;
* **results**, addressed by their *identity*: a JSON-able dict of everything that changes them (the FL method and
  all its options, the setting, the budget as the resolved N, the repair method and all its options, the
  repetition and seed, and the hashes of the inputs they were made from: checkpoint, state cache, setting, FL
  result). The identity's hash (:func:`identity_key`) is part of the file name, so results with different
  identities never overwrite or shadow each other; a rerun with the same identity finds its result and skips; a
  result whose inputs changed has another key and is recomputed. Each result is one file written atomically
  ("exists" means complete and readable: a directory or an unreadable file where a result belongs is an error
  naming it). An FL score vector (large for ViT-B) is stored once per identity as safetensors and shared by the
  per-budget selections that name it.

**Names are data, never paths.** Every value that fills a ``{field}`` of a :data:`LAYOUT` template (setting, FL
method, label, budget, key, split, ...) must match :data:`NAME_PATTERN` (letters, digits and ``_ - . = +``, not
starting with ``.``, no ``..``, no separator; a ``{name}`` field may be a relative path of such names), and every
path the store builds or resolves from a stored value (:meth:`RunStore.path`, :meth:`RunStore.abs`, fold runs and
their parent pointer) must resolve inside the run root: anything else is :class:`UnsafeNameError` /
:class:`UnsafePathError` (both :class:`ResultError`), raised before anything is read or written.

**Content checksums** (:mod:`vitfl.core.io`): every JSON object the store writes carries its content hash, every tensor
file the hash in its metadata, every text file a ``<name>.sha256`` sidecar; readers verify them and a mismatch is
:class:`~vitfl.core.io.CorruptFileError` (a :class:`ResultError`) naming the file. **Logs** (``fl/timing.csv``) are
append-only: :meth:`RunStore.append_row` appends one whole line under a lock and never fails a step;
:meth:`RunStore.read_log` skips and reports damaged lines.

``docs/run_store.md`` is generated from :data:`LAYOUT` (:func:`layout_markdown`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import string
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from vitfl.core.io import (CorruptFileError, FileFormatError, ResultError, append_csv_row, atomic_save_tensors,
                     atomic_savefig, atomic_write_json, atomic_write_text, is_rank_zero, load_tensors, read_csv_log,
                     read_json, sha256_file, to_jsonable, verify_file)

__all__ = ["RunStore", "LAYOUT", "SUMMARY_FILES", "identity_key", "layout_markdown", "require_store", "ResultError", "CorruptFileError",
           "UnsafeNameError", "UnsafePathError", "NAME_PATTERN", "check_name", "RESULT_KINDS"]

#: every artifact of a run: name -> (path template relative to the run root, what it holds)
LAYOUT: dict[str, tuple[str, str]] = {
    "checkpoint": ("checkpoints/epoch={epoch:03d}.ckpt", "per-epoch weights-only Lightning checkpoint (epoch 0 = the "
                   "start: untrained or pretrained), its sha256 beside it in `epoch={epoch:03d}.ckpt.sha256`"),
    "last_checkpoint": ("checkpoints/last.ckpt", "full checkpoint of the last finished epoch (optimizer, scheduler, "
                        "loops; sha256 in `last.ckpt.sha256`): `fit --ckpt_path last` resumes from it"),
    "ffn_weights": ("ffn_weights/epoch={epoch:03d}.safetensors", "that epoch's FFN weights alone: the last block's "
                    "(W_bef, b_bef, W_aft, b_aft) and every other block L's (`block=L.W_bef`, ...; runs trained "
                    "before per-block weights: the last block's only)"),
    "test_metrics": ("test/epoch={epoch:03d}.json", "the held-out test fold's accuracy of that epoch's model "
                     "(the main job's test step; TensorBoard: tb/test, hp_metric)"),
    "run_config": ("run_config.yaml", "the fit config (data + model + trainer) every later step rebuilds from; "
                   "its paths relative to the run root, outside inputs as `external_inputs` (name: content hash)"),
    "folds": ("folds.json", "the repair / test k-fold indices of the evaluation split"),
    "states": ("states/{split}{tag}.safetensors", "CLS state cache of a split (x, a, logits, label, index) of one "
               "checkpoint; `tag` = `.epoch=NNN` for a checkpoint other than the last"),
    "block_states": ("states/{split}{tag}.block={block}.safetensors", "token state cache of a split for FL on "
                     "transformer block `block` (0-based) other than the last of a CLS-pooled model (or any block of "
                     "an average-pooled one): x [N, T, d] at every token entering that block's FFN (no activations: "
                     "the head recomputes them from x), logits, label, index; `tag` as for `states`"),
    "misclf_info": ("misclf/misclf_info.json", "misclassification settings of the repair split (I_neg, I_pos)"),
    "misclf_figure": ("misclf/confusion.{ext}", "the repair split's confusion matrix"),
    "fl_scores": ("fl/{setting}/{method}-{key}.scores.safetensors", "an FL method's full score vector for one "
                  "identity (shared by its budgets)"),
    "fl_result": ("fl/{setting}/{method}_n{budget}-{key}.json", "the weights (and neurons) an FL method located at "
                  "one budget, its identity and provenance"),
    "n_avg": ("fl/n_avg-{key}.json", "N_avg = mean size of BL's Pareto front over the N_avg settings, resolved once "
              "per (run, FL inputs)"),
    "fl_timing": ("fl/timing.csv", "one row per FL run: method, setting, block (the transformer block whose FFN was "
                  "localized, 0-based; empty in rows written before the column, which were the last block's unless FL "
                  "ran on another block before the column existed: their `scores_key` tells), inputs, wall time, "
                  "peak memory (append-only: one line per row, written under a lock)"),
    "not_applicable": ("not_applicable.json", "cases that cannot run (e.g. a V-score method on |I_neg| = 1), "
                       "recorded once so reruns do not retry them"),
    "fl_eval": ("fl_eval/{name}", "FL evaluation: interventions, checkpoint and injected-fault benchmarks, "
                "statistics, figures"),
    "fl_eval_block": ("fl_eval/block={block}/{name}", "the FL evaluation of transformer block `block` (0-based) other "
                      "than the last of a CLS-pooled model (`evaluate_fl --block`): the files of `fl_eval/{name}`, "
                      "beside the last block's (its TensorBoard run: `tb/fl_eval.block={block}`)"),
    "repair_result": ("repair/{setting}/{label}_n{budget}_rep{rep}-{key}.json", "one repair run: patch, metrics on "
                      "the held-out test fold and the repair split, fitness summary, timings, identity"),
    "crossval_table": ("repair/summary/crossval.{ext}", "the cross-validated repair's held-out RR / BR pooled over "
                       "the k folds (`ext` csv or md)"),
    "crossval_runs": ("repair/summary/crossval_runs.csv", "one row per cross-validated repair run (fold, setting, "
                      "FL method, budget)"),
    "repairability": ("repair/summary/repairability.{ext}", "repairability@N per FL method: held out, in-sample and "
                      "against random (`ext` csv or md)"),
    "fl_headline": ("fl_eval/headline.{ext}", "the FL evaluation's headline: which methods beat random, with "
                    "intervals and the pooled tests (`ext` csv or md)"),
    "pretrain_run": ("pretrain", "the testbed's pretraining run: a run directory of its own (checkpoints, "
                     "run_config.yaml, export)"),
    "export": ("export", "a pretraining run's backbone without its classification head, where fine-tuning's "
               "`pretrained_path` reads it (a Hugging Face folder, or `model.safetensors` for timm)"),
    "finetune_config": ("finetune_model.yaml", "the fine-tuning model config, its `pretrained_path` relative to the "
                        "run root"),
    "adequacy_marker": ("adequacy/{name}/{rq}.done.json", "an adequacy research question finished by the experiment "
                        "runner into `adequacy/<experiment>_<variant>/` (or the coverage step's table, `name` coverage) "
                        "(its config and outputs)"),
    "repair_summary": ("repair/summary/{name}", "repair tables, figures and statistics over every run"),
    "repair_by_block": ("repair/summary/{name}/by_block.{ext}", "a layer study's per-block table (an experiment "
                        "with `blocks`; `name` = `<experiment>_<variant>`): RR / BR of its repair sweeps and "
                        "repairability@N of the cross-validated repair per data set, transformer block, FL method and "
                        "budget, pooled with Wilson 95% intervals (`ext` csv or md; figure `rr_by_block.png|pdf` "
                        "beside it)"),
    "adequacy": ("adequacy/{name}", "test-adequacy (coverage) tables and figures"),
    "tensorboard": ("tb", "TensorBoard logs"),
    "tb_run": ("tb/{name}", "one named TensorBoard run of a step: `fit` (training: losses, accuracy, learning "
               "rate), `test` (hp_metric = test accuracy), `fl_eval` (the FL evaluation's scalars and figures)"),
    "tb_repair_run": ("tb/repair/{setting}/{label}_n{budget}_rep{rep}-{key}", "TensorBoard run of one repair run "
                      "(per-generation fitness, its hparams and final metrics)"),
    "testbed": ("report/testbed.json", "the testbed step's science: test accuracy with the FFN removed, per block, "
                "and what the checkpoint benchmark's |W(2) - W(1)| follows (identity: the checkpoints' hashes)"),
    "report": ("report/{name}", "the run's report (report.md, report.html) and what it links"),
    "lock": ("locks/{key}.lock", "a worker's claim on one task (concurrent sweeps never run a task twice)"),
    "fold": ("cv/fold={k}", "fold run k of the cross-validated repair: that fold's caches, settings, FL and repair "
             "results (the same layout as a run; the model is the parent run's)"),
    "parent": ("parent.json", "in a fold run: the run it belongs to (a relative path)"),
}

RESULT_KINDS = ("fl_result", "repair_result", "n_avg")

#: the files of one repair aggregation (``repair/summary/`` or an experiment's ``repair/summary/<name>/``): what
#: :func:`vitfl.pipeline.repair.aggregate` writes and the report reads (:meth:`RunStore.summary_file`)
SUMMARY_FILES = {"runs": "runs.csv", "summary": "summary.{ext}", "by_kind": "summary_by_kind.{ext}",
                 "fitness_curves": "fitness_curves.csv", "manifest": "manifest.json",
                 "stats_paired": "stats_wilcoxon_holm", "stats_unpaired": "stats_mann_whitney",
                 "by_block": "by_block.{ext}", "by_block_figure": "rr_by_block"}

#: the one pattern of a name that becomes part of a path in a run: letters, digits and ``_ - . = +``, not starting
#: with ``.`` (no hidden files, no ``.``/``..``), no ``..`` anywhere, no separator, 1 to 200 characters
NAME_PATTERN = re.compile(r"(?!\.)(?!.*\.\.)[A-Za-z0-9_.=+-]{1,200}")
#: LAYOUT fields that may be a relative path of names (``fl_eval/{name}``: ``stats/x.md``)
_SUBPATH_FIELDS = ("name",)


class UnsafeNameError(ResultError, ValueError):
    """A name read from a file or given by a caller is not a valid name (it could address a path)."""


class UnsafePathError(ResultError, ValueError):
    """A path the store would build or resolve lies outside the run root."""


def check_name(value: Any, what: str = "name", source: str | Path | None = None) -> str:
    """``value`` as a name that may become part of a path (:data:`NAME_PATTERN`); anything else is
    :class:`UnsafeNameError` naming ``source`` (the file it was read from) and the value."""
    text = value if isinstance(value, str) else (str(value) if isinstance(value, int) else None)
    if text is None or not NAME_PATTERN.fullmatch(text):
        where = f"{source}: " if source is not None else ""
        raise UnsafeNameError(
            f"{where}{what} {value!r} is not a valid name: a name from a file is data, never a path (expected letters, "
            "digits and _ - . = + only, not starting with '.', no '..', no '/', 1-200 characters); refusing to use "
            "it" + (f". Fix or regenerate {source}" if source is not None else ""))
    return text


def _check_field(kind: str, field: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        return
    what = f"{kind} {{{field}}}"
    if field == "tag":  # states/{split}{tag}: "" or ".epoch=NNN"
        if value != "" and not (isinstance(value, str) and value.startswith(".")
                                and NAME_PATTERN.fullmatch(value[1:])):
            raise UnsafeNameError(f"{what} {value!r} is not '' or '.<name>'; refusing to use it")
        return
    if field in _SUBPATH_FIELDS and isinstance(value, str):
        for part in value.split("/"):
            check_name(part, what)
        return
    check_name(value, what)


def identity_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash of an identity (canonical JSON: sorted keys, no whitespace)."""
    text = json.dumps(to_jsonable(identity), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _budget_str(b: Any) -> str:
    return str(b)


class RunStore:
    """The artifacts of one run directory (see the module docstring). Only rank 0 of a distributed run writes."""

    _hash_cache: dict[tuple[str, int, int], str] = {}

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunStore) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    # --------------------------------------------------------------------------------------------- naming
    def path(self, kind: str, **fields: Any) -> Path:
        """The path of an artifact: ``LAYOUT[kind]`` filled with ``fields``, each checked as a name
        (:func:`check_name`; :class:`UnsafeNameError`), the result checked to lie inside the run root."""
        if kind not in LAYOUT:
            raise KeyError(f"unknown artifact kind {kind!r}; known: {sorted(LAYOUT)}")
        template = LAYOUT[kind][0]
        for _, field, _, _ in string.Formatter().parse(template):
            if field and field in fields:
                _check_field(kind, field, fields[field])
        return self.inside(self.root / template.format(**fields), kind)

    def folder(self, kind: str) -> Path:
        """The fixed folder of an artifact kind: its template's path up to the first folder holding a field
        (``repair_summary`` -> ``repair/summary``, ``repair_result`` -> ``repair``)."""
        fixed = []
        for part in LAYOUT[kind][0].split("/")[:-1]:
            if "{" in part:
                break
            fixed.append(part)
        return self.inside(self.root.joinpath(*fixed), kind)

    def inside(self, path: str | Path, what: str = "path") -> Path:
        """``path`` itself if it resolves (symbolic links followed) inside the run root, else
        :class:`UnsafePathError`: the one check every path the store builds or resolves goes through."""
        path = Path(path)
        root = self.root.resolve()
        real = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if real != root and root not in real.parents:
            raise UnsafePathError(f"{what} {path} resolves to {real}, outside the run directory {root}; refusing to "
                                  "read or write it (a name or path stored in a file of the run must stay inside it)")
        return path

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run root (for what artifacts store)."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    def abs(self, rel: str | Path) -> Path:
        """A path an artifact stored (relative to the run root) as a path here; one that resolves outside the run
        is :class:`UnsafePathError`."""
        p = Path(rel)
        return self.inside(p if p.is_absolute() else self.root / p, "a stored path")

    # fixed artifacts
    @property
    def checkpoints(self) -> Path:
        return self.path("last_checkpoint").parent

    @property
    def last_checkpoint(self) -> Path:
        return self.path("last_checkpoint")

    def checkpoint(self, epoch: int) -> Path:
        return self.path("checkpoint", epoch=epoch)

    def checkpoint_epochs(self) -> list[int]:
        """Epochs with a per-epoch checkpoint, ascending."""
        import re

        if not self.checkpoints.is_dir():
            return []
        out = []
        for p in self.checkpoints.iterdir():
            m = re.fullmatch(r"epoch=(\d+)\.ckpt", p.name)
            if m and p.is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    @property
    def ffn_weights_dir(self) -> Path:
        return self.root / "ffn_weights"

    def ffn_weights(self, epoch: int) -> Path:
        return self.path("ffn_weights", epoch=epoch)

    def ffn_weight_epochs(self) -> list[int]:
        import re

        if not self.ffn_weights_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.ffn_weights_dir.iterdir()
                      if (m := re.fullmatch(r"epoch=(\d+)\.safetensors", p.name)))

    @property
    def run_config(self) -> Path:
        return self.path("run_config")

    @property
    def folds(self) -> Path:
        return self.path("folds")

    @property
    def tensorboard(self) -> Path:
        return self.path("tensorboard")

    def states(self, split: str, tag: str = "", block: int | None = None) -> Path:
        """The state cache of ``split`` (``tag``: another checkpoint's): the CLS cache of the last block
        (``block`` None), else the token cache of transformer block ``block`` (a non-negative index)."""
        tag = f".{tag}" if tag else ""
        if block is None:
            return self.path("states", split=split, tag=tag)
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ValueError(f"a state cache's block is a non-negative block index, got {block!r}")
        return self.path("block_states", split=split, tag=tag, block=block)

    @property
    def misclf_dir(self) -> Path:
        return self.root / "misclf"

    @property
    def misclf_info(self) -> Path:
        return self.path("misclf_info")

    @property
    def fl_dir(self) -> Path:
        return self.root / "fl"

    @property
    def fl_timing(self) -> Path:
        return self.path("fl_timing")

    @property
    def fl_eval_dir(self) -> Path:
        return self.root / "fl_eval"

    def fl_eval(self, name: str) -> Path:
        return self.path("fl_eval", name=name)

    @property
    def repair_dir(self) -> Path:
        return self.folder("repair_result")

    @property
    def repair_summary_dir(self) -> Path:
        return self.folder("repair_summary")

    def summary_file(self, what: str, summary_dir: str | Path | None = None, ext: str = "") -> Path:
        """A file of a repair aggregation folder (:data:`SUMMARY_FILES`): ``summary_dir`` (default
        ``repair/summary``), which must lie inside the run."""
        if what not in SUMMARY_FILES:
            raise KeyError(f"unknown summary file {what!r}; known: {sorted(SUMMARY_FILES)}")
        d = self.inside(Path(summary_dir) if summary_dir is not None else self.repair_summary_dir, "summary folder")
        return d / SUMMARY_FILES[what].format(ext=check_name(ext, "extension") if ext else "")

    @property
    def adequacy_dir(self) -> Path:
        return self.folder("adequacy")

    @property
    def report_dir(self) -> Path:
        return self.folder("report")

    # --------------------------------------------------------------------------------------------- fold runs
    def fold(self, k: int) -> "RunStore":
        """Fold run ``k`` of the cross-validated repair (created, with its parent pointer, on first use)."""
        fs = RunStore(self.path("fold", k=int(k)))
        if not fs.path("parent").is_file() and self.writes():
            atomic_write_json(fs.path("parent"), {"parent": os.path.relpath(self.root, fs.root)}, checksum=True)
        return fs

    def fold_indices(self) -> list[int]:
        import re

        base = self.root / "cv"
        if not base.is_dir():
            return []
        return sorted(int(m.group(1)) for p in base.iterdir() if (m := re.fullmatch(r"fold=(\d+)", p.name)))

    def model_store(self) -> "RunStore":
        """Where this run's model lives: the parent run for a fold run, else the run itself."""
        p = self.path("parent")
        if not p.is_file():
            return self
        try:
            rel = read_json(p).get("parent")
        except CorruptFileError:
            raise
        except (FileFormatError, AttributeError) as e:
            raise ResultError(f"{p} is not a parent pointer ({e}): delete the fold run and rerun the cross-validated "
                              "repair") from None
        expected = self.root.resolve().parent.parent  # <run>/cv/fold=k
        if not isinstance(rel, str) or (self.root / rel).resolve() != expected:
            raise UnsafePathError(f"{p}: the parent pointer {rel!r} does not name the run this fold run lies in "
                                  f"({expected}); refusing to read a model from elsewhere")
        return RunStore(expected)

    # --------------------------------------------------------------------------------------------- input hashes
    def file_hash(self, path: str | Path) -> str:
        """sha256 (16 hex) of a file's content, cached per (path, size, mtime) within the process."""
        p = Path(path)
        st = p.stat()
        k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if k not in self._hash_cache:
            self._hash_cache[k] = sha256_file(p)[:16]
        return self._hash_cache[k]

    # --------------------------------------------------------------------------------------------- writing
    @staticmethod
    def writes() -> bool:
        return is_rank_zero()

    def write_json(self, path: Path, obj: Any) -> Path:
        """A JSON artifact, atomically, with its content hash inside (verified by every ``read_json``)."""
        if self.writes():
            atomic_write_json(self.inside(path), obj, checksum=True)
        return path

    def write_text(self, path: Path, text: str) -> Path:
        """A text artifact (CSV, Markdown, YAML), atomically, with a ``.sha256`` sidecar (:meth:`verify`)."""
        if self.writes():
            atomic_write_text(self.inside(path), text, sidecar=True)
        return path

    def save_figure(self, fig, path: Path, **kw) -> Path:
        """A figure, atomically (figures are outputs for people; nothing reads them back, no checksum)."""
        if self.writes():
            atomic_savefig(fig, self.inside(path), **kw)
        return path

    def write_tensors(self, path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                      ) -> Path:
        """Tensors as safetensors (no pickle), atomically, with their content hash in the metadata."""
        if self.writes():
            atomic_save_tensors(self.inside(path), tensors, metadata)
        return path

    @staticmethod
    def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
        """(tensors, metadata) of a safetensors artifact, its content hash verified; an unreadable file is a
        :class:`ResultError` naming it, a corrupt one :class:`CorruptFileError`."""
        try:
            return load_tensors(path)
        except CorruptFileError:
            raise
        except FileFormatError as e:
            raise ResultError(f"{e}; delete it and rerun") from None

    def verify(self, path: Path) -> bool:
        """Check a text artifact against its ``.sha256`` sidecar: True if it matches, False if it has none (written
        before checksums, or its writer was killed before recording it: unverified); :class:`CorruptFileError`
        naming the file when it differs."""
        return verify_file(self.inside(path))

    def read_text(self, path: Path) -> str:
        """A text artifact's content, verified against its sidecar (:meth:`verify`)."""
        self.verify(path)
        return Path(path).read_text()

    def append_row(self, path: Path, row: Mapping[str, Any], widen: bool = False) -> None:
        """Append one row to a CSV log (:func:`vitfl.core.io.append_csv_row`: one whole line under a lock; a damaged log
        is set aside with a warning; ``widen``: a log written before one of the row's columns existed gains it, empty
        on its older rows). Never raises: a lost timing row must not fail the step that made it."""
        if not self.writes():
            return
        try:
            append_csv_row(self.inside(path), row, widen=widen)
        except (OSError, ValueError) as e:
            warnings.warn(f"could not append a row to the log {path} ({type(e).__name__}: {e}); that row is lost, "
                          "nothing else is affected", RuntimeWarning, stacklevel=2)

    def read_log(self, path: Path):
        """``(DataFrame, problems)`` of a CSV log: the good rows (types as ``pandas.read_csv`` infers them) and one
        line per line left out (cut, unreadable, another number of fields), each naming the file and line. A
        missing log is an empty frame."""
        import csv
        import io

        import pandas as pd

        header, rows, problems = read_csv_log(self.inside(path))
        if not header:
            return pd.DataFrame(), problems
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        buf.seek(0)
        return pd.read_csv(buf), problems

    # --------------------------------------------------------------------------------------------- results
    def _result_path(self, kind: str, identity: Mapping[str, Any], **fields: Any) -> tuple[Path, str]:
        key = identity_key(identity)
        return self.path(kind, key=key, **fields), key

    def read_result(self, path: Path, identity: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The record at ``path`` if it is complete and readable (None if absent); a folder or unreadable file there
        is a :class:`ResultError` naming it; with ``identity`` the record must carry that identity."""
        if not path.exists():
            return None
        if path.is_dir():
            raise ResultError(f"{path} is a directory, but a result file belongs there: remove it")
        try:
            rec = read_json(path)
        except CorruptFileError:
            raise
        except FileFormatError as e:
            raise ResultError(str(e)) from None
        if not isinstance(rec, dict) or "identity" not in rec:
            raise ResultError(f"{path} is not a result record (no identity): delete it and rerun")
        if identity is not None and to_jsonable(rec["identity"]) != to_jsonable(identity):
            raise ResultError(f"{path} holds a result of another identity (hash collision or a hand-edited file): "
                              "delete it and rerun")
        return rec

    def write_result(self, path: Path, identity: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
        rec = {"identity": to_jsonable(identity), "key": identity_key(identity), **to_jsonable(record)}
        self.write_json(path, rec)
        return rec

    # FL scores + per-budget selections
    def fl_scores_path(self, identity: Mapping[str, Any]) -> Path:
        return self._result_path("fl_scores", identity, setting=identity["setting"], method=identity["method"])[0]

    def save_fl_scores(self, identity: Mapping[str, Any], scores, meta: Mapping[str, Any] | None = None) -> Path:
        path = self.fl_scores_path(identity)
        if self.writes():
            atomic_save_tensors(path, {"scores": scores},
                                {"identity": json.dumps(to_jsonable(identity), sort_keys=True),
                                 "meta": json.dumps(to_jsonable(meta or {}))})
        return path

    def load_fl_scores(self, identity: Mapping[str, Any]):
        """(scores, meta) or None when absent; an unreadable or foreign file is a :class:`ResultError`."""
        path = self.fl_scores_path(identity)
        if not path.exists():
            return None
        try:
            tensors, md = load_tensors(path, advice="delete it and rerun the FL step (it recomputes the scores)")
        except CorruptFileError:
            raise
        except FileFormatError as e:
            raise ResultError(f"{e}; delete it and rerun the FL step") from None
        try:
            stored, meta = json.loads(md.get("identity", "null")), json.loads(md.get("meta", "{}"))
        except ValueError:
            raise ResultError(f"{path} has unreadable metadata: delete it and rerun the FL step") from None
        if stored != to_jsonable(identity) or "scores" not in tensors:
            raise ResultError(f"{path} holds scores of another identity: delete it and rerun")
        return tensors["scores"], meta

    def fl_result_path(self, identity: Mapping[str, Any]) -> Path:
        return self._result_path("fl_result", identity, setting=identity["scores"]["setting"],
                                 method=identity["scores"]["method"], budget=_budget_str(identity["budget"]))[0]

    def find_fl_result(self, identity: Mapping[str, Any]) -> dict[str, Any] | None:
        rec = self.read_result(self.fl_result_path(identity), identity)
        if rec is not None and not self.abs(rec["scores_file"]).is_file():
            return None  # the selection without its scores is incomplete: recompute both
        return rec

    def repair_result_path(self, identity: Mapping[str, Any], *, setting: str, label: str, budget: Any,
                           rep: int) -> Path:
        return self._result_path("repair_result", identity, setting=setting, label=label, budget=_budget_str(budget),
                                 rep=rep)[0]

    def repair_tb_dir(self, *, setting: str, label: str, budget: Any, rep: int, key: str) -> Path:
        return self.path("tb_repair_run", setting=setting, label=label, budget=_budget_str(budget), rep=rep, key=key)

    def n_avg_path(self, identity: Mapping[str, Any]) -> Path:
        return self._result_path("n_avg", identity)[0]

    # listing (the only place that globs)
    def list_results(self, kind: str, **where: Any) -> list[dict[str, Any]]:
        """Every readable record of ``kind`` ("fl_result" | "repair_result" | "n_avg"), each with ``path``
        (relative), filtered by top-level record fields (``where``: field -> value)."""
        if kind not in RESULT_KINDS:
            raise KeyError(f"kind must be one of {RESULT_KINDS}, got {kind!r}")
        template = LAYOUT[kind][0]
        base = self.root / template.split("/")[0]
        if not base.is_dir():
            return []
        depth = template.count("/")
        pattern = "/".join(["*"] * depth) + ".json" if depth else "*.json"
        pattern = pattern if kind != "n_avg" else "n_avg-*.json"
        out = []
        for p in sorted(base.glob(pattern)):
            if kind == "repair_result" and p.parent.name == "summary":
                continue
            if kind == "fl_result" and p.name.startswith("n_avg-"):
                continue
            rec = self.read_result(p)
            if rec is None or rec.get("kind") != kind:
                continue
            if all(rec.get(k) == v for k, v in where.items()):
                out.append({**rec, "path": self.rel(p)})
        return out

    # --------------------------------------------------------------------------------------------- not applicable
    def not_applicable(self) -> dict[str, str]:
        p = self.path("not_applicable")
        if not p.is_file():
            return {}
        try:
            return dict(read_json(p))
        except CorruptFileError:
            raise
        except FileFormatError:
            return {}

    def mark_not_applicable(self, key: str, why: str) -> None:
        cases = self.not_applicable()
        if cases.get(key) != why:
            cases[key] = why
            self.write_json(self.path("not_applicable"), dict(sorted(cases.items())))

    # --------------------------------------------------------------------------------------------- locks
    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        """Claim a task for this process: yields True if claimed (and releases it after), False if another live
        worker holds it. A lock left by a dead process (same host) is taken over."""
        path = self.path("lock", key=check_name(key, "lock key"))
        path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    host, pid = path.read_text().strip().rsplit(":", 1)
                except (OSError, ValueError):
                    host, pid = "", "0"
                if host == socket.gethostname() and not _alive(int(pid)):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                yield False
                return
            with os.fdopen(fd, "w") as f:
                f.write(me)
            try:
                yield True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return
        yield False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_store(store: Any, who: str) -> "RunStore":
    """``store`` when it is a :class:`RunStore`; a step never takes a path (the scripts make the store once), so
    anything else is a TypeError naming the step."""
    if not isinstance(store, RunStore):
        raise TypeError(f"{who} takes a RunStore (vitfl.core.runstore.RunStore(path)), got {type(store).__name__} "
                        f"{store!r}")
    return store


def layout_markdown() -> str:
    """``docs/run_store.md``: the run directory's layout, generated from :data:`LAYOUT`."""
    lines = ["# The run directory", "",
             "Generated from `core/runstore.py` (`python -m vitfl.core.runstore > docs/run_store.md`); do not edit by hand.",
             "", "Every artifact of one experiment lives under one run directory. Results are addressed by their",
             "identity (everything that changes them: methods and all their options, setting, budget, repetition,",
             "seed, and the hashes of their inputs); `{key}` is the identity's hash, so results with different",
             "identities sit side by side and a rerun with the same identity is skipped. Paths stored inside",
             "artifacts (and `run_config.yaml`) are relative to the run root: a run directory can be moved or",
             "archived.", "",
             "Every `{field}` below is a name: letters, digits and `_ - . = +`, not starting with `.`, no `..`, no",
             "`/` (a `{name}` may be a relative path of such names); a name read from a file (e.g. a setting of",
             "`misclf_info.json`) that is not is refused, and no path the store builds or resolves may lie outside",
             "the run root.", "",
             "Content checksums: a JSON artifact holds its content hash under `content_sha256`, a safetensors",
             "artifact in its metadata, a text artifact (CSV, Markdown) and a checkpoint in a `<name>.sha256`",
             "sidecar (`sha256sum -c` checks it). Readers verify them; a mismatch is an error naming the file",
             "(delete and recompute it; a checkpoint: restore it or retrain). A file without a checksum (older",
             "runs) is read unverified. Logs (`fl/timing.csv`) are append-only: one line per row under a lock; a",
             "damaged log is set aside as `<name>.damaged-<timestamp>` and a new one started.", "",
             "| artifact | path | what it holds |", "|:---|:---|:---|"]
    for kind, (template, what) in LAYOUT.items():
        lines.append(f"| `{kind}` | `{template}` | {what} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(layout_markdown(), end="")
