"""Shared pieces of the step scripts' command lines (jsonargparse, as ``scripts/train.py``'s LightningCLI): every
script takes ``--config`` (repeatable; later files override earlier ones, flags override both) and
``--print_config`` (prints the merged config and exits), one flag style (underscores), and shows each option's
help, type and default in ``--help``."""
from __future__ import annotations

import argparse
import sys
from typing import Literal, Union

import _bootstrap  # noqa: F401
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

#: a budget: a positive number of weights, "avg" (N_avg) or "front" (the method's own selection)
Budget = Union[int, Literal["avg", "front"]]


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (type and default of every option) with the docstring's layout kept."""


def make_parser(doc: str) -> ArgumentParser:
    p = ArgumentParser(description=doc, formatter_class=HelpFormatter, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile,
                   help="a YAML config; repeat it to merge several (later ones override earlier ones)")
    return p


def __getattr__(name):
    if name == "RUN_ERRORS":
        from lightning_modules.runs import RunError
        from localization.cache import CacheError

        return (FileNotFoundError, KeyError, ValueError, RunError, CacheError)
    raise AttributeError(name)


def quiet() -> None:
    from pipeline.experiment import quiet as _quiet

    _quiet()


def fail(script: str, err: BaseException) -> None:
    """Exit non-zero with one line naming what was wrong."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    sys.exit(f"{script}: error: {msg}")
