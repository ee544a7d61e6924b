"""Entrypoint of jobs submitted with ``localcl submit`` (runs on the Ray cluster).

``python -m ray_jobs.cluster.job_entry JOB [--config FILE [--expand-env]] [--preflight]``

- submitted by ``localcl submit``: reads the self-contained config that
  :func:`ray_jobs.cluster.submit.build_submission` shipped in the runtime-env variable
  ``LOCALCL_SUBMITTED_CONFIG`` (overrides already applied), writes it to a private file;
- started by a KubeRay RayJob (``k8s/``): reads ``--config FILE`` (the ConfigMap mounted at
  ``/etc/localcl/configs``);
- with ``--expand-env`` (either way) ``${VAR}`` references are first substituted from the
  environment on the cluster, so secrets (the PostgreSQL URL of a campaign's Optuna study)
  stay in Kubernetes Secrets, off command lines and out of the job's recorded runtime env;

then runs ``localcl JOB --config FILE`` in this process, so the job executes exactly the CLI
verb a user runs locally. A retried RayJob (``backoffLimit``) re-runs the same command: the
training verbs resume from their run directory by themselves; for ``tune``, ``--auto-resume``
adds ``--resume`` when the campaign's Optuna study already exists.

``--preflight`` validates the shipped config with the same validator and prints what the job
would run on (localcl/torch/Ray versions, CUDA devices, cluster resources), then exits: a
seconds-long check of a cluster before spending GPU hours on it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ray
import torch

import localcl
from ray_jobs.campaign import search as campaign_search
from ray_jobs.campaign import spec as campaign_spec
from ray_jobs.cli import main as cli_main
from ray_jobs.cluster.submit import CONFIG_ENV, CONFIG_NAME_ENV, JOBS, validate_config
from ray_jobs.errors import UserError


def materialise_config(directory: str | os.PathLike[str] | None = None) -> Path:
    """Write the shipped config text to ``directory`` (a fresh temp dir by default); return
    the file path. Raises :class:`UserError` when the job was not started by ``localcl submit``."""
    text = os.environ.get(CONFIG_ENV)
    if text is None:
        raise UserError(f"{CONFIG_ENV} is not set: this entrypoint runs jobs submitted by `localcl submit`")
    name = Path(os.environ.get(CONFIG_NAME_ENV) or "config.yaml").name
    out_dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="localcl-job-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(text, encoding="utf-8")
    return path


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace every ``${NAME}`` in ``text`` by ``environ[NAME]`` (default ``os.environ``).

    Only the braced form is expanded (a bare ``$`` stays as is). A reference to an unset
    variable raises :class:`UserError` naming it.
    """
    env = os.environ if environ is None else environ
    missing = sorted({m.group(1) for m in _VAR.finditer(text) if m.group(1) not in env})
    if missing:
        raise UserError(f"--expand-env: environment variable(s) not set: {', '.join(missing)}")
    return _VAR.sub(lambda m: env[m.group(1)], text)


def config_from_file(path: str | os.PathLike[str], expand: bool) -> Path:
    """``path`` itself, or with ``expand`` a private (0600) expanded copy in a temp dir."""
    src = Path(path)
    if not src.is_file():
        raise UserError(f"--config: no such file: {src}")
    if not expand:
        return src
    out = Path(tempfile.mkdtemp(prefix="localcl-job-")) / src.name
    out.write_text(expand_env(src.read_text(encoding="utf-8")), encoding="utf-8")
    out.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return out


def campaign_started(config: Path) -> bool:
    """Whether the Optuna study of the campaign in ``config`` exists in its storage."""
    campaign = campaign_spec.load_campaign(config)
    return bool(campaign_search.study_exists(campaign_search.open_storage(campaign.storage_url), campaign.name))


def preflight(job: str, config: Path) -> int:
    """Validate ``config`` on the cluster and print the environment; return 0."""
    validate_config(job, config)
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    print(f"localcl preflight: {job} config {config.name} OK (sha256 {digest[:16]})")

    print(f"localcl preflight: localcl from {Path(localcl.__file__).parent}")
    print(f"localcl preflight: python {sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__}")
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(i) for i in range(n_gpu)]
    print(f"localcl preflight: driver CUDA devices: {n_gpu} {names if names else ''}".rstrip())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        try:
            res = {
                k: v
                for k, v in sorted(ray.cluster_resources().items())
                if not k.startswith(("node:", "accelerator_type"))
            }
            print(f"localcl preflight: cluster resources {res}")
        finally:
            ray.shutdown()
    print("localcl preflight: done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.cluster.job_entry")
    parser.add_argument("job", choices=JOBS)
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="config file (default: the one shipped by `localcl submit`)"
    )
    parser.add_argument(
        "--expand-env", action="store_true", help="substitute ${VAR} references in the config from the environment"
    )
    parser.add_argument(
        "--auto-resume", action="store_true", help="tune: pass --resume when the campaign's study already exists"
    )
    parser.add_argument("--preflight", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.config is not None:
            config = config_from_file(args.config, args.expand_env)
        else:
            config = materialise_config()
            if args.expand_env:
                config = config_from_file(config, expand=True)
        if args.preflight:
            return preflight(args.job, config)
        extra = []
        if args.auto_resume:
            if args.job != "tune":
                raise UserError("--auto-resume applies to tune (training verbs resume by themselves)")
            if campaign_started(config):
                print("localcl: campaign study exists: resuming", flush=True)
                extra.append("--resume")
    except UserError as exc:
        print(f"localcl: error: {exc}", file=sys.stderr)
        return 2

    return cli_main([args.job, "--config", str(config), *extra])


if __name__ == "__main__":  # pragma: no cover - exercised through Ray Jobs in the tests
    sys.exit(main())
