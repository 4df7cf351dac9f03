"""The steps of an experiment, one module each, in data-flow order; each is a function of a run store (a
:class:`vitfl.core.runstore.RunStore`) that the thin scripts and the experiment runner (``experiment``, which also runs
the main job) call:

==================  ===============================================================================
module              step
==================  ===============================================================================
``train``           pretrain + export (optional), fit / resume, test the classifier (LightningCLI)
``testbed``         the layer study and the checkpoint benchmark's diagnostics (report/testbed.json)
``cache``           cache the CLS states of the repair and test folds (one predict pass per split)
``misclf``          misclassification settings and the confusion figure
``localize``        FL methods x settings x budgets, through the one FL runner, into the run store
``evaluate_fl``     interventions, checkpoint-diff and injected-fault benchmarks, statistics, figures
``repair``          the repair sweep (FL method x setting x budget x repetition), tables and statistics
``crossval``        the cross-validated repair over the k folds of the evaluation split; repairability@N
``adequacy``        coverage of the trained model (DeepImportance IDC and the baseline criteria)
==================  ===============================================================================

``context.RunContext`` holds what the steps after training share (the model, its FFN head, the state caches, the
settings and the hashes that make result identities). Nothing here reads argv; scripts decide the run directory.
"""

from vitfl import refuse_bare_name

refuse_bare_name(__name__)  # 'import pipeline' stops here with the right name
