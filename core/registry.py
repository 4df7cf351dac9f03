"""One registry shape for every pluggable part (FL methods, repair methods, backbones, data modules, coverage
criteria), in the spirit of timm's ``register_model``.

A part registers itself with a decorator in its own file::

    FL_METHODS = Registry("FL method", packages=("vitfl.localization.methods",), entry_points="vitfl.fl_methods",
                          meta_fields={"level": "weight", ...})

    @FL_METHODS.register("my_method", level="neuron")
    class MyMethod(Localizer): ...

* **Discovery without a hand-kept list**: the first lookup imports every module of the registry's packages
  (``pkgutil``; modules whose name starts with ``_`` are helpers and are imported only when a method file imports
  them) and the modules it names (``modules=``, for parts that live in one module), then the third-party plugins advertised under the registry's Python entry-point group
  (``[options.entry_points] vitfl.fl_methods = mine = my_pkg.my_module`` in a plugin's setup.cfg), and the modules
  named in the environment variable ``VITFL_PLUGINS`` (comma-separated; handy for a plugin that is not installed).
* **Metadata**: each registry declares the fields its runners need and their defaults (``meta_fields``); a value
  comes from the decorator's keywords, else from the class attribute of that name, else the default. Runners ask
  :meth:`Registry.meta` instead of testing names.
* :meth:`Registry.describe` gives the one-line summary, the metadata and the constructor options, for
  ``--list --verbose`` and the docs.
* **One rule for options** (:meth:`Registry.check_options`, used by the API, the command lines and the experiment
  configs alike): a method's options are the keyword parameters of its constructor; a value must have the
  parameter's annotated type (else the type of its default; ``int`` stays ``int``: 2.5 is an error, never
  truncated; an int given for a ``float`` becomes that float, so 1 and 1.0 are one option value), and lie in the
  class's declared ranges and choices, collected along its MRO::

      option_ranges = {"generations": (1, None), "cr": (0, 1), "radius": Range(0, None, lo_open=True)}
      option_choices = {"update": ("deferred", "immediate")}

* **A broken plugin does not break the toolkit**: an entry point or ``VITFL_PLUGINS`` module that fails to import
  is skipped with a :class:`PluginLoadWarning` naming it; every other method keeps working.
"""
from __future__ import annotations

import collections.abc
import importlib
import inspect
import math
import os
import pkgutil
import sys
import types
import typing
import warnings
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Registry", "UnknownNameError", "Derived", "OptionError", "Range", "PluginLoadWarning"]


class Derived:
    """A metadata default computed from the registered object (e.g. ``Derived(lambda cls: hasattr(cls, "x"))``)."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn


class UnknownNameError(KeyError):
    """A name no registry entry has; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


class OptionError(ValueError):
    """An option a method does not have, or a value of the wrong type or outside the method's declared range."""


class PluginLoadWarning(UserWarning):
    """A third-party plugin (entry point or ``VITFL_PLUGINS`` module) failed to import and was skipped."""


class Range:
    """A numeric range for ``option_ranges`` (a plain ``(lo, hi)`` tuple is the closed range; None: unbounded)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def __contains__(self, v: Any) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi}"
        return " and ".join(x for x in (lo, hi) if x) or "any value"


class Registry:
    def __init__(self, kind: str, packages: Iterable[str] = (), entry_points: str | None = None,
                 meta_fields: Mapping[str, Any] | None = None, error: type[Exception] = UnknownNameError,
                 modules: Iterable[str] = ()):
        self.kind = kind
        self.packages = tuple(packages)
        self.modules = tuple(modules)
        self.entry_points = entry_points
        self.meta_fields = dict(meta_fields or {})
        self.error = error
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._discovered = False
        self._discovering = False

    # --------------------------------------------------------------------------------------------- registration
    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        unknown = set(meta) - set(self.meta_fields)
        if unknown:
            raise TypeError(f"{self.kind} {name!r}: unknown metadata {sorted(unknown)}; known: "
                            f"{sorted(self.meta_fields)}")

        def deco(obj):
            if name in self._items and self._items[name] is not obj:
                prev = self._items[name]
                same = (getattr(prev, "__module__", None), getattr(prev, "__qualname__", None)) == \
                       (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
                if not same:  # a module re-imported under another name is the same entry
                    raise ValueError(f"{self.kind} {name!r} registered twice ({_qual(prev)}, {_qual(obj)})")
            if inspect.isclass(obj):
                obj.name = name
            self._items[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    # ---------------------------------------------------------------------------------------------- discovery
    def discover(self) -> None:
        if self._discovered or self._discovering:
            return
        self._discovering = True
        try:
            for mod in self.modules:
                importlib.import_module(mod)
            for pkg in self.packages:
                mod = importlib.import_module(pkg)
                for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
                    if not info.name.startswith("_"):
                        importlib.import_module(f"{pkg}.{info.name}")
            if self.entry_points:
                from importlib.metadata import entry_points

                for ep in entry_points(group=self.entry_points):
                    try:
                        ep.load()
                    except Exception as e:  # noqa: BLE001 - a third-party plugin must not break the toolkit
                        dist = getattr(getattr(ep, "dist", None), "name", None)
                        self._plugin_failed(f"entry point {ep.name} = {ep.value} (group {self.entry_points}"
                                            + (f", package {dist}" if dist else "") + ")", e)
            for mod in filter(None, (m.strip() for m in os.environ.get("VITFL_PLUGINS", "").split(","))):
                try:
                    importlib.import_module(mod)
                except Exception as e:  # noqa: BLE001
                    self._plugin_failed(f"module {mod} (named in VITFL_PLUGINS)", e)
            self._discovered = True
        finally:
            self._discovering = False

    def _plugin_failed(self, what: str, err: BaseException) -> None:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warnings.warn(f"{self.kind} plugin {what} failed to load and is skipped ({type(err).__name__}"
                      f"{': ' + msg if msg else ''}); the other {self.kind}s work as before. Fix or uninstall that "
                      "plugin to silence this warning.", PluginLoadWarning, stacklevel=3)

    def refresh(self) -> None:
        """Discover again (after a plugin was added in this process)."""
        self._discovered = False
        self.discover()

    # ------------------------------------------------------------------------------------------------ lookups
    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def __iter__(self):
        return iter(self.names())

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items

    def get(self, name: str) -> Any:
        self.discover()
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def check(self, names: Iterable[str]) -> list[str]:
        """Every name, or one error naming all unknown ones (before any work starts)."""
        names = list(names)
        self.discover()
        bad = [n for n in names if n not in self._items]
        if bad:
            raise self.error(f"unknown {self.kind}{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                             f"registered: {', '.join(sorted(self._items))}")
        return names

    def meta(self, name: str) -> dict[str, Any]:
        obj = self.get(name)
        out = {}
        for field, default in self.meta_fields.items():
            if field in self._meta[name]:
                out[field] = self._meta[name][field]
            elif isinstance(default, Derived):
                out[field] = default.fn(obj)
            else:
                out[field] = getattr(obj, field, default)
        return out

    def options(self, name: str) -> dict[str, Any]:
        """The constructor's keyword options and their defaults (what a config may set)."""
        obj = self.get(name)
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):  # pragma: no cover
            return {}
        out = {}
        for p in sig.parameters.values():
            if p.name in ("self", "head") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is not inspect.Parameter.empty:
                out[p.name] = p.default
        return out

    def option_types(self, name: str) -> dict[str, Any]:
        """Option -> its annotated type (evaluated in the constructor's module; ``Any`` where it cannot be), else
        the type of its default (bool, int, float, str; ``Any`` for None or other defaults)."""
        obj = self.get(name)
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):  # pragma: no cover
            return {}
        module = sys.modules.get(getattr(target, "__module__", ""), None)
        ns = dict(vars(module)) if module else {}
        out: dict[str, Any] = {}
        for p in sig.parameters.values():
            if p.default is inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann = p.annotation
            if isinstance(ann, str):
                try:
                    ann = eval(ann, {**vars(typing), **ns})  # noqa: S307 - the method's own source annotation
                except Exception:  # noqa: BLE001 - a name only imported for type checking
                    ann = Any
            if ann is inspect.Parameter.empty:
                d = p.default
                ann = type(d) if isinstance(d, (bool, int, float, str)) else (list if isinstance(d, (list, tuple))
                                                                           else Any)
            out[p.name] = ann
        return out

    def option_declarations(self, name: str) -> tuple[dict[str, Any], dict[str, tuple]]:
        """(``option_ranges``, ``option_choices``) of the method, merged along its MRO (a subclass overrides)."""
        obj = self.get(name)
        ranges: dict[str, Any] = {}
        choices: dict[str, tuple] = {}
        for klass in reversed(inspect.getmro(obj) if inspect.isclass(obj) else (obj,)):
            ranges.update(getattr(klass, "__dict__", {}).get("option_ranges", {}) or {})
            choices.update(getattr(klass, "__dict__", {}).get("option_choices", {}) or {})
        return ranges, choices

    def check_options(self, name: str, options: Mapping[str, Any] | None, *,
                      reserved: Iterable[str] = ("seed",)) -> dict[str, Any]:
        """``options`` checked against the method's constructor (the one rule of the API, the command lines and the
        experiment configs): every name an option (``reserved`` ones, e.g. the seed the runner sets, are not), every
        value of the option's type and in its declared range / choices. Returns the options as given, normalised
        (an int for a ``float`` option becomes a float; sequences become lists). Raises :class:`OptionError` naming
        the method, the option, the value and what was expected."""
        if options is None:
            return {}
        if not isinstance(options, Mapping):
            raise OptionError(f"{self.kind} {name!r}: options must be a mapping of option -> value, got "
                              f"{type(options).__name__} {options!r}")
        defaults = self.options(name)
        reserved = set(reserved)
        known = sorted(k for k in defaults if k not in reserved)
        taken = [k for k in options if k in reserved]
        if taken:
            raise OptionError(f"{self.kind} {name!r}: {taken} cannot be set as an option (the runner sets "
                              f"{'it' if len(taken) == 1 else 'them'}: e.g. --seed); its options: {known}")
        unknown = [k for k in options if k not in defaults]
        if unknown:
            raise OptionError(f"{self.kind} {name!r} has no option(s) {unknown}; its options: {known}")
        types_ = self.option_types(name)
        ranges, choices = self.option_declarations(name)
        out: dict[str, Any] = {}
        for k, v in options.items():
            where = f"{self.kind} {name!r}: option {k}={v!r}"
            try:
                v = _conform(v, types_.get(k, Any))
            except _Mismatch as m:
                raise OptionError(f"{where} must be {m.expected}; got {_kind_of(v)}") from None
            if k in choices and v not in choices[k]:
                raise OptionError(f"{where} must be one of {list(choices[k])}")
            if k in ranges and v is not None:
                rng = ranges[k] if isinstance(ranges[k], Range) else Range(*ranges[k])
                vals = v if isinstance(v, list) else [v]
                bad = [x for x in vals if isinstance(x, (int, float)) and not isinstance(x, bool) and x not in rng]
                if bad:
                    raise OptionError(f"{where} must be {rng}" + (" (each element)" if isinstance(v, list) else ""))
            out[k] = v
        return out

    def summary(self, name: str) -> str:
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.strip().split("\n\n")[0].replace("\n", " ")

    def describe(self, name: str) -> str:
        meta = ", ".join(f"{k}={v!r}" for k, v in self.meta(name).items())
        ranges, choices = self.option_declarations(name)

        def rule(k: str) -> str:
            if k in choices:
                return f" (one of {list(choices[k])})"
            if k in ranges:
                return f" ({ranges[k] if isinstance(ranges[k], Range) else Range(*ranges[k])})"
            return ""

        opts = ", ".join(f"{k}={v!r}{rule(k)}" for k, v in self.options(name).items())
        return (f"{name}: {self.summary(name)}\n    module: {self.get(name).__module__}\n    metadata: {meta or '-'}"
                f"\n    options: {opts or '-'}")

    def listing(self, verbose: bool = False) -> str:
        return "\n".join(self.describe(n) if verbose else n for n in self.names())


class _Mismatch(Exception):
    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


_NAMES = {bool: "true or false", int: "an int", float: "a number", str: "a string", type(None): "null",
          list: "a list", dict: "a mapping"}


def _kind_of(v: Any) -> str:
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", type(None): "null", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _plural(tp: Any) -> str:
    return {bool: "bools", int: "ints", float: "numbers", str: "strings"}.get(tp, f"values of type {_describe(tp)}")


def _describe(tp: Any) -> str:
    if tp in _NAMES:
        return _NAMES[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else \
                f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _conform(v: Any, tp: Any) -> Any:
    """``v`` as an option of type ``tp`` (normalised), or :class:`_Mismatch` saying what was expected."""
    cabc = collections.abc

    if tp is Any or tp is inspect.Parameter.empty or tp is object:
        return list(v) if isinstance(v, tuple) else v
    if tp is None or tp is type(None):
        if v is None:
            return None
        raise _Mismatch("null")
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise _Mismatch(_describe(tp))
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return int(v)
        raise _Mismatch("an int" + (" (an integer option is never rounded)" if isinstance(v, float) else ""))
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v)):
            return float(v)
        raise _Mismatch("a number")
    if tp is str:
        if isinstance(v, str):
            return v
        raise _Mismatch(_describe(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if v in args and not (isinstance(v, bool) and not any(isinstance(a, bool) for a in args)):
            return v
        raise _Mismatch(_describe(tp))
    if origin in (typing.Union, types.UnionType):
        order = sorted(args, key=lambda a: (a is float, a is str))  # exact types first: 2 stays an int in int | float
        for a in order:
            try:
                return _conform(v, a)
            except _Mismatch:
                continue
        raise _Mismatch(_describe(tp))
    if origin in (list, tuple, set, frozenset, cabc.Sequence) or tp in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise _Mismatch(_describe(tp))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(v) != len(args):
                raise _Mismatch(_describe(tp))
            return [_conform(x, a) for x, a in zip(v, args)]
        inner = args[0] if args else Any
        return [_conform(x, inner) for x in v]
    if origin in (dict, cabc.Mapping) or tp in (dict, Mapping):
        if isinstance(v, Mapping):
            return dict(v)
        raise _Mismatch("a mapping")
    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        raise _Mismatch(_describe(tp))
    return v  # a type this rule cannot judge (a callable, a protocol): the constructor checks it


def _qual(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
