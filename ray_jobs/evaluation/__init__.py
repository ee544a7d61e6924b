"""Evaluation: scoring, the distributed evaluation job, inference, plots and the model card.

- :mod:`~ray_jobs.evaluation.scoring`: per-case metrics, summaries and their files;
- :mod:`~ray_jobs.evaluation.job`: ``evaluate_store`` (a Ray Train job) and folder scoring;
- :mod:`~ray_jobs.evaluation.inference`: slice-wise prediction on the native grid;
- :mod:`~ray_jobs.evaluation.plots`: training curves and evaluation figures;
- :mod:`~ray_jobs.evaluation.model_card`: ``model_card.json`` + ``MODEL_CARD.md``.
"""
