"""The steps of an experiment, one module each, in data-flow order; each is a function of a run directory (a
:class:`core.runstore.RunStore`) that the thin scripts, the experiment runner and the main job call:

==================  ===============================================================================
module              step
==================  ===============================================================================
``train``           fit / test the classifier (LightningCLI), per-epoch checkpoints and last-FFN files
``cache``           cache the CLS states of the repair and test folds (one predict pass per split)
``misclf``          misclassification settings and the confusion figure
``localize``        FL methods x settings x budgets, through the one FL runner, into the run store
``evaluate_fl``     interventions, checkpoint-diff and injected-fault benchmarks, statistics, figures
``repair``          the repair sweep (FL method x setting x budget x repetition), tables and statistics
``adequacy``        coverage of the trained model (DeepImportance IDC and the baseline criteria)
==================  ===============================================================================

``context.RunContext`` holds what the steps after training share (the model, its FFN head, the state caches, the
settings and the hashes that make result identities). Nothing here reads argv; scripts decide the run directory.
"""
