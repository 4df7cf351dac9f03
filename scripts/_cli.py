"""Shared pieces of the step scripts' command lines (jsonargparse, as ``scripts/train.py``'s LightningCLI): every
script takes ``--config`` (repeatable; later files override earlier ones, flags override both) and
``--print_config`` (prints the merged config and exits), one flag style (underscores), and shows each option's
help, type and default in ``--help``.

Errors: a known failure (a bad file, a stale or unreadable result, a full disk, a missing checkpoint, a bad value)
ends every script with one paragraph on stderr (``<script>: error: ...``) and exit status 1, not a traceback
(:func:`guard`); ``--debug`` (a flag of every script) or ``VITFL_DEBUG=1`` shows the traceback instead. A value of
the wrong shape in a ``--config`` file (``budgets: 9`` where a list is expected) is an error naming the key and the
expected type.

One vocabulary: option names are never abbreviated (``allow_abbrev=False``: ``--run_dir`` is not a prefix of
``--run_dirs``); an unknown name ends with one line naming the closest option ("did you mean --methods?") instead
of the usage; ``--progress {none,bar,all}`` is the one progress option (``--no_progress`` and ``--progress_bar``:
deprecated aliases that warn); ``--method_options`` names FL method options everywhere. ``--help`` imports
nothing heavy (no torch): the scripts import the pipeline after parsing.

Signals: a script stopped by SIGTERM or SIGINT (:func:`guard`) exits with status 128 + the signal's number (143,
130) after one paragraph naming the step it stopped in and the command that resumes it (every step skips what the
run store holds); worker processes (``vitfl.pipeline.parallel``) pass the interruption back instead of ending as a
success."""
from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Union

import _bootstrap  # noqa: F401
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

#: a budget: a positive number of weights, a share of the layer "P%" (e.g. "0.01%"), "avg" (N_avg) or "front"
#: (the method's own selection); each step checks it (vitfl.localization.ranking.parse_budget) before any work
Budget = Union[int, str]
#: the default budgets (vitfl.pipeline.repair.DEFAULT_BUDGETS: localization.ranking.DEFAULT_BUDGETS + "avg", spelled out so
#: --help imports no torch; tests/test_cli_vocabulary.py compares them): the published 236 / 472 / 944 of ViT-B/16's
#: 4,718,592 weights as shares, so a smaller model gets the same shares
DEFAULT_BUDGETS = ["0.005%", "0.01%", "0.02%", "avg"]
#: the environment variable that shows tracebacks (as ``--debug`` does)
DEBUG_ENV = "VITFL_DEBUG"


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (type and default of every option) with the docstring's layout kept."""


#: the one progress option's values: no bars, the step's own bar (default), also Lightning's bar inside each run
Progress = Literal["none", "bar", "all"]


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option name of ``parser`` (``--x``), nested keys (``--localize.methods``) included."""
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def suggestion(given: str, names: list[str]) -> str | None:
    """The option ``given`` was probably meant to be: the only name it abbreviates, else the closest name
    (:func:`difflib.get_close_matches`), else None."""
    given = given.split("=", 1)[0]
    longer = [n for n in names if n.startswith(given) and n != given]
    if len(longer) == 1:
        return longer[0]
    close = difflib.get_close_matches(given, names, n=1, cutoff=0.6)
    return close[0] if close else (sorted(longer, key=len)[0] if longer else None)


def unknown_options_message(message: str, parser: argparse.ArgumentParser) -> str | None:
    """For argparse's / jsonargparse's "unrecognized arguments: ..." ``message``: one line naming each unknown
    option and the closest known one; None for any other message."""
    m = re.match(r"\s*unrecognized arguments?: (.*)$", str(message), re.S)
    if not m:
        return None
    names = option_names(parser)
    unknown = [t for t in m.group(1).split() if t.startswith("-") and t.split("=", 1)[0] not in names]
    if not unknown:
        return None
    parts = []
    for t in unknown:
        hint = suggestion(t, names)
        name = t.split("=", 1)[0]
        parts.append(f"unknown option {name}" + (f"; did you mean {hint}?" if hint else ""))
    prog = parser.prog.replace(" [options]", "")
    return f"{'; '.join(parts)} (option names are never abbreviated; {prog} --help lists them)"


class SuggestingParser:
    """A parser mixin: an unknown option name ends with one line ("did you mean --x?", status 2) instead of the
    usage and a long error; every other error is the parser's own."""

    def error(self, message, *args, **kwargs):  # noqa: D102
        short = unknown_options_message(message, self)
        if short is not None and getattr(self, "exit_on_error", True) and not os.environ.get("JSONARGPARSE_DEBUG"):
            sys.stderr.write(f"{self.prog.replace(' [options]', '')}: error: {short}\n")
            self.exit(2)
        return super().error(message, *args, **kwargs)


class ArgParser(SuggestingParser, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with this vocabulary: no abbreviated option names, "did you mean" on an
    unknown one (for a script that does not use jsonargparse)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class StepParser(SuggestingParser, ArgumentParser):
    """jsonargparse's parser, plus a check of the ``--config`` files' values for the list options (``nargs``):
    jsonargparse reports ``budgets: 9`` as "'int' object is not iterable" and ``methods: random`` as "'str' object
    does not support item assignment"; here they are errors naming the key and the expected type. Option names
    are never abbreviated; an unknown one gets a "did you mean"; :meth:`add_alias` adds another name of an option
    (a deprecated one warns when used)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._aliases: dict[str, tuple[str, str | None, bool]] = {}

    def add_alias(self, old: str, new: str, value: str | None = None, deprecated: bool = True) -> None:
        """``old`` on the command line means ``new`` (with ``value``: the flag ``old`` means ``new value``, e.g.
        ``--no_progress`` = ``--progress none``); ``deprecated``: say so on stderr when it is used."""
        self._aliases[old] = (new, value, deprecated)

    def rewrite_aliases(self, argv: list[str]) -> list[str]:
        """``argv`` with every alias replaced by its option (deprecated ones named once on stderr)."""
        out: list[str] = []
        for arg in argv:
            name, eq, val = arg.partition("=")
            if name not in self._aliases:
                out.append(arg)
                continue
            new, value, deprecated = self._aliases[name]
            if value is None:
                out.append(new + eq + val)
                repl = new
            else:
                if eq and val.strip().lower() in ("false", "0", "no"):
                    continue  # --no_progress=false: the default
                out += [new, value]
                repl = f"{new} {value}"
            if deprecated:
                prog = self.prog.replace(" [options]", "")
                print(f"{prog}: warning: {name} is deprecated; use {repl}", file=sys.stderr, flush=True)
        return out

    def parse_args(self, args=None, namespace=None, **kwargs):  # noqa: D102
        args = self.rewrite_aliases(sys.argv[1:] if args is None else [str(a) for a in args])
        self._check_config_shapes(args)
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
                what = {str: "strings", int: "ints", float: "numbers", Budget: "budgets (ints, shares like 0.01%, avg or front)"}.get(
                    hint, f"values of type {getattr(hint, '__name__', hint)}")
                self.error(f"config {src}: {key} must be a list of {what} (e.g. '{key}: [{value}]'), got "
                           f"{type(value).__name__} {value!r}")


def make_parser(doc: str) -> StepParser:
    p = StepParser(description=doc, formatter_class=HelpFormatter, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile,
                   help="a YAML config; repeat it to merge several (later ones override earlier ones)")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of an error instead of its one-paragraph message (also: {DEBUG_ENV}=1)")
    return p


def add_progress(p: StepParser, what: str, all_means: str = "also Lightning's bar inside each run") -> None:
    """The one progress option, ``--progress {none,bar,all}`` (``what``: the bar it shows by default), and its
    deprecated aliases ``--no_progress`` (= none) and ``--progress_bar`` (= all)."""
    p.add_argument("--progress", type=Progress, default="bar",
                   help=f"progress bars: none; bar ({what}); all ({all_means}). Deprecated aliases: --no_progress "
                        "(none), --progress_bar (all)")
    p.add_alias("--no_progress", "--progress", "none")
    p.add_alias("--progress_bar", "--progress", "all")


def add_method_options(p: StepParser, help: str, key: str = "--method_options") -> None:
    """``--method_options`` (FL method -> its options), with ``--method_opts`` (the pipeline's keyword name) as a
    deprecated alias."""
    from typing import Any, Dict

    p.add_argument(key, type=Dict[str, Dict[str, Any]], default={}, help=help)
    p.add_alias(key.replace("method_options", "method_opts"), key)


def __getattr__(name):
    if name == "RUN_ERRORS":
        from vitfl.lightning_modules.runs import RunError
        from vitfl.core.states import CacheError

        return (FileNotFoundError, KeyError, ValueError, RunError, CacheError)
    if name == "KNOWN_ERRORS":
        return known_errors()
    raise AttributeError(name)


def known_errors() -> tuple[type[BaseException], ...]:
    """The failures a script reports with a message (a file, a value, a run state the user can fix), not with a
    traceback: bad values and files, unreadable or stale results, missing files and full disks (OSError), a run
    that cannot be loaded, a fault that cannot be injected, a non-finite fitness, a patch of another head."""
    from vitfl.core.runstore import ResultError
    from vitfl.evaluation.injected_faults import InjectionError
    from vitfl.evaluation.optimizer_replay import ReplayError
    from vitfl.lightning_modules.repair.patch import PatchMismatchError
    from vitfl.lightning_modules.runs import RunError
    from vitfl.core.states import CacheError

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
    from vitfl.pipeline.localize import is_disk_full

    return is_disk_full(err)


def message(err: BaseException) -> str:
    """One paragraph (no blank line) saying what went wrong, what to do, and where."""
    if _is_disk_full(err):
        from vitfl.pipeline.localize import DiskFullError

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


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that reruns this script (``argv``: its arguments, else ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    prog = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "<script>"
    try:
        rel = os.path.relpath(prog)
        prog = rel if not rel.startswith("..") else prog
    except ValueError:
        pass
    return shlex.join(["python", prog, *args])


def interrupted_message(script: str, stop: BaseException, argv: list[str] | None = None) -> str:
    """One paragraph: which signal stopped ``script`` in which step, what is kept, and the command that resumes."""
    from vitfl.pipeline.parallel import current_step

    step = current_step() or getattr(stop, "step", None) or script
    cmd = resume_command(argv)
    extra = ""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if script == "train" and args[:1] == ["fit"] and not any(a.startswith("--ckpt_path") for a in args):
        cmd += " --ckpt_path last"
        extra = " (--ckpt_path last continues from the last epoch's checkpoint)"
    name = getattr(stop, "signame", "a signal")
    return (f"{script}: stopped by {name} in step {step!r}; exit status {getattr(stop, 'exit_status', 1)}. What "
            f"finished before the signal is in the run store (every result is written whole or not at all); to "
            f"resume, rerun the same command, which skips what the run store holds{extra}: {cmd}")


def guard(script: str | Callable[..., str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a script's ``main``: a known failure (:func:`known_errors`, or a disk-full error a library
    wrapped) ends it with :func:`fail`'s one paragraph and status 1; anything else (a bug) keeps its traceback.
    ``--debug`` in its argv (a list argument or ``argv=``; else ``sys.argv``) or ``VITFL_DEBUG=1``: every error
    keeps its traceback. ``script``: the name the message starts with (or a function of ``main``'s arguments
    giving it).

    SIGTERM / SIGINT while ``main`` runs (``vitfl.pipeline.parallel.interrupt_handlers``): one paragraph naming the step
    it stopped in and the command that resumes it (:func:`interrupted_message`), exit status 128 + the signal's
    number (143 / 130), with or without ``--debug``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            from vitfl.pipeline.parallel import as_interrupted, interrupt_handlers

            argv = kwargs.get("argv")
            if argv is None:
                argv = next((a for a in args if isinstance(a, (list, tuple))), None)
            debug = debug_requested(argv)
            before = _DEBUG["on"]
            _DEBUG["on"] = debug
            name = lambda: script(*args, **kwargs) if callable(script) else script  # noqa: E731
            try:
                with interrupt_handlers():
                    try:
                        return fn(*args, **kwargs)
                    except BaseException as e:  # noqa: BLE001 - a signal's stop is said here, in its handlers' scope
                        stop = as_interrupted(e)
                        if stop is None:
                            raise
                        print(interrupted_message(name(), stop, None if argv is None else list(argv)),
                              file=sys.stderr, flush=True)
                        raise SystemExit(stop.exit_status) from None
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - sorted into known (message) and unknown (traceback)
                if debug or not (isinstance(e, known_errors()) or _is_disk_full(e)):
                    raise
                _report(name(), e)
            finally:
                _DEBUG["on"] = before

        return run

    return deco


def quiet() -> None:
    """The toolkit's one list of known warnings and info loggers silenced (vitfl.core.quiet)."""
    from vitfl.core.quiet import quiet as _quiet

    _quiet()
