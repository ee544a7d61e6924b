"""What ``localcl submit`` costs on top of a bare Ray job, measured in one run on a private head.

Starts a loopback Ray head (:class:`ray_jobs.cluster.local_head.LocalHead`), then times:

- local work before any network call: ``validate_config`` of a run config and of a campaign,
  and ``build_submission`` (validation + self-contained config + metadata);
- packaging the repository as Ray does for ``working_dir`` (content hash + zip, with
  ``DEFAULT_EXCLUDES`` and ``.gitignore``): seconds and MB;
- ``submit_job`` calls: the repository as ``working_dir`` (uploaded the first time, then found
  by content hash), and ``--image-runtime`` (nothing uploaded);
- end to end, submit -> SUCCEEDED, each repeated ``--repeats`` times:
    bare        : Ray SDK, ``python -c pass``, no runtime env (the baseline);
    bare+import : Ray SDK, ``python -c "import torch, localcl, ray"`` (interpreter + imports);
    preflight/image  : ``localcl submit ... --preflight --image-runtime``;
    preflight/wd     : ``localcl submit ... --preflight`` with the repository as working_dir.

Prints seconds (median of repeats) and the ratio to the bare job. Usage:
    .venv/bin/python benchmarks/bench_submit.py [--repeats 2] [--config ray_jobs/configs/run/ideal_cpu.yaml]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray_jobs.cluster import jobs as cluster_jobs  # noqa: E402
from ray_jobs.cluster import submit as cluster_submit  # noqa: E402
from ray_jobs.cluster.local_head import LocalHead  # noqa: E402


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_to_end(client: Any, **submit_kwargs: Any) -> float:
    t0 = time.perf_counter()
    job_id = cluster_jobs.submit_job_retrying(client, **submit_kwargs)
    status = cluster_jobs.wait(client, job_id, timeout=300, poll=0.2)
    if status != "SUCCEEDED":
        raise RuntimeError(f"{job_id} {status}:\n{client.get_job_logs(job_id)[-2000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config", default=str(REPO / "ray_jobs" / "configs" / "run" / "ideal_cpu.yaml"))
    ap.add_argument("--campaign", default=str(REPO / "ray_jobs" / "configs" / "tune" / "ideal.yaml"))
    args = ap.parse_args()

    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} repeats={args.repeats}")
    _, t_val_run = timed(cluster_submit.validate_config, "finetune", args.config)
    _, t_val_tune = timed(cluster_submit.validate_config, "tune", args.campaign)
    wd_sub, t_build = timed(cluster_submit.build_submission, "finetune", args.config, preflight=True)
    img_sub = cluster_submit.build_submission("finetune", args.config, preflight=True, image_runtime=True)
    import logging
    import tempfile
    import zipfile

    from ray._private.runtime_env import packaging

    logging.getLogger(packaging.__name__).setLevel(logging.WARNING)
    wd = wd_sub.runtime_env["working_dir"]
    excludes = list(cluster_submit.DEFAULT_EXCLUDES)
    _, t_hash = timed(packaging.get_uri_for_directory, wd, True, excludes=excludes)
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "pkg.zip"
        _, t_zip = timed(packaging.create_package, wd, zip_path, include_gitignore=True, excludes=excludes)
        size_mb = zip_path.stat().st_size / 2**20
        n_files = len(zipfile.ZipFile(zip_path).namelist())
    print(f"working_dir package: hash {t_hash:.3f} s, zip {t_zip:.3f} s, {size_mb:.2f} MiB, {n_files} entries")
    print(
        f"local: validate run config {t_val_run:.3f} s (first call, imports included), "
        f"campaign {t_val_tune:.3f} s, build_submission {t_build:.3f} s"
    )

    with LocalHead(num_cpus=2) as head:
        client = cluster_jobs.connect(head.address)
        times: dict[str, list[float]] = {k: [] for k in ("bare", "bare+import", "preflight/image", "preflight/wd")}
        run_to_end(client, entrypoint="python -c pass")  # warm-up: job agent registered

        def timed_call(submission: Any) -> float:
            """Seconds of the ``submit_job`` call alone (then waits for the job to end)."""
            kw = submission.submit_kwargs()
            kw["submission_id"] = None
            t0 = time.perf_counter()
            job = cluster_jobs.submit_job_retrying(client, **kw)
            dt = time.perf_counter() - t0
            cluster_jobs.wait(client, job, timeout=300, poll=0.2)
            return dt

        # the first working_dir submission zips and uploads the repo; the second finds it cached
        t_first_call = timed_call(wd_sub)
        t_cached_call = timed_call(wd_sub)
        t_img_call = timed_call(img_sub)
        print(
            f"submit_job call: working_dir first {t_first_call:.3f} s, cached {t_cached_call:.3f} s, "
            f"image runtime {t_img_call:.3f} s"
        )

        # end to end: a fresh submission id per job (None: Ray picks one)
        kw_img = {**img_sub.submit_kwargs(), "submission_id": None}
        kw = {**wd_sub.submit_kwargs(), "submission_id": None}
        for _ in range(args.repeats):
            times["bare"].append(run_to_end(client, entrypoint="python -c pass"))
            times["bare+import"].append(run_to_end(client, entrypoint="python -c 'import torch, localcl, ray'"))
            times["preflight/image"].append(run_to_end(client, **kw_img))
            times["preflight/wd"].append(run_to_end(client, **kw))
    base = statistics.median(times["bare"])
    print(f"{'end to end (submit -> SUCCEEDED)':36s} {'median s':>9s} {'x bare':>7s}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:34s} {med:9.2f} {med / base:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
