"""ray_jobs.train.stage: the LoopSpec contract between the driver and the Ray Train workers."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pydantic
import pytest
import torch

from localcl.methods import FINETUNE, METHODS
from ray_jobs import config as C
from ray_jobs.errors import ConfigError, UserError
from ray_jobs.train import loaders, stage, worker
from ray_jobs.train.stage import Init, LoopSpec, Plan, loop_spec

from evalpredict_helpers import make_phantom_store

REPO = Path(__file__).resolve().parents[2]
SMALL = {"widths": [8, 16, 16]}


def _cfg() -> C.Config:
    return C.validate(
        {
            "name": "t",
            "data": {"store": "/nonexistent.zarr", "size": [32, 32]},
            "pretrain": {"method": {"name": "lrc", **SMALL, "tau_local": 0.2}, "schedule": {"batch_size": 4}},
            "finetune": {"method": {"name": "supervised", **SMALL}, "schedule": {"batch_size": 4}},
        }
    )


def _plan() -> Plan:
    return Plan(
        store="memory://store.zarr",
        num_classes=4,
        label_names={"0": "bg", "1": "a", "2": "b", "3": "c"},
        labelled=["p1"],
        unlabelled=["p2", "p3"],
        pretrain_cases=["p1", "p2", "p3"],
        val=["v1"],
        test=["t1"],
    )


def test_loop_spec__built_once_with_the_validated_objects() -> None:
    cfg, plan = _cfg(), _plan()
    spec = loop_spec(cfg, plan, "finetune", init={"kind": "backbone", "dir": "/runs/x/pretrain/model"})
    assert spec.config is cfg
    assert isinstance(spec.method_cfg, FINETUNE["supervised"].Config)
    assert (spec.method_name, spec.store, spec.num_classes) == ("supervised", plan.store, 4)
    assert spec.labelled == ("p1",) and spec.unlabelled == ("p2", "p3") and spec.val == ("v1",)
    assert spec.use_unlabelled and spec.init == Init(kind="backbone", dir="/runs/x/pretrain/model")
    assert spec.model["config_hash"] == cfg.hash() and spec.model["num_classes"] == 4
    pre = loop_spec(cfg, plan, "pretrain", method_stage=None)
    assert isinstance(pre.method_cfg, METHODS["lrc"].Config) and pre.method_cfg.tau_local == 0.2
    assert pre.val == () and not pre.use_unlabelled
    assert pre.schedule == cfg.schedule_for("pretrain", None)


def test_loop_spec__is_frozen() -> None:
    spec = loop_spec(_cfg(), _plan(), "finetune")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec.store = "s3://elsewhere"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec.init = Init(kind="state", dir="/x")  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        Init(kind="state", dir="/x").dir = "/y"  # type: ignore[misc]


def test_loop_spec__rejects_bad_fields_on_the_driver() -> None:
    cfg, plan = _cfg(), _plan()
    with pytest.raises(pydantic.ValidationError, match="kind"):
        loop_spec(cfg, plan, "finetune", init={"kind": "weights", "dir": "/x"})
    fields = dict(loop_spec(cfg, plan, "finetune"))
    with pytest.raises(pydantic.ValidationError, match="section"):
        LoopSpec(**{**fields, "section": "evaluate"})
    with pytest.raises(pydantic.ValidationError, match="num_classes"):
        LoopSpec(**{**fields, "num_classes": "four"})
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        LoopSpec(**fields, _method_cfg=None)


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)])
def test_loop_spec__round_trips_through_pickle(dumps, loads) -> None:
    """Ray ships the spec to the workers pickled: what arrives equals what the driver built."""
    spec = loop_spec(
        _cfg(),
        _plan(),
        "finetune",
        init={"kind": "state", "dir": "/m"},
        pseudo="pseudo_r1_ab",
        round=1,
        hooks={"events": "/tmp/e"},
    ).model_copy(update={"stage_name": "finetune"})
    back = loads(dumps(spec))
    assert back == spec
    assert type(back.method_cfg) is type(spec.method_cfg) and back.config.hash() == spec.config.hash()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        back.round = 2  # type: ignore[misc]


def test_worker__trusts_the_spec_without_revalidating(monkeypatch) -> None:
    """The worker builds the method from ``spec.method_cfg``: no config validation runs there."""
    spec = pickle.loads(pickle.dumps(loop_spec(_cfg(), _plan(), "pretrain")))

    def boom(*a, **k):
        raise AssertionError("validated again on the worker")

    monkeypatch.setattr(C.Config, "method_config", boom)
    monkeypatch.setattr(C.run, "validate", boom)
    monkeypatch.setattr(METHODS["lrc"].Config, "model_validate", boom)
    method = worker.build_method(spec)
    assert type(method) is METHODS["lrc"] and method.cfg is spec.method_cfg


def test_stage__no_untyped_loop_dict_left() -> None:
    """The driver->worker contract is the LoopSpec: no ``lc`` dict, no ``_method_cfg`` write-back."""
    for path in (REPO / "ray_jobs").rglob("*.py"):
        text = path.read_text()
        assert '"_method_cfg"' not in text and "lc[" not in text, path
    assert stage.LoopSpec.model_config["frozen"] is True


HOUSE_CHECK = next(
    (
        p
        for p in (
            REPO.parent / "shared" / "tools" / "house_check.py",
            REPO.parents[1] / "shared" / "tools" / "house_check.py",
        )
        if p.is_file()
    ),
    None,
)


@pytest.mark.skipif(HOUSE_CHECK is None, reason="../shared/tools/house_check.py not available")
def test_house_check__no_cycles_private_imports_or_long_files() -> None:
    out = subprocess.run([sys.executable, str(HOUSE_CHECK)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_loop_spec__hooks_default_to_the_events_dir_of_the_environment(monkeypatch, tmp_path) -> None:
    """``LOCALCL_EVENTS_DIR`` on the driver gives any CLI run per-stage events files (the node
    fault tests read the steps each worker group trained from them); explicit hooks win."""
    monkeypatch.setenv("LOCALCL_EVENTS_DIR", str(tmp_path))
    assert loop_spec(_cfg(), _plan(), "pretrain").hooks == {"events": str(tmp_path / "pretrain.events")}
    assert loop_spec(_cfg(), _plan(), "pretrain", hooks={}).hooks == {}
    monkeypatch.delenv("LOCALCL_EVENTS_DIR")
    assert loop_spec(_cfg(), _plan(), "finetune").hooks == {}


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_phantom_store(tmp_path_factory.mktemp("phantom"))[1]


def _phantom_plan(store: str) -> Plan:
    """Patient 1 labelled, patients 2 and 3 unlabelled (ED frames), no val/test cases."""
    lab, unl = ["patient001_frame01"], ["patient002_frame01", "patient003_frame01"]
    return Plan(store, 4, {"0": "bg", "1": "a", "2": "b", "3": "c"}, lab, unl, lab + unl, [], [])


@pytest.mark.parametrize("method", [m for m in sorted(METHODS) if METHODS[m].stages])
def test_build_loaders__every_sampler_resamples_to_the_runs_pixel_size(phantom_store: str, method: str) -> None:
    """Pretraining (every batch kind: slices, slices+superpixels, GLCL's partition batches) and
    fine-tuning read slices at ``data.spacing_mm``: a stage at another pixel size would pretrain
    on anatomy of a different scale than it is fine-tuned on (GLCL's partition sampler once did)."""
    store = phantom_store
    extra = {"local_depth": 2, "volumes_per_batch": 2, "input_size": 32} if method == "glcl" else {}
    cfg = C.validate(
        {
            "name": "t",
            "data": {"store": store, "size": [32, 32], "spacing_mm": [2.5, 2.5], "label_budget": 1},
            "pretrain": {"method": {"name": method, **SMALL, **extra}, "schedule": {"batch_size": 8}},
            "finetune": {"method": {"name": "supervised", **SMALL}, "schedule": {"batch_size": 4}},
        }
    )
    plan = _phantom_plan(store)
    stages = METHODS[method].stages
    for section, mstage in [("pretrain", s) for s in stages] + [("finetune", None)]:
        data = loaders.build_loaders(loop_spec(cfg, plan, section, method_stage=mstage), 0, 1)
        sets = [d for d in (data["main"], data["unlabelled"], data.get("labelled")) if d is not None]
        assert sets and all(d.spacing_mm == 2.5 for d in sets), (section, mstage, [type(d) for d in sets])


def test_build_loaders__labelled_per_batch_draws_that_share_from_the_label_budget(phantom_store: str) -> None:
    """MixCL's ``labelled_per_batch``: each worker draws ``labelled_per_batch / W`` slices from
    the label budget (labels visible) and the rest of its ``batch_size / W`` from the pool
    (labels of unlabelled cases hidden); the loop joins the two into one batch."""
    store = phantom_store
    d = {
        "name": "t",
        "data": {"store": store, "size": [32, 32], "label_budget": 1},
        "pretrain": {
            "method": {"name": "mixcl", **SMALL, "labelled_per_batch": 4},
            "schedule": {"batch_size": 8, "steps_per_epoch": 3},
        },
        "finetune": None,
        "scaling": {"num_workers": 2},
    }
    cfg = C.validate(d)
    plan = _phantom_plan(store)
    lab, unl = plan.labelled, plan.unlabelled
    data = loaders.build_loaders(loop_spec(cfg, plan, "pretrain"), 1, 2)
    assert (data["per_worker"], data["per_worker_lab"]) == (2, 2)
    main, labelled = data["main"], data["labelled"]
    main.set_epoch(1)
    labelled.set_epoch(1)
    got_l, got_m = list(iter(labelled)), list(iter(main))
    assert len(got_l) == len(got_m) == 2 * 3  # per worker: its share x steps_per_epoch
    assert all(labelled.cases[int(it["case_index"])] in lab for it in got_l)
    assert all(int(it["label"].min()) >= 0 for it in got_l)  # the budget's labels are visible
    hidden = [it for it in got_m if main.cases[int(it["case_index"])] in unl]
    assert hidden and all(int(it["label"].max()) == -1 for it in hidden)
    joined = loaders.join_batches({"image": torch.zeros(2, 1, 4, 4), "tag": "x"}, {"image": torch.ones(2, 1, 4, 4)})
    assert set(joined) == {"image"} and joined["image"].shape == (4, 1, 4, 4)
    assert float(joined["image"][:2].max()) == 0.0 and float(joined["image"][2:].min()) == 1.0

    with pytest.raises(ConfigError, match="labelled_per_batch: 8 must be below"):
        C.validate({**d, "pretrain": {**d["pretrain"], "method": {"name": "mixcl", **SMALL, "labelled_per_batch": 8}}})
    with pytest.raises(ConfigError, match="labelled_per_batch: 3 is not divisible by 2"):
        C.validate({**d, "pretrain": {**d["pretrain"], "method": {"name": "mixcl", **SMALL, "labelled_per_batch": 3}}})


def test_prepare_data__a_relative_store_path_reaches_the_workers_absolute(phantom_store: str, monkeypatch) -> None:
    # Ray Train workers run in the run's artifacts directory: `--set data.store=runs/x.zarr`
    # must not be opened relative to it (it was: "store not found" from every worker)
    from ray_jobs.train.pipeline import prepare_data

    root = Path(phantom_store).parent
    monkeypatch.chdir(root)
    cfg = C.validate({"name": "t", "data": {"store": Path(phantom_store).name, "size": [32, 32]}})
    plan = prepare_data(cfg, str(root / "run"), log=lambda m: None)
    assert plan.store == phantom_store and Path(plan.store).is_absolute()


def test_prepare_data__label_cases_picks_exactly_those_volumes_and_names_a_bad_one(phantom_store: str) -> None:
    from ray_jobs.train.pipeline import describe_budget, prepare_data

    base = {"name": "t", "data": {"store": phantom_store, "size": [32, 32]}}
    by_patients = prepare_data(C.validate(base), "unused", log=lambda m: None)
    one = by_patients.labelled[0]
    cfg = C.validate({**base, "data": {**base["data"], "label_cases": [one]}})
    plan = prepare_data(cfg, "unused", log=lambda m: None)
    assert plan.labelled == [one]
    # the volume's patient is out of the unlabelled pool (its other frame carries its labels' anatomy)
    assert all(c.split("_")[0] != one.split("_")[0] for c in plan.unlabelled)
    assert describe_budget(cfg, plan.labelled) == "1 labelled volume(s)"
    assert describe_budget(C.validate(base), by_patients.labelled).endswith("labelled patient(s)")
    val_case = plan.val[0]
    bad = C.validate({**base, "data": {**base["data"], "label_cases": [val_case]}})
    with pytest.raises(UserError, match=rf"data.label_cases: \['{val_case}'\] are not labelled cases of split 'train'"):
        prepare_data(bad, "unused", log=lambda m: None)
    with pytest.raises(ConfigError, match="each once"):
        C.validate({**base, "data": {**base["data"], "label_cases": [one, one]}})


@pytest.mark.ray
def test_ensure_superpixels__inside_a_trials_placement_group_computes_in_process(
    phantom_store: str, ray_cluster, tmp_path: Path
) -> None:
    """A Tune trial runs in a placement group whose bundle holds the trial actor only (memory, no
    CPU): a super-pixel task asking for 1 CPU cannot be placed there, and every trial of the
    LRC campaign failed with 'cannot fit into any bundles'. Inside a placement group the maps
    are computed in the caller's process."""
    import shutil

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    import storage
    from ray_jobs.train.pipeline import ensure_superpixels, needs_superpixels

    store = str(tmp_path / "store.zarr")
    shutil.copytree(phantom_store, store)
    cfg = C.validate(
        {
            "name": "t",
            "data": {"store": store, "size": [32, 32], "label_budget": 1},
            "pretrain": {"method": {"name": "lrc", **SMALL}},
            "finetune": {"method": {"name": "supervised", **SMALL}},
        }
    )
    assert needs_superpixels(cfg)
    plan = _phantom_plan(store)
    pg = placement_group([{"memory": 64 * 2**20}])
    ray_cluster.get(pg.ready(), timeout=60)
    try:
        in_trial = ray_cluster.remote(num_cpus=0)(lambda: ensure_superpixels(cfg, plan, log=lambda m: None))
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
        done = ray_cluster.get(in_trial.options(scheduling_strategy=strategy).remote(), timeout=300)
    finally:
        remove_placement_group(pg)
    assert sorted(done) == sorted(plan.pretrain_cases)
    st = storage.open_store(store)
    assert all(st.has_array(c, "superpixels") for c in plan.pretrain_cases)


def test_stop_request__none_outside_the_main_thread_and_then_no_handler() -> None:
    """A stage fitted off the main thread (a Tune trial) gets no stop actor, so its workers do
    no per-step stop collective, and SIGTERM keeps the handler it had."""
    import signal
    import threading

    from ray_jobs.train.stop import StopWatch, new_stop_request, stop_on_sigterm

    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(new_stop_request()))
    t.start()
    t.join()
    assert got == [None]
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm(None, "finetune") as term:
        assert signal.getsignal(signal.SIGTERM) is before and term == {}
    assert not StopWatch(None, rank=0).due(torch.device("cpu"))
