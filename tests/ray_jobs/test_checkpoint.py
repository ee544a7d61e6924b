"""ray_jobs.train.checkpoint: weights-only export/load of trained networks."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from ray_jobs.errors import UserError
from ray_jobs.train import checkpoint as ck


def _spec(**kw):
    spec = {
        "stage": "finetune",
        "name": "supervised",
        "config": {},
        "in_channels": 1,
        "num_classes": 4,
        "size": [32, 32],
        "spacing_mm": None,
        "label_names": {"0": "background", "1": "RV"},
    }
    spec.update(kw)
    return spec


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


def test_export_model__roundtrip_weights_and_spec(tmp_path):
    net = _Net()
    net.bn.running_mean.fill_(0.25)
    written = ck.export_model(str(tmp_path / "m"), net, _spec())
    assert (tmp_path / "m" / "model.pt").is_file()
    spec = ck.read_spec(str(tmp_path / "m"))
    assert spec == written
    assert spec["format"] == ck.FORMAT_VERSION and len(spec["weights_sha256"]) == 64
    state = ck.load_state(str(tmp_path / "m"), spec["weights_sha256"])
    assert set(state) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)
    assert torch.all(state["bn.running_mean"] == 0.25)


def test_export_model__unwraps_ddp_style_wrapper(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    net = _Net()
    ck.export_model(str(tmp_path), Wrapper(net), _spec())
    state = ck.load_state(str(tmp_path))
    assert set(state) == set(net.state_dict())  # no "module." prefix


def test_export_model__through_fsspec_memory_uri():
    net = _Net()
    ck.export_model("memory://ckpt-test/m", net, _spec())
    spec = ck.read_spec("memory://ckpt-test/m")
    state = ck.load_state("memory://ckpt-test/m", spec["weights_sha256"])
    assert torch.equal(state["conv.weight"], net.conv.weight.detach())


@pytest.mark.parametrize("missing", ck.REQUIRED_SPEC_KEYS)
def test_export_model__rejects_spec_missing_key(tmp_path, missing):
    spec = _spec()
    del spec[missing]
    with pytest.raises(UserError, match=missing):
        ck.export_model(str(tmp_path), _Net(), spec)


def test_export_model__rejects_bad_stage_and_num_classes(tmp_path):
    with pytest.raises(UserError, match="stage"):
        ck.export_model(str(tmp_path), _Net(), _spec(stage="train"))
    with pytest.raises(UserError, match="num_classes"):
        ck.export_model(str(tmp_path), _Net(), _spec(num_classes=0))


def test_load_state__rejects_pickled_object(tmp_path):
    """A model.pt holding an arbitrary object must not be unpickled (weights_only)."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ck.export_model(str(tmp_path), _Net(), _spec())
    with open(tmp_path / "model.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(UserError, match="weights-only"):
        ck.load_state(str(tmp_path))


def test_load_state__detects_changed_file(tmp_path):
    spec = ck.export_model(str(tmp_path), _Net(), _spec())
    other = _Net()
    torch.save(other.state_dict(), tmp_path / "model.pt")
    with pytest.raises(UserError, match="SHA-256"):
        ck.load_state(str(tmp_path), spec["weights_sha256"])


def test_read_spec__errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="model.json"):
        ck.read_spec(str(tmp_path))
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        ck.read_spec(str(tmp_path))
    (tmp_path / "model.json").write_text(json.dumps({**_spec(), "format": 99}))
    with pytest.raises(UserError, match="newer"):
        ck.read_spec(str(tmp_path))


def _methods():
    methods = pytest.importorskip("localcl.methods")
    if not hasattr(methods, "FINETUNE"):
        pytest.skip("localcl.methods.FINETUNE not available yet")
    return methods


def test_load_model__rebuilds_registered_finetune_network(tmp_path):
    methods = _methods()
    FT = methods.FINETUNE["supervised"]
    cfg = FT.Config()
    net = FT(cfg, in_channels=1, num_classes=3)
    for p in net.parameters():
        p.data.normal_()
    spec = _spec(config=cfg.model_dump(mode="json"), num_classes=3)
    ck.export_model(str(tmp_path), net, spec)
    loaded, got = ck.load_model(str(tmp_path))
    assert got["name"] == "supervised" and not loaded.training
    x = torch.rand(2, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.predict(x), net.predict(x), atol=1e-6)


def test_load_model__rejects_weights_of_another_network(tmp_path):
    methods = _methods()
    cfg = methods.FINETUNE["supervised"].Config()
    ck.export_model(str(tmp_path), _Net(), _spec(config=cfg.model_dump(mode="json")))
    with pytest.raises(UserError, match="do not fit"):
        ck.load_model(str(tmp_path))
