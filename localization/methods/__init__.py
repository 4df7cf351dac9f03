"""Every FL method; importing this package registers them all (``vitfl.localization.base.get_localizer``).

One file per method family, each stating its formulas (docs/methods.md):

=====================  ======================================================================  ==========
file                   registered names                                                        level
=====================  ======================================================================  ==========
random_.py             random, random_neuron                                                   weight / neuron
neuron_scores.py       vdiff, mean_act, vdiff_x_mean_act (NeuronScore)                         neuron
gradient.py            grad_loss (I_neg), grad_loss_2s, gradient_only                          weight
forward_impact.py      forward_impact (I_neg), forward_impact_2s                               weight
baselines.py           magnitude                                                               weight
arachne.py             bl (Pareto front), arachne_w                                            weight
ours.py                ours, ours_fl5 (exp-fl-5-6 as published)                                weight
ig.py                  ig (knowledge neurons)                                                  neuron
spectrum.py            tarantula, ochiai, dstar                                                neuron
reptran_compat.py      grad_loss_reptran, forward_impact_reptran, arachne_w_reptran,           weight
                       bl_reptran, ours_reptran, bl_fl5 (the published GL / FI; docs/compat.md)
=====================  ======================================================================  ==========
"""
from vitfl.localization.methods import (  # noqa: F401  (imports register the methods)
    arachne,
    baselines,
    forward_impact,
    gradient,
    ig,
    neuron_scores,
    ours,
    random_,
    reptran_compat,
    spectrum,
)
