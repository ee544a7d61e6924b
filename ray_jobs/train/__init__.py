"""Training: the stage API, the per-worker loop, Ray Train wiring and the training pipeline.

- :mod:`~ray_jobs.train.stage`: :class:`~ray_jobs.train.stage.Plan` (the data, resolved once),
  :class:`~ray_jobs.train.stage.LoopSpec` (the frozen driver-to-worker contract), run-directory
  layout and the stage export helpers;
- :mod:`~ray_jobs.train.worker`: ``train_func(spec)``, run by every Ray Train worker, with
  :mod:`~ray_jobs.train.validation` (validation Dice) and :mod:`~ray_jobs.train.hooks`
  (progress, test hooks);
- :mod:`~ray_jobs.train.trainer`: Ray start-up and one ``TorchTrainer`` fit per stage;
- :mod:`~ray_jobs.train.checkpoint`: exported models (``model.pt`` + ``model.json``);
- :mod:`~ray_jobs.train.pipeline`: pretrain -> fine-tune (-> baseline) -> evaluate;
- :mod:`~ray_jobs.train.self_training`: PLCL's pseudo-label rounds.
"""
