"""Campaigns: hyperparameter searches of the training pipeline with Ray Tune and Optuna.

- :mod:`~ray_jobs.campaign.spec`: the campaign file (:class:`~ray_jobs.campaign.spec.Campaign`,
  search space, objective, scheduler, resources) and its validation;
- :mod:`~ray_jobs.campaign.search`: the Optuna study storage, samplers and the Tune searcher;
- :mod:`~ray_jobs.campaign.no_repeat`: the sampler that never runs a configuration twice;
- :mod:`~ray_jobs.campaign.run`: the driver (resources, resume, trials);
- :mod:`~ray_jobs.campaign.report`: tables and plots of a finished campaign.
"""
