"""ray_jobs.config: validation before Ray starts, YAML inheritance, --set overrides."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs import config as C
from ray_jobs.errors import ConfigError
from ray_jobs.train.worker import epoch_seed, lr_factor

REPO = Path(__file__).resolve().parents[2]


def _registry_ready() -> bool:
    try:
        from localcl.methods import FINETUNE, METHODS  # noqa: F401
    except ImportError:
        return False
    return True


needs_registry = pytest.mark.skipif(not _registry_ready(), reason="localcl.methods registry not available")


def _minimal(**over):
    d = {
        "name": "t",
        "data": {"store": "/nonexistent.zarr", "size": [32, 32]},
        "finetune": {"method": {"name": "supervised"}, "schedule": {"batch_size": 4}},
    }
    return C.deep_merge(d, over)


def test_apply_overrides__values_parsed_as_yaml():
    d = C.apply_overrides(
        {},
        [
            "data.size=[64, 48]",
            "checkpoint.max_failures=3",
            "data.spacing_mm=null",
            "name=abc",
            "logging.tensorboard=false",
        ],
    )
    assert d == {
        "data": {"size": [64, 48], "spacing_mm": None},
        "checkpoint": {"max_failures": 3},
        "name": "abc",
        "logging": {"tensorboard": False},
    }


@pytest.mark.parametrize(
    "item,match",
    [("data.size", "KEY=VALUE"), ("=3", "empty key"), ("a..b=1", "empty key"), ("name.x=1", "not a section")],
)
def test_apply_overrides__malformed_item_names_it(item, match):
    with pytest.raises(ConfigError, match=match):
        C.apply_overrides({"name": "run"}, [item])


def test_deep_merge__nested_merge_and_null_replaces():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": {"k": 1}}
    out = C.deep_merge(base, {"a": {"y": {"w": 3}}, "b": None})
    assert out == {"a": {"x": 1, "y": {"z": 2, "w": 3}}, "b": None}
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "b": {"k": 1}}  # not mutated


@pytest.mark.parametrize(
    "over,key",
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"data": {"lable_budget": 2}}, "data.lable_budget: unknown key"),
        ({"data": {"label_budget": 0}}, "data.label_budget"),
        ({"data": {"size": [8, 8]}}, "data.size"),
        ({"finetune": {"optim": {"lr": -1}}}, "finetune.optim.lr"),
        ({"finetune": {"schedule": {"scheduler": "linear"}}}, "finetune.schedule.scheduler"),
        ({"scaling": {"num_workers": -1}}, "scaling.num_workers"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_validate__bad_structure_names_the_key(over, key):
    with pytest.raises(ConfigError) as exc:
        C.validate(_minimal(**over))
    assert key in str(exc.value)


def test_load_yaml__extends_and_cycle(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ndata: {label_budget: 3, seed: 1}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ndata: {seed: 5}\n")
    assert C.load_yaml(tmp_path / "child.yaml") == {"name": "base", "data": {"label_budget": 3, "seed": 5}}
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        C.load_yaml(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        C.load_yaml(tmp_path / "bad.yaml")


def test_resolve_config_path__unknown_name_lists_shipped():
    with pytest.raises(ConfigError, match="run/demo"):
        C.resolve_config_path("no_such_config")
    assert C.resolve_config_path("demo").name == "demo.yaml"
    assert C.resolve_config_path("glcl", "pretrain").parent.name == "pretrain"


@needs_registry
def test_validate__unknown_method_and_method_key():
    with pytest.raises(ConfigError, match="finetune.method.name: unknown finetune method 'nope'"):
        C.validate(_minimal(finetune={"method": {"name": "nope"}}))
    with pytest.raises(ConfigError, match="finetune.method"):
        C.validate(_minimal(finetune={"method": {"temprature": 0.1}}))


@needs_registry
def test_validate__batch_must_split_over_workers():
    with pytest.raises(ConfigError, match="finetune.schedule.batch_size: 5 is not divisible"):
        C.validate(_minimal(finetune={"schedule": {"batch_size": 5}}))


@needs_registry
def test_validate__decoder_widths_and_input_size_follow_geometry():
    cfg = C.validate(
        _minimal(
            data={"size": [48, 48]},
            pretrain={"method": {"name": "glcl", "widths": [8, 16, 32, 64]}},
            finetune={"method": {"widths": [8, 16, 32]}},
        )
    )
    assert list(cfg.method_config("finetune").decoder_widths) == [16, 8]
    assert list(cfg.method_config("pretrain").decoder_widths) == [32, 16, 8]
    assert cfg.method_config("pretrain").input_size == 48
    # explicit values are kept (and validated by the method's own Config)
    with pytest.raises(ConfigError, match="pretrain.method"):
        C.validate(_minimal(pretrain={"method": {"name": "glcl", "widths": [8, 16, 32], "decoder_widths": [8]}}))


@needs_registry
def test_validate__self_training_only_with_plcl_and_one_round_count():
    with pytest.raises(ConfigError, match="finetune.self_training: only the 'plcl' strategy"):
        C.validate(_minimal(finetune={"self_training": {"rounds": 2}}))
    cfg = C.validate(_minimal(finetune={"method": {"name": "plcl"}, "self_training": {"rounds": 2, "crf": False}}))
    mc = cfg.method_config("finetune")
    assert (mc.rounds, mc.crf) == (2, False)
    with pytest.raises(ConfigError, match="finetune.method.rounds: 3 contradicts"):
        C.validate(_minimal(finetune={"method": {"name": "plcl", "rounds": 3}, "self_training": {"rounds": 2}}))


@needs_registry
@pytest.mark.parametrize("name", ["plcl", "supervised"])
def test_validate__pretrain_method_without_stage_is_rejected(name):
    with pytest.raises(ConfigError, match=f"pretrain.method.name: '{name}' has no pretraining"):
        C.validate(_minimal(pretrain={"method": {"name": name}}))


def test_validate__mlflow_uri_needs_mlflow(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(ConfigError, match="logging.mlflow_uri: .*pip install 'localcl\\[mlflow\\]'"):
        C.validate(_minimal(logging={"mlflow_uri": "sqlite:///x.db"}))


@needs_registry
def test_validate__baseline_true_copies_finetune_backbone_and_schedule():
    cfg = C.validate(_minimal(finetune={"method": {"widths": [4, 8]}, "schedule": {"epochs": 7}}, baseline=True))
    assert cfg.baseline.method.name == "supervised"
    assert list(cfg.method_config("baseline").widths) == [4, 8]
    assert cfg.baseline.schedule.epochs == 7


@needs_registry
@pytest.mark.parametrize(
    "path",
    sorted(p for d in C.STAGE_DIRS for p in (REPO / "ray_jobs" / "configs" / d).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_shipped_config__validates(path):
    cfg = C.load_config(path)
    assert cfg.hash() == C.validate(cfg.to_dict()).hash()  # round-trips through YAML/JSON


@needs_registry
def test_config_hash__ignores_run_dir_and_logging():
    a = C.validate(_minimal())
    b = C.validate(_minimal(run_dir="/elsewhere", logging={"progress": False}))
    c = C.validate(_minimal(data={"seed": 9}))
    assert a.hash() == b.hash() != c.hash()


@needs_registry
def test_config_runtime__parsed_off_by_default_and_not_hashed():
    a = C.validate(_minimal())
    assert (a.runtime.threads, a.runtime.channels_last, a.runtime.compile) == (None, False, False)
    b = C.validate(_minimal(runtime={"threads": 2, "channels_last": True, "compile": True}))
    assert b.runtime.threads == 2 and b.runtime.channels_last and b.runtime.compile
    assert a.hash() == b.hash()
    with pytest.raises(ConfigError, match="runtime"):
        C.validate(_minimal(runtime={"threads": 0}))
    with pytest.raises(ConfigError, match="runtime"):
        C.validate(_minimal(runtime={"channel_last": True}))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS")
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "args,key",
    [
        (("run", "--config", "demo", "--set", "data.size=[8, 8]"), "data.size"),
        (("pretrain", "--config", "demo", "--set", "pretrain.optim.nme=adam"), "pretrain.optim.nme"),
        (("finetune", "--config", "no_such_file.yaml"), "--config"),
    ],
)
def test_cli__bad_config_fails_before_ray_with_one_line(args, key, tmp_path):
    proc = _cli(*args, "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("localcl: error:") and key in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written, no Ray session started


def test_lr_factor__warmup_cosine_poly_endpoints():
    assert lr_factor(0, 100, 10, "constant", 0.0) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "constant", 0.0) == 1.0
    assert lr_factor(0, 100, 0, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(50, 100, 0, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(100, 100, 0, "poly", 0.0) == pytest.approx(0.0)
    t = 0.3
    assert lr_factor(30, 100, 0, "poly", 0.0) == pytest.approx((1 - t) ** 0.9)
    assert lr_factor(30, 100, 0, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)))


def test_epoch_seed__distinct_per_rank_and_epoch_and_stable():
    seeds = {(r, e): epoch_seed(0, r, e) for r in range(2) for e in range(1, 5)}
    assert len(set(seeds.values())) == len(seeds)
    assert epoch_seed(0, 1, 3) == seeds[(1, 3)]
    assert all(0 <= s < 2**31 for s in seeds.values())


def test_scaling_num_workers__int_or_elastic_range_with_clear_errors() -> None:
    validate = C.validate

    base = {"finetune": {"method": {"name": "supervised"}, "schedule": {"batch_size": 4}}}
    cfg = validate({**base, "scaling": {"num_workers": [1, 2], "resize_interval_s": 5}})
    sc = cfg.scaling
    assert (sc.num_workers, sc.min_workers, sc.max_workers, sc.elastic) == ((1, 2), 1, 2, True)
    assert validate({**base, "scaling": {"num_workers": 2}}).scaling.elastic is False
    # fault-tolerance knobs leave the config hash (what is trained) unchanged
    assert validate({**base, "checkpoint": {"every_steps": 5, "on_preemption": True}}).hash() == validate(base).hash()
    for bad, msg in (
        ([2, 1], "1 <= min <= max"),
        ([0, 2], "1 <= min <= max"),
        ([1, 2, 3], "two ints"),
        ("two", "an int >= 0 or a range"),
        (-1, ">= 0"),
    ):
        with pytest.raises(ConfigError, match="scaling.num_workers") as err:
            validate({**base, "scaling": {"num_workers": bad}})
        assert msg in str(err.value)
    with pytest.raises(ConfigError, match="3 workers .*elastic range"):
        validate({**base, "scaling": {"num_workers": [1, 3]}})


def test_scaling_config__elastic_range_maps_to_ray_train_v2() -> None:
    from ray_jobs.train.trainer import scaling_config

    validate = C.validate

    base = {"finetune": {"method": {"name": "supervised"}, "schedule": {"batch_size": 4}}}
    sc = scaling_config(validate({**base, "scaling": {"num_workers": [1, 2], "resize_interval_s": 5}}))
    assert sc.num_workers == (1, 2) and sc.elasticity_enabled
    assert (sc.min_workers, sc.max_workers, sc.elastic_resize_monitor_interval_s) == (1, 2, 5)
    assert scaling_config(validate({**base, "scaling": {"num_workers": 2}})).num_workers == 2
