"""The documentation: the Sphinx site builds with warnings as errors, and every documented
``localcl ... --set KEY=VALUE`` example passes the project's config validation."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

# The project's parser and validators, imported in this one place: ray_jobs' module paths are
# being restructured, so a move is a change to these lines only.
from localcl.methods import FINETUNE, METHODS
from ray_jobs.campaign.spec import Campaign, load_campaign
from ray_jobs.cli import build_parser
from ray_jobs.config import Config as RunConfig
from ray_jobs.config import load_config, overrides_to_tree, resolve_config_path
from ray_jobs.errors import ConfigError
from ray_jobs.study.spec import load_study

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


# --------------------------------------------------------------------------- the site


def test_docs__sphinx_build_has_no_warnings(tmp_path: Path) -> None:
    """``python -m sphinx -W`` from this interpreter (the project's .venv): a broken link,
    reference, docstring or generated table fails the build."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-E",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"sphinx build failed:\n{proc.stdout}\n{proc.stderr}"
    cli = (tmp_path / "html" / "reference" / "cli.html").read_text(encoding="utf-8")
    for verb in ("localcl run", "localcl tune report", "localcl submit", "localcl jobs"):
        assert verb in cli, f"CLI reference lacks {verb!r}"
    config = (tmp_path / "html" / "reference" / "config.html").read_text(encoding="utf-8")
    for key in ("data.label_budget", "finetune.optim.lr", "pretrain.method.tau", "finetune.method.lambda_max"):
        assert key in config, f"config reference lacks {key!r}"


# --------------------------------------------------------------------------- the examples

_COMMAND = re.compile(r"(?:\.venv/bin/)?\blocalcl\s+[a-z][^`\n]*")


def _doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def _examples() -> list[tuple[str, str]]:
    """``(file:line, command)`` for every ``localcl ...`` command line that has ``--set``."""
    out: list[tuple[str, str]] = []
    for path in _doc_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):  # shell continuation
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            for m in _COMMAND.finditer(line):
                cmd = re.split(r"\s#\s|\s{2,}#", m.group(0))[0].strip()
                if "--set" in cmd.split():
                    out.append((f"{path.relative_to(REPO)}:{start + 1}", cmd))
    return out


EXAMPLES = _examples()


def test_docs__examples_found() -> None:
    files = {where.split(":")[0] for where, _ in EXAMPLES}
    assert len(EXAMPLES) >= 15, EXAMPLES
    assert "README.md" in files


def _section_model(tp: Any) -> type[BaseModel] | None:
    for c in typing.get_args(tp) if typing.get_origin(tp) is not None else (tp,):
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _method_fields(section: str) -> set[str]:
    registry = METHODS if section == "pretrain" else FINETUNE
    return {"name"} | {f for cls in registry.values() for f in cls.Config.model_fields}


def _check_key_path(model: type[BaseModel], key: str) -> None:
    """The dotted key exists in the pydantic model (used when the example's file is a placeholder)."""
    parts = key.split(".")
    node: type[BaseModel] | None = model
    for i, part in enumerate(parts):
        assert node is not None, f"{key}: {'.'.join(parts[:i])} is not a section"
        if len(parts) > i + 1 and parts[i] == "method" and i == 1:
            assert parts[i + 1] in _method_fields(parts[0]), f"{key}: no method has {parts[i + 1]!r}"
            return
        fields = node.model_fields
        assert part in fields, f"{key}: unknown key {part!r}; known: {sorted(fields)}"
        ann = fields[part].annotation
        if typing.get_origin(ann) is dict or ann is dict:
            return  # free-form mapping (resources, storage options, stage schedules)
        node = _section_model(ann)
    return


def _validate(cmd: str) -> None:
    argv = shlex.split(cmd)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse prints the reason on stderr
        raise AssertionError(f"not a valid command line: {cmd}") from exc
    overrides: list[str] = list(getattr(args, "overrides", None) or [])
    verb = argv[0]
    job = getattr(args, "job", None) if verb == "submit" else verb
    if job == "tune":
        path = Path(args.config)
        if path.is_file():
            load_campaign(path, overrides=overrides_to_tree(overrides))
        else:  # a placeholder such as CAMPAIGN.yaml
            for kv in overrides:
                _check_key_path(Campaign, kv.split("=", 1)[0])
        return
    if job == "study":
        load_study(args.config, overrides)
        return
    assert job in ("run", "pretrain", "finetune", "demo"), f"no validator for {cmd}"
    stage = "run" if job == "demo" else job
    try:
        resolve_config_path(args.config, stage)
    except ConfigError:  # a placeholder such as my-run.yaml
        for kv in overrides:
            _check_key_path(RunConfig, kv.split("=", 1)[0])
        return
    load_config(args.config, overrides, stage=stage)


@pytest.mark.parametrize("where, cmd", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_docs__set_example_validates(where: str, cmd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # examples name files relative to the repository root
    try:
        _validate(cmd)
    except ConfigError as exc:
        pytest.fail(f"{where}: {cmd}\n  -> {exc}")


def test_docs__key_path_check_rejects_typos() -> None:
    _check_key_path(RunConfig, "pretrain.method.tau")
    _check_key_path(RunConfig, "scaling.resources_per_worker.GPU")
    with pytest.raises(AssertionError, match="temperature"):
        _check_key_path(RunConfig, "pretrain.method.temperature")
    with pytest.raises(AssertionError, match="unknown key"):
        _check_key_path(RunConfig, "data.label_budgets")


def test_docs__wrong_override_is_rejected() -> None:
    """The example the README used to document fails validation (the key is ``tau``)."""
    with pytest.raises(ConfigError, match="temperature"):
        load_config("ideal_cpu", ["pretrain.method.temperature=0.2"], stage="run")


def test_docs__links_stay_in_the_repository() -> None:
    """User docs link only to files inside the repository."""
    link = re.compile(r"\]\(([^)#\s]+)")
    for path in _doc_files():
        for target in link.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(REPO), f"{path.relative_to(REPO)}: link leaves the repository: {target}"
            assert resolved.exists(), f"{path.relative_to(REPO)}: broken link: {target}"


def test_docs__parser_import_is_stable() -> None:
    assert isinstance(build_parser(), argparse.ArgumentParser)
