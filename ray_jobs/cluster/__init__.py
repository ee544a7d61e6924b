"""Cluster: submission of the CLI's jobs to Ray clusters, the job entry point, a local head.

- :mod:`~ray_jobs.cluster.submit`: ``localcl submit`` / ``jobs`` (Ray Jobs API);
- :mod:`~ray_jobs.cluster.job_entry`: ``python -m ray_jobs.cluster.job_entry JOB`` on the
  cluster (RayJob manifests and submitted jobs);
- :mod:`~ray_jobs.cluster.local_head`: a throw-away local Ray head for tests and demos;
- :mod:`~ray_jobs.cluster.loopback`: a multi-node Ray cluster on one machine, loopback only
  (network namespace), with node kill/drain/add for fault tests.
"""
