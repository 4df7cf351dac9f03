"""Test adequacy for DNNs (docs/methods.md, section 8): importance-driven coverage (DeepImportance) with Captum attributions,
NeuraL-Coverage's baseline criteria, adversarial suites through ART, and the RQ1-5 experiments.

- :mod:`vitfl.adequacy.activations`  neuron layers, output reduction (CLS / token mean / channel mean), forward hooks
- :mod:`vitfl.adequacy.attribution`  Captum layer attributions, neuron importance, rank voting, input attributions
- :mod:`vitfl.adequacy.idc`          IDC on activation tables
- :mod:`vitfl.adequacy.criteria`     NC, KMNC, NBC, SNAC, TKNC, TKNP, CC, LSC, DSC, MDSC, NLC
- :mod:`vitfl.adequacy.attacks`      FGSM, PGD, C&W via ``art.attacks.evasion``
- :mod:`vitfl.adequacy.experiments`  CoverageSuite, RQ1-5, ``coverage_table``, their reports

The data preparation, the config merge and the RQ runner are the adequacy step, ``pipeline/adequacy.py``.
"""

from vitfl import refuse_bare_name

refuse_bare_name(__name__)  # 'import adequacy' stops here with the right name


import importlib


def require(module: str, package: str):
    """``module`` imported, or an ImportError saying which optional package the adequacy part needs and how to
    install it (``pip install 'vit-fl-repair[adequacy]'``; the core install leaves captum and ART out)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"test adequacy needs {package} ({module} could not be imported: {e}); install the "
                          "adequacy extra: pip install -e '.[adequacy]'") from None
