"""``localcl submit`` / ``localcl jobs`` against a real Ray head started on 127.0.0.1.

The head is this module's own :class:`ray_jobs.cluster.local_head.LocalHead` (``ray start --head``
with a private ``--temp-dir`` and free ports), so it never collides with the session's
``ray_cluster`` fixture or another test process; teardown ends exactly the processes it started
(the ``ray start`` process and its descendants, plus any orphan whose command line names the
private temp dir), never ``ray stop``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ray_jobs import cli
from ray_jobs.cluster import job_entry
from ray_jobs.cluster import jobs as cluster_jobs
from ray_jobs.cluster import submit as cluster_submit
from ray_jobs.cluster.local_head import LocalHead, free_port
from ray_jobs.config import overrides_to_tree
from ray_jobs.errors import UserError

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _write_run_config(directory: Path, **over: object) -> Path:
    """A small, valid run config (fine-tune only, 1 epoch) written to ``directory``."""
    data: dict = {
        "name": "submit-test",
        "run_dir": str(directory / "runs" / "submit-test"),
        "data": {"store": str(directory / "store.zarr"), "label_budget": 1, "size": [32, 32]},
        "pretrain": None,
        "finetune": {
            "method": {"name": "supervised"},
            "schedule": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2},
        },
        "scaling": {"num_workers": 0},
    }
    data.update(over)
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ray_head():
    """A private ``ray start --head`` on 127.0.0.1 (free ports); yields the dashboard URL."""
    with LocalHead(num_cpus=2) as head:
        yield head.address


# --------------------------------------------------------------------------- against a real head


@pytest.mark.timeout(180)
def test_submit__preflight_job_runs_and_jobs_reads_status_and_logs(ray_head, tmp_path, capsys):
    cfg = _write_run_config(tmp_path)
    code, out, err = _run_cli(
        capsys,
        "submit",
        "finetune",
        "--config",
        str(cfg),
        "--address",
        ray_head,
        "--set",
        "finetune.optim.lr=0.005",
        "--metadata",
        "team=cardiac",
        "--preflight",
        "--follow",
    )
    assert code == 0, err
    job_id = out.strip().splitlines()[0]
    assert job_id.startswith("localcl-finetune-")
    assert "localcl preflight: done" in out  # --follow streamed the driver's output
    assert f"{job_id} SUCCEEDED" in err

    code, out, err = _run_cli(capsys, "jobs", "status", job_id, "--address", ray_head, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["status"] == "SUCCEEDED"
    assert status["metadata"]["team"] == "cardiac"
    assert status["metadata"]["localcl.job"] == "finetune"
    assert status["metadata"]["localcl.overrides"] == "finetune.optim.lr=0.005"
    assert status["entrypoint"] == "python -m ray_jobs.cluster.job_entry finetune --preflight"

    code, logs, err = _run_cli(capsys, "jobs", "logs", job_id, "--address", ray_head)
    assert code == 0, err
    # The job re-validated the shipped config on the cluster, imported the uploaded code
    # and reached the cluster through RAY_ADDRESS.
    assert "localcl preflight: finetune config tiny.yaml OK" in logs
    assert "localcl preflight: localcl from" in logs and "/_ray_pkg_" in logs
    assert "'CPU': 2.0" in logs
    assert "localcl preflight: done" in logs

    code, table, err = _run_cli(capsys, "jobs", "list", "--address", ray_head)
    assert code == 0, err
    row = next(line for line in table.splitlines() if line.startswith(job_id))
    assert row.split()[1:3] == ["SUCCEEDED", "finetune"]


@pytest.mark.timeout(120)
def test_jobs__stop_running_job(ray_head, capsys):
    from ray.job_submission import JobSubmissionClient

    # A plain long job submitted with Ray's own client: `localcl jobs` manages any job.
    job_id = cluster_jobs.submit_job_retrying(
        JobSubmissionClient(ray_head),
        entrypoint="python -c 'import time; print(\"sleeping\", flush=True); time.sleep(120)'",
    )
    cluster_jobs.wait_for(JobSubmissionClient(ray_head), job_id, {"RUNNING"}, timeout=60)
    code, out, err = _run_cli(capsys, "jobs", "stop", job_id, "--address", ray_head, "--wait", "--timeout", "60")
    assert code == 0, err
    assert out.strip().splitlines() == [f"{job_id}: stop requested", f"{job_id}: STOPPED"]
    code, out, err = _run_cli(capsys, "jobs", "stop", job_id, "--address", ray_head)
    assert code == 0 and out.strip() == f"{job_id}: not running (STOPPED)"


@pytest.mark.timeout(60)
def test_jobs__unknown_id_is_a_one_line_error(ray_head, capsys):
    for action in ("status", "logs", "stop"):
        code, out, err = _run_cli(capsys, "jobs", action, "localcl-nope-123", "--address", ray_head)
        assert code == 2
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "no job with id 'localcl-nope-123'" in err


# --------------------------------------------------------------------------- no cluster needed


def test_submit__unreachable_address_is_a_one_line_error(tmp_path, capsys):
    cfg = _write_run_config(tmp_path)
    port = free_port()  # bound then released: nothing listens there
    code, out, err = _run_cli(
        capsys, "submit", "finetune", "--config", str(cfg), "--address", f"http://127.0.0.1:{port}"
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in err
    code, out, err = _run_cli(capsys, "jobs", "list", "--address", f"http://127.0.0.1:{port}")
    assert code == 2 and "cannot reach" in err


def test_submit__invalid_config_rejected_before_contacting_the_cluster(tmp_path, capsys, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("connect() must not be called for an invalid config")

    monkeypatch.setattr(cluster_jobs, "connect", no_network)
    cfg = _write_run_config(tmp_path, finetune={"method": {"name": "supervised"}, "schedule": {"epochs": 0}})
    code, out, err = _run_cli(capsys, "submit", "finetune", "--config", str(cfg), "--address", "http://127.0.0.1:9")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "epochs" in err

    cfg = _write_run_config(tmp_path)
    code, out, err = _run_cli(
        capsys,
        "submit",
        "finetune",
        "--config",
        str(cfg),
        "--address",
        "http://127.0.0.1:9",
        "--set",
        "finetune.optim.lr=-1",
    )
    assert code == 2 and "lr" in err

    code, out, err = _run_cli(
        capsys, "submit", "pretrain", "--config", str(tmp_path / "missing.yaml"), "--address", "http://127.0.0.1:9"
    )
    assert code == 2 and "missing" in err


def test_submit__bad_options_name_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster_jobs, "connect", lambda *a, **k: pytest.fail("must fail before connecting"))
    cfg = str(_write_run_config(tmp_path))
    cases = [
        (["--metadata", "novalue"], "--metadata: expected KEY=VALUE"),
        (["--env", "1BAD=x"], "--env: invalid variable name"),
        (["--entrypoint-num-gpus", "-1"], "--entrypoint-num-gpus must be >= 0"),
        (["--working-dir", str(tmp_path / "nope")], "--working-dir: not a directory"),
    ]
    for extra, message in cases:
        code, _, err = _run_cli(
            capsys, "submit", "finetune", "--config", cfg, "--address", "http://127.0.0.1:9", *extra
        )
        assert code == 2 and message in err, (extra, err)


def test_resolve_address__validates_scheme_and_falls_back_to_env(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="--address is required"):
        cluster_jobs.resolve_address(None)
    with pytest.raises(UserError, match="expected http://HOST:PORT"):
        cluster_jobs.resolve_address("127.0.0.1:8265")
    with pytest.raises(UserError, match="bad port"):
        cluster_jobs.resolve_address("http://127.0.0.1:99999")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a Jobs URL
    with pytest.raises(UserError, match="--address is required"):
        cluster_jobs.resolve_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.1.2.3:8265/")
    assert cluster_jobs.resolve_address(None) == "http://10.1.2.3:8265"


def test_build_submission__working_dir_excludes_env_and_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = _write_run_config(tmp_path)
    s = cluster_submit.build_submission(
        "finetune",
        cfg,
        ["finetune.optim.lr=0.01"],
        entrypoint_num_cpus=1,
        entrypoint_num_gpus=0.5,
        metadata={"owner": "me"},
        env={"AWS_REGION": "eu-west-1"},
    )
    assert s.runtime_env["working_dir"] == str(REPO)
    for excluded in (".venv/", ".git/", "runs/"):
        assert excluded in s.runtime_env["excludes"]
    env = s.runtime_env["env_vars"]
    assert env["RAY_AUTH_MODE"] == "disabled" and env["AWS_REGION"] == "eu-west-1"
    assert env[cluster_submit.CONFIG_NAME_ENV] == "tiny.yaml"
    # jobs stop: Ray waits this long after its SIGTERM, for the stop checkpoint (train/stop.py)
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == str(cluster_submit.JOB_STOP_WAIT_S) == "60"
    shipped = yaml.safe_load(env[cluster_submit.CONFIG_ENV])
    assert shipped["finetune"]["optim"]["lr"] == 0.01  # the override is baked in
    assert s.metadata["owner"] == "me" and s.metadata["localcl.job"] == "finetune"
    kw = s.submit_kwargs()
    assert kw["entrypoint_num_cpus"] == 1 and kw["entrypoint_num_gpus"] == 0.5
    assert kw["entrypoint"] == "python -m ray_jobs.cluster.job_entry finetune"
    assert all(isinstance(v, str) for v in kw["metadata"].values())

    assert s.metadata["localcl.git_sha"]  # `git describe --dirty` of the uploaded checkout
    img = cluster_submit.build_submission("finetune", cfg, image_runtime=True)
    assert "working_dir" not in img.runtime_env and "excludes" not in img.runtime_env
    assert "localcl.git_sha" not in img.metadata  # the image's code is not this checkout
    with pytest.raises(UserError, match="mutually exclusive"):
        cluster_submit.build_submission("finetune", cfg, image_runtime=True, working_dir=tmp_path)
    with pytest.raises(UserError, match="unknown job 'train'"):
        cluster_submit.build_submission("train", cfg)


def test_portable_config_text__extends_chain_ships_self_contained(tmp_path):
    base = _write_run_config(tmp_path)
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    child = child_dir / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "../tiny.yaml", "name": "child-run"}))
    validated, path = cluster_submit.validate_config("finetune", child, ["data.seed=3"])
    text = cluster_submit.portable_config_text(validated, path)
    assert "extends" not in yaml.safe_load(text)
    # Written alone somewhere else (as on the cluster), it validates to the same config.
    alone = tmp_path / "elsewhere" / "child.yaml"
    alone.parent.mkdir()
    alone.write_text(text)
    again = cluster_submit.load_run_config(alone)
    assert again.to_dict() == validated.to_dict()
    assert again.name == "child-run" and again.data.seed == 3
    assert base.is_file()


def test_overrides_to_tree__nested_and_errors():
    assert overrides_to_tree(["a.b=1", "a.c=[2, 3]", "d=x"]) == {"a": {"b": 1, "c": [2, 3]}, "d": "x"}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        overrides_to_tree(["a.b"])
    with pytest.raises(UserError, match="not a section"):
        overrides_to_tree(["a=1", "a.b=2"])


def test_job_entry__materialises_shipped_config_and_refuses_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster_submit.CONFIG_ENV, "name: x\n")
    monkeypatch.setenv(cluster_submit.CONFIG_NAME_ENV, "../../evil.yaml")  # only the base name is used
    path = job_entry.materialise_config(tmp_path)
    assert path == tmp_path / "evil.yaml" and path.read_text() == "name: x\n"
    monkeypatch.delenv(cluster_submit.CONFIG_ENV)
    with pytest.raises(UserError, match="LOCALCL_SUBMITTED_CONFIG is not set"):
        job_entry.materialise_config(tmp_path)
    assert job_entry.main(["finetune"]) == 2


def test_format_table__aligns_columns():
    rows = [
        cluster_jobs.JobRow("localcl-run-1", "RUNNING", "run", "2026-01-01 00:00:00", "0:00:05", "python -m x"),
        cluster_jobs.JobRow("raysubmit_abc", "SUCCEEDED", "-", "-", "-", "echo hi"),
    ]
    lines = cluster_jobs.format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["SUBMISSION_ID", "STATUS"]
    starts = {line.index(tok) for line, tok in zip(lines[1:], ["RUNNING", "SUCCEEDED"])}
    assert len(starts) == 1  # STATUS column aligned


def test_job_entry__expand_env_substitutes_braced_vars_and_names_missing_ones():
    env = {"OPTUNA_STORAGE": "postgresql://u:p&q@db:5432/optuna", "X": "1"}
    assert job_entry.expand_env("storage: ${OPTUNA_STORAGE}\nprice: $5 ${X}\n", env) == (
        "storage: postgresql://u:p&q@db:5432/optuna\nprice: $5 1\n"
    )
    with pytest.raises(UserError, match="not set: A, B"):
        job_entry.expand_env("${B} ${A} ${X}", env)


def test_job_entry__config_file_expanded_copy_is_private(tmp_path, monkeypatch):
    src = tmp_path / "campaign.yaml"
    src.write_text("storage: ${DB_URL}\n")
    monkeypatch.setenv("DB_URL", "sqlite:///x.db")
    assert job_entry.config_from_file(src, expand=False) == src
    out = job_entry.config_from_file(src, expand=True)
    assert out != src and out.read_text() == "storage: sqlite:///x.db\n"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(UserError, match="--config: no such file"):
        job_entry.config_from_file(tmp_path / "nope.yaml", expand=True)
    monkeypatch.delenv(cluster_submit.CONFIG_ENV, raising=False)
    assert job_entry.main(["finetune", "--expand-env"]) == 2  # nothing shipped, no --config
    assert job_entry.main(["finetune", "--config", str(src), "--auto-resume"]) == 2


def test_job_entry__auto_resume_detects_an_existing_campaign_study(tmp_path):
    import optuna

    text = (REPO / "k8s" / "overlays" / "cpu-local" / "configs" / "campaign-ideal.yaml").read_text()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = tmp_path / "campaign.yaml"
    path.write_text(job_entry.expand_env(text, {"OPTUNA_STORAGE": url}))
    assert job_entry.campaign_started(path) is False
    name = yaml.safe_load(text)["name"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name=name, storage=url)
    assert job_entry.campaign_started(path) is True


def test_portable_config_text__campaign_inlines_base_config(tmp_path):
    campaign, path = cluster_submit.validate_config(
        "tune", REPO / "ray_jobs" / "configs" / "tune" / "ideal.yaml", ["trials=3"]
    )
    shipped = yaml.safe_load(cluster_submit.portable_config_text(campaign, path))
    assert shipped["base_config"] is None and shipped["trials"] == 3
    assert shipped["base"] == campaign.resolved_base()
    alone = tmp_path / "ideal.yaml"  # no ../run/ideal.yaml beside it, as on the cluster
    alone.write_text(yaml.safe_dump(shipped))
    again, _ = cluster_submit.validate_config("tune", alone)
    assert again.signature() == campaign.signature()
    with pytest.raises(UserError, match="no such campaign file"):
        cluster_submit.validate_config("tune", tmp_path / "nope.yaml")


def test_submit_job_retrying__retries_only_while_no_agent_is_available(monkeypatch):
    monkeypatch.setattr(cluster_jobs.time, "sleep", lambda s: None)

    class Client:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def submit_job(self, **kw):
            self.calls += 1
            if self.errors:
                raise RuntimeError(self.errors.pop(0))
            return kw["entrypoint"]

    busy = "Request failed with status code 500: No available agent to submit job, please try again later.."
    c = Client([busy, busy])
    assert cluster_jobs.submit_job_retrying(c, entrypoint="echo") == "echo" and c.calls == 3
    c = Client(["Request failed with status code 400: bad runtime_env"])
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        cluster_jobs.submit_job_retrying(c, entrypoint="echo")
    assert c.calls == 1
    c = Client([busy] * 5)
    with pytest.raises(RuntimeError, match="No available agent"):
        cluster_jobs.submit_job_retrying(c, retry_for=0.0, entrypoint="echo")


def test_job_entry__expands_a_shipped_config_on_the_cluster(tmp_path, monkeypatch, capsys):
    cfg = _write_run_config(tmp_path, run_dir="${RUNS_ROOT}/submit-test")
    s = cluster_submit.build_submission("finetune", cfg, expand_env=True, preflight=True)
    assert s.entrypoint == "python -m ray_jobs.cluster.job_entry finetune --expand-env --preflight"
    shipped = s.runtime_env["env_vars"][cluster_submit.CONFIG_ENV]
    assert "${RUNS_ROOT}" in shipped  # the value never leaves the cluster
    monkeypatch.setenv(cluster_submit.CONFIG_ENV, shipped)
    monkeypatch.setenv(cluster_submit.CONFIG_NAME_ENV, "tiny.yaml")
    monkeypatch.delenv("RUNS_ROOT", raising=False)
    assert job_entry.main(["finetune", "--expand-env", "--preflight"]) == 2
    assert "not set: RUNS_ROOT" in capsys.readouterr().err
