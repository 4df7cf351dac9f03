"""The toolkit's one import namespace: ``vitfl.core``, ``vitfl.localization``, ``vitfl.datamodules``,
``vitfl.callbacks``, ``vitfl.lightning_modules``, ``vitfl.evaluation``, ``vitfl.adequacy``, ``vitfl.pipeline``.

The packages live in the repository's top-level folders (``core/``, ``localization/``, ...); an install puts them
under ``vitfl/`` in site-packages, so no generic top-level name (``core``, ``pipeline``) is taken from other
distributions. From a checkout (an editable install, or ``python scripts/x.py`` without one), this package's path
is extended to the repository root, so ``vitfl.core`` is ``<repo>/core``. Importing a package by its old bare name
from a checkout (``import core``) raises an ImportError that names the new one (:func:`refuse_bare_name`).
"""
from __future__ import annotations

from pathlib import Path as _Path

#: the toolkit's packages, bottom layer first (who may import whom: pyproject.toml's import contracts)
PACKAGES = ("core", "localization", "datamodules", "callbacks", "lightning_modules", "evaluation", "adequacy",
            "pipeline")

_here = _Path(__file__).resolve().parent
if not (_here / "core").is_dir() and (_here.parent / "core" / "runstore.py").is_file():  # a checkout, not an install
    __path__.append(str(_here.parent))  # noqa: F821 - the package's own __path__


def refuse_bare_name(name: str) -> None:
    """Called first by each package's ``__init__``: imported as ``core`` (not ``vitfl.core``), it stops with an
    ImportError naming the right import instead of running a second copy of the module beside the first."""
    if name in PACKAGES:
        raise ImportError(f"the toolkit's package {name!r} is imported as 'vitfl.{name}' (e.g. 'from vitfl.{name} "
                          f"import ...'); the bare name {name!r} is not the toolkit's and is refused so that it "
                          f"cannot silently resolve to another distribution's {name!r} or load a second copy")
