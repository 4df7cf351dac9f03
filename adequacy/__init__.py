"""Test adequacy for DNNs (docs/methods.md, section 8): importance-driven coverage (DeepImportance) with Captum attributions,
NeuraL-Coverage's baseline criteria, adversarial suites through ART, and the RQ1-5 experiments.

- :mod:`adequacy.activations`  neuron layers, output reduction (CLS / token mean / channel mean), forward hooks
- :mod:`adequacy.attribution`  Captum layer attributions, neuron importance, rank voting, input attributions
- :mod:`adequacy.idc`          IDC on activation tables
- :mod:`adequacy.criteria`     NC, KMNC, NBC, SNAC, TKNC, TKNP, CC, LSC, DSC, MDSC, NLC
- :mod:`adequacy.attacks`      FGSM, PGD, C&W via ``art.attacks.evasion``
- :mod:`adequacy.experiments`  CoverageSuite, RQ1-5, ``coverage_table``, their reports

The data preparation, the config merge and the RQ runner are the adequacy step, ``pipeline/adequacy.py``.
"""

import importlib


def require(module: str, package: str):
    """``module`` imported, or an ImportError saying which optional package the adequacy part needs and how to
    install it (``pip install 'vit-fl-repair[adequacy]'``; the core install leaves captum and ART out)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"test adequacy needs {package} ({module} could not be imported: {e}); install the "
                          "adequacy extra: pip install -e '.[adequacy]'") from None
