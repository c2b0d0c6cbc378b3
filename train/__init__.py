"""Training, evaluation and calibration of the RetinaGate classifier (needs the ``train`` extra).

Modules, in the order data flows through them:

* :mod:`train.datasets`: RFMiD folders and generic CSVs, preprocessed once into an on-disk cache.
* :mod:`train.augment`: augmentation recipes (per sample in loader workers, or batched on the GPU)
  and normalisation with the model card's constants.
* :mod:`train.loader`: the cache as a PyTorch dataset and the reproducible per-epoch loader.
* :mod:`train.model`: the EfficientNet-B0 classifier and the checkpoint format.
* :mod:`train.losses`: BCE, focal and asymmetric losses, automatic positive weights.
* :mod:`train.step`: one AMP optimisation step.
* :mod:`train.loop`: the training job (``retinagate train``) and checkpoint evaluation.
* :mod:`train.metrics`, :mod:`train.calibration`, :mod:`train.cam`, :mod:`train.plots`: what a run
  reports: AUROC, mAP and the RIADD score, per-label thresholds, CAMs and the pointing game, PNGs.
* :mod:`train.cli`: the ``train`` and ``evaluate`` subcommands.
"""
