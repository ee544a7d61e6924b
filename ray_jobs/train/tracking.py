"""MLflow tracking of a training stage from rank 0 (``logging.mlflow_uri``)."""

from __future__ import annotations

from typing import Any

from ray_jobs.train.stage import LoopSpec

__all__ = ["setup_mlflow"]


def setup_mlflow(spec: LoopSpec) -> Any:
    """MLflow run of this stage through Ray's integration
    (``ray.air.integrations.mlflow.setup_mlflow``): rank 0 gets the ``mlflow`` module (other
    ranks a no-op), experiment ``cfg.name`` (created if missing), run name ``<stage>[-<method
    stage>][-r<round>]``, the flattened config logged as parameters. A worker-group restart
    opens a new MLflow run (tagged with the same ``ray_run``) whose steps continue the epochs."""
    # deferred: the MLflow integration imports mlflow (the optional ``mlflow`` extra)
    from ray.air.integrations.mlflow import setup_mlflow as ray_setup_mlflow

    cfg, section, mstage = spec.config, spec.section, spec.method_stage
    run = (spec.stage_name or section) + (f"-{mstage}" if mstage and mstage != "main" else "")
    if spec.round:
        run += f"-r{spec.round}"
    flat = _flatten({k: v for k, v in cfg.to_dict().items() if k not in ("logging", "run_dir")})
    return ray_setup_mlflow(
        config=flat,
        tracking_uri=cfg.logging.mlflow_uri,
        experiment_name=cfg.name,
        run_name=run,
        create_experiment_if_not_exists=True,
        tags={"ray_run": run, "config_hash": cfg.hash(), "section": section},
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
