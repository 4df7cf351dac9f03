"""Packages of the one import namespace: each top-level folder (core/, pipeline/, ...) installs as vitfl.<name>, so
no generic top-level name goes into site-packages; everything else is in setup.cfg."""
from setuptools import find_packages, setup

NAMES = ("core", "localization", "datamodules", "callbacks", "lightning_modules", "evaluation", "adequacy", "pipeline")

setup(packages=["vitfl"] + [f"vitfl.{name}" + (f".{sub}" if sub else "") for name in NAMES
                            for sub in ["", *find_packages(name)]],
      package_dir={"vitfl": "vitfl", **{f"vitfl.{name}": name for name in NAMES}})
