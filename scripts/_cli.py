"""Shared pieces of the step scripts' command lines (jsonargparse, as ``scripts/train.py``'s LightningCLI): every
script takes ``--config`` (repeatable; later files override earlier ones, flags override both) and
``--print_config`` (prints the merged config and exits), one flag style (underscores), and shows each option's
help, type and default in ``--help``.

Errors: a known failure (a bad file, a stale or unreadable result, a full disk, a missing checkpoint, a bad value)
ends every script with one paragraph on stderr (``<script>: error: ...``) and exit status 1, not a traceback
(:func:`guard`); ``--debug`` (a flag of every script) or ``VITFL_DEBUG=1`` shows the traceback instead. A value of
the wrong shape in a ``--config`` file (``budgets: 9`` where a list is expected) is an error naming the key and the
expected type."""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Union

import _bootstrap  # noqa: F401
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

#: a budget: a positive number of weights, "avg" (N_avg) or "front" (the method's own selection)
Budget = Union[int, Literal["avg", "front"]]
#: the environment variable that shows tracebacks (as ``--debug`` does)
DEBUG_ENV = "VITFL_DEBUG"


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (type and default of every option) with the docstring's layout kept."""


class StepParser(ArgumentParser):
    """jsonargparse's parser, plus a check of the ``--config`` files' values for the list options (``nargs``):
    jsonargparse reports ``budgets: 9`` as "'int' object is not iterable" and ``methods: random`` as "'str' object
    does not support item assignment"; here they are errors naming the key and the expected type."""

    def parse_args(self, args=None, namespace=None, **kwargs):  # noqa: D102
        self._check_config_shapes(sys.argv[1:] if args is None else list(args))
        return super().parse_args(args, namespace, **kwargs)

    def _check_config_shapes(self, argv: list[str]) -> None:
        import yaml

        lists = {a.dest: a for a in self._actions if a.nargs in ("+", "*") and a.dest}
        for i, arg in enumerate(argv):
            if arg == "--config" and i + 1 < len(argv):
                src = argv[i + 1]
            elif arg.startswith("--config="):
                src = arg.split("=", 1)[1]
            else:
                continue
            try:
                text = Path(src).read_text() if Path(src).is_file() else None
                cfg = yaml.safe_load(text) if text is not None else None
            except (OSError, yaml.YAMLError, ValueError):
                continue  # jsonargparse names an unreadable file itself
            if not isinstance(cfg, dict):
                continue
            for key, action in lists.items():
                value = cfg.get(key)
                if value is None or isinstance(value, list):
                    continue
                hint = getattr(action, "_typehint", None) or action.type or str
                what = {str: "strings", int: "ints", float: "numbers", Budget: "budgets (ints, avg or front)"}.get(
                    hint, f"values of type {getattr(hint, '__name__', hint)}")
                self.error(f"config {src}: {key} must be a list of {what} (e.g. '{key}: [{value}]'), got "
                           f"{type(value).__name__} {value!r}")


def make_parser(doc: str) -> ArgumentParser:
    p = StepParser(description=doc, formatter_class=HelpFormatter, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile,
                   help="a YAML config; repeat it to merge several (later ones override earlier ones)")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of an error instead of its one-paragraph message (also: {DEBUG_ENV}=1)")
    return p


def __getattr__(name):
    if name == "RUN_ERRORS":
        from lightning_modules.runs import RunError
        from localization.cache import CacheError

        return (FileNotFoundError, KeyError, ValueError, RunError, CacheError)
    if name == "KNOWN_ERRORS":
        return known_errors()
    raise AttributeError(name)


def known_errors() -> tuple[type[BaseException], ...]:
    """The failures a script reports with a message (a file, a value, a run state the user can fix), not with a
    traceback: bad values and files, unreadable or stale results, missing files and full disks (OSError), a run
    that cannot be loaded, a fault that cannot be injected, a non-finite fitness, a patch of another head."""
    from core.runstore import ResultError
    from evaluation.injected_faults import InjectionError
    from evaluation.optimizer_replay import ReplayError
    from lightning_modules.repair.patch import PatchMismatchError
    from lightning_modules.runs import RunError
    from localization.cache import CacheError

    return (ValueError, KeyError, OSError, RunError, CacheError, ResultError, InjectionError, ReplayError,
            PatchMismatchError, FloatingPointError)


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line (``argv``, else ``sys.argv``) or ``VITFL_DEBUG`` set to a true value."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return any(a == "--debug" or a.lower() in ("--debug=true", "--debug=1") for a in args)


#: inside a :func:`guard`: whether that script's command line asked for tracebacks (None: not inside one)
_DEBUG: dict[str, bool | None] = {"on": None}


def _is_disk_full(err: BaseException) -> bool:
    from pipeline.localize import is_disk_full

    return is_disk_full(err)


def message(err: BaseException) -> str:
    """One paragraph (no blank line) saying what went wrong, what to do, and where."""
    if _is_disk_full(err):
        from pipeline.localize import DiskFullError

        path = getattr(err, "filename", None)
        where = Path(path).parent if path else None
        if isinstance(err, DiskFullError):  # raised around an atomic write of a run-store artifact
            left = ("That file is written to a temporary file and renamed only once complete, so nothing "
                    "half-written was left, and the rerun resumes where this one stopped.")
        else:
            left = ("Results, scores and caches are written to a temporary file and renamed only once complete, so "
                    "none is left half-written; a log being appended (TensorBoard events) may end mid-record.")
        return (f"no space left on device while writing {path or 'the run'}: free space on the file system that "
                f"holds {where or 'the run directory'} (remove finished runs or their tb/ event files, or "
                f"other large files there; `df -h {where or '.'}` shows what is left), then rerun. {left}")
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = str(msg).strip() or type(err).__name__
    return re.sub(r"\n\s*\n+", "\n", text)


def fail(script: str, err: BaseException) -> None:
    """Exit with status 1 after one paragraph on stderr naming what was wrong (``--debug`` / ``VITFL_DEBUG``:
    re-raise it, with its traceback)."""
    if _DEBUG["on"] if _DEBUG["on"] is not None else debug_requested():
        raise err
    _report(script, err)


def _report(script: str, err: BaseException) -> None:
    print(f"{script}: error: {message(err)} (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr,
          flush=True)
    sys.exit(1)


def guard(script: str | Callable[..., str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a script's ``main``: a known failure (:func:`known_errors`, or a disk-full error a library
    wrapped) ends it with :func:`fail`'s one paragraph and status 1; anything else (a bug) keeps its traceback.
    ``--debug`` in its argv (a list argument or ``argv=``; else ``sys.argv``) or ``VITFL_DEBUG=1``: every error
    keeps its traceback. ``script``: the name the message starts with (or a function of ``main``'s arguments
    giving it)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            argv = kwargs.get("argv")
            if argv is None:
                argv = next((a for a in args if isinstance(a, (list, tuple))), None)
            debug = debug_requested(argv)
            before = _DEBUG["on"]
            _DEBUG["on"] = debug
            try:
                return fn(*args, **kwargs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - sorted into known (message) and unknown (traceback)
                if debug or not (isinstance(e, known_errors()) or _is_disk_full(e)):
                    raise
                _report(script(*args, **kwargs) if callable(script) else script, e)
            finally:
                _DEBUG["on"] = before

        return run

    return deco


def quiet() -> None:
    from pipeline.experiment import quiet as _quiet

    _quiet()
