"""Studies: a grid of methods x label budgets x seeds, run and reported as one experiment.

- :mod:`~ray_jobs.study.spec`: the study file and its validation;
- :mod:`~ray_jobs.study.cells`: one cell's run config and its shared pretraining;
- :mod:`~ray_jobs.study.run`: the driver;
- :mod:`~ray_jobs.study.report`: results tables and plots.
"""
