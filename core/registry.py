"""One registry shape for every pluggable part (FL methods, repair methods, backbones, data modules, coverage
criteria), in the spirit of timm's ``register_model``.

A part registers itself with a decorator in its own file::

    FL_METHODS = Registry("FL method", packages=("localization.methods",), entry_points="vitfl.fl_methods",
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
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Registry", "UnknownNameError", "Derived"]


class Derived:
    """A metadata default computed from the registered object (e.g. ``Derived(lambda cls: hasattr(cls, "x"))``)."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn


class UnknownNameError(KeyError):
    """A name no registry entry has; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


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
                    ep.load()
            for mod in filter(None, (m.strip() for m in os.environ.get("VITFL_PLUGINS", "").split(","))):
                importlib.import_module(mod)
            self._discovered = True
        finally:
            self._discovering = False

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

    def summary(self, name: str) -> str:
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.strip().split("\n\n")[0].replace("\n", " ")

    def describe(self, name: str) -> str:
        meta = ", ".join(f"{k}={v!r}" for k, v in self.meta(name).items())
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options(name).items())
        return (f"{name}: {self.summary(name)}\n    module: {self.get(name).__module__}\n    metadata: {meta or '-'}"
                f"\n    options: {opts or '-'}")

    def listing(self, verbose: bool = False) -> str:
        return "\n".join(self.describe(n) if verbose else n for n in self.names())


def _qual(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
