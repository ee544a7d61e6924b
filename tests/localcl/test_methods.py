"""Tests of localcl.methods: registry, configs, method contracts, and a few optimisation steps of
every method / fine-tuning strategy on real ACDC slices in which the loss falls.

"Loss falls" protocol: a copy of the untouched model and the trained model are evaluated on the
same batch with the same view seed (and, for methods with a key queue, the same queue content),
so the comparison isolates what the optimiser changed. Training uses fixed views (the generator is
reseeded every step), i.e. a few steps of plain optimisation of one objective.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from localcl.losses.kernel import check_tau
from localcl.losses.lrc import felzenszwalb_superpixels
from localcl.methods import FINETUNE, METHODS, base, get_finetune, get_method
from localcl.methods.base import FinetuneStrategy, PretrainMethod
from localcl.methods.plcl import REFERENCE_PAIRS, contrastive_pairs, crf_available, pseudo_label

SMALL = {"widths": (8, 16, 16), "decoder_widths": (16, 8)}
EXTRA: dict[str, dict[str, Any]] = {
    "glcl": {"input_size": 48, "local_depth": 1, "volumes_per_batch": 4, "partitions": 2},
    "ideal": {"queue_size": 256},
    "mixcl": {"num_pixels": 256},
    "lrc": {"queue_size": 256, "num_regions": 8, "points_per_region": 4},
}
CASES = ("patient099_frame01", "patient038_frame01", "patient050_frame01", "patient028_frame01")


def _small(name: str, **kw: Any) -> dict[str, Any]:
    return {**SMALL, **EXTRA.get(name, {}), **kw}


# ------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def acdc_batch(acdc_dir: Path) -> dict[str, torch.Tensor]:
    """8 ACDC slices (4 volumes x 2 partitions), 48x48: p1/p99 min-max normalisation, a 128x128
    crop around the heart, down-sampling to 48x48 (area for images, nearest for labels), all 4
    classes present; plus Felzenszwalb super-pixels of each slice."""
    imgs, labs, vols, parts = [], [], [], []
    for v, case in enumerate(CASES):
        im = nib.load(acdc_dir / "imagesTr" / f"{case}.nii.gz").get_fdata().astype(np.float32)
        lb = np.asarray(nib.load(acdc_dir / "labelsTr" / f"{case}.nii.gz").dataobj).astype(np.int64)
        p1, p99 = np.percentile(im, [1, 99])
        im = ((im - p1) / (p99 - p1)).astype(np.float32)
        cx, cy = (int(round(a.mean())) for a in np.nonzero(lb.any(2)))
        x0 = min(max(cx - 64, 0), im.shape[0] - 128)
        y0 = min(max(cy - 64, 0), im.shape[1] - 128)
        zs = [z for z in range(lb.shape[2]) if len(np.unique(lb[:, :, z])) == 4]
        n = len(zs) // 2
        for s in range(2):  # one slice from each half of the all-class slices = 2 partitions
            z = zs[s * n + n // 2]
            a = torch.from_numpy(im[x0 : x0 + 128, y0 : y0 + 128, z].copy())[None, None]
            lab = torch.from_numpy(lb[x0 : x0 + 128, y0 : y0 + 128, z].copy())[None, None].float()
            imgs.append(F.interpolate(a, size=(48, 48), mode="area")[0])
            labs.append(F.interpolate(lab, size=(48, 48), mode="nearest")[0, 0].long())
            vols.append(v)
            parts.append(s)
    batch = {
        "image": torch.stack(imgs),
        "label": torch.stack(labs),
        "volume": torch.tensor(vols),
        "partition": torch.tensor(parts),
    }
    batch["superpixels"] = torch.stack(
        [
            torch.from_numpy(felzenszwalb_superpixels(x[0].numpy(), scale=100, sigma=0.8, min_size=20)).long()
            for x in batch["image"]
        ]
    )
    return batch


def test_acdc_batch__is_real_normalised_data_with_all_classes(acdc_batch: dict[str, torch.Tensor]) -> None:
    assert acdc_batch["image"].shape == (8, 1, 48, 48) and acdc_batch["image"].dtype == torch.float32
    assert all(len(torch.unique(lbl)) == 4 for lbl in acdc_batch["label"])
    assert 0.05 < float(acdc_batch["image"].mean()) < 0.8
    assert all(int(sp.max()) >= 8 for sp in acdc_batch["superpixels"])  # enough regions for K_r = 8


def _queue_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[-1] in ("queue", "ptr", "filled")}


def _pretrain_falls(
    method: PretrainMethod, batch: dict[str, torch.Tensor], stage: str | None, steps: int = 4, lr: float = 3e-3
) -> tuple[float, float]:
    before = copy.deepcopy(method)
    opt = torch.optim.Adam(method.stage_parameters(stage), lr=lr)
    for step in range(steps):
        method.reseed(7)
        out = method.pretrain_step(batch, step, stage)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.on_after_step()
    before.load_state_dict(_queue_state(method), strict=False)
    losses = []
    for m in (before, method):
        m.reseed(7)
        with torch.no_grad():
            losses.append(float(m.pretrain_step(batch, 0, stage)["loss"]))
    return losses[0], losses[1]


# ------------------------------------------------------------------------------ registry


def test_registry__has_exactly_the_issue_keys() -> None:
    assert set(METHODS) == {"ideal", "glcl", "plcl", "mixcl", "lrc", "supervised"}
    assert set(FINETUNE) == {"supervised", "ideal", "plcl"}
    for cls in METHODS.values():
        assert issubclass(cls, PretrainMethod) and cls.default_finetune in FINETUNE
    for ft_cls in FINETUNE.values():
        assert issubclass(ft_cls, FinetuneStrategy)


def test_get_method__unknown_name_lists_valid_names() -> None:
    assert get_method("glcl") is METHODS["glcl"]
    with pytest.raises(ValueError, match=r"unknown method 'simclr'.*'glcl'.*'supervised'"):
        get_method("simclr")
    with pytest.raises(ValueError, match=r"unknown fine-tuning strategy 'mixcl'.*'ideal'.*'plcl'"):
        get_finetune("mixcl")


def test_registry__batch_kinds_and_stages_follow_the_interface() -> None:
    assert METHODS["glcl"].pretrain_batch == "partition" and METHODS["glcl"].stages == ("global", "local")
    assert METHODS["ideal"].pretrain_batch == "slices"
    assert METHODS["mixcl"].pretrain_batch == "slices"
    assert METHODS["lrc"].pretrain_batch == "slices+superpixels"
    for name in ("plcl", "supervised"):
        assert METHODS[name].pretrain_batch is None and METHODS[name].stages == ()
    for name in ("ideal", "mixcl", "lrc"):
        assert len(METHODS[name].stages) == 1


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("registry, name", [(r, n) for r in ("M", "F") for n in (METHODS if r == "M" else FINETUNE)])
def test_config__every_field_has_a_default(registry: str, name: str) -> None:
    cls = (METHODS if registry == "M" else FINETUNE)[name]
    cfg = cls.Config()
    assert cfg.model_dump()  # constructible with no argument
    assert all(not f.is_required() for f in cls.Config.model_fields.values())


@pytest.mark.parametrize("registry, name", [(r, n) for r in ("M", "F") for n in (METHODS if r == "M" else FINETUNE)])
def test_config__json_round_trip_rebuilds_the_same_network(registry: str, name: str) -> None:
    import json

    cls = (METHODS if registry == "M" else FINETUNE)[name]
    cfg = cls.Config(**(_small(name) if registry == "M" else SMALL), seed=3)
    again = cls.Config(**json.loads(json.dumps(cfg.model_dump())))  # model.json stores the config as JSON
    assert again == cfg
    a, b = cls(cfg, 1, 4), cls(again, 1, 4)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_config__spec_defaults() -> None:
    g = METHODS["glcl"].Config()
    assert (g.tau_global, g.tau_local, g.partitions, g.local_depth, g.region_size) == (0.1, 0.1, 4, 3, 3)
    assert (g.global_loss, g.local_loss, g.global_hidden, g.global_dim, g.input_size) == ("D", "R", 1024, 128, 192)
    assert g.widths == (16, 32, 64, 128, 128, 128) and g.decoder_widths == (128, 128, 64, 32, 16)
    assert g.lr == 1e-3 and g.iterations_global == 10001 and g.negatives == "code"
    p = FINETUNE["plcl"].Config()
    assert (p.lambda_lc, p.tau, p.per_class, p.embed_dim, p.rounds) == (0.1, 0.1, 3, 16, 3)
    assert (p.contrast_labelled, p.contrast_unlabelled, p.crf_gaussian_sxy, p.crf_gaussian_weight) == (5, 5, 10.0, 30.0)
    assert (p.crf_bilateral_sxy, p.crf_bilateral_srgb, p.crf_bilateral_weight, p.crf_iterations) == (
        0.01,
        0.5,
        10.0,
        30,
    )
    i = METHODS["ideal"].Config()
    assert (i.tau, i.momentum, i.queue_size, i.lam, i.proj_dim, i.match) == (0.2, 0.999, 16384, 1.0, 128, "argmax")
    m = METHODS["mixcl"].Config()
    assert (m.alpha, m.beta, m.tau, m.num_pixels, m.dims) == (1.0, 1.0, 0.1, 4096, 2)
    lrc = METHODS["lrc"].Config()
    assert (lrc.num_regions, lrc.points_per_region, lrc.tau_local, lrc.lambda_loc) == (16, 8, 0.1, 1.0)
    assert (lrc.superpixel_scale, lrc.superpixel_sigma, lrc.superpixel_min_size, lrc.global_loss) == (
        100.0,
        0.8,
        50,
        "moco",
    )
    s = FINETUNE["supervised"].Config()
    assert (s.loss, s.include_background, s.batch_size, s.val_every) == ("dice", True, 20, 50)


def test_config__unknown_key_names_it_and_lists_valid_keys() -> None:
    with pytest.raises(
        pydantic.ValidationError, match=r"unknown config key\(s\) \['temperature'\].*valid keys.*tau_global"
    ):
        METHODS["glcl"].Config(temperature=0.5)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("glcl", {"tau_global": 0.0}, r"tau_global\s+Input should be greater than 0"),
        ("glcl", {"global_loss": "X"}, r"global_loss[\s\S]*'D', 'D-' or 'R'"),
        ("glcl", {"local_depth": 6}, r"local_depth must be in \[1, 5\]"),
        ("glcl", {"input_size": 100}, "input_size must be divisible by"),
        ("glcl", {"volumes_per_batch": 3}, "volumes_per_batch must be even"),
        ("glcl", {"decoder_widths": (8, 8)}, "decoder_widths must have len"),
        ("glcl", {"norm": "layer"}, r"norm must be one of \['batch', 'instance', 'group', 'none'\]"),
        ("ideal", {"momentum": 1.5}, r"momentum\s+Input should be less than or equal to 1"),
        ("ideal", {"feature_level": 9}, r"feature_level must be in \[1, 6\]"),
        ("ideal", {"match": "nearest"}, r"match[\s\S]*'argmax' or 'geometric'"),
        ("mixcl", {"alpha": -1.0}, r"alpha\s+Input should be greater than or equal to 0"),
        ("mixcl", {"dims": 4}, r"dims[\s\S]*2 or 3"),
        ("lrc", {"num_regions": 0}, r"num_regions\s+Input should be greater than or equal to 1"),
        ("lrc", {"global_loss": "simclr"}, r"global_loss[\s\S]*'moco', 'supervised' or 'none'"),
    ],
)
def test_config__bad_values_name_field_and_allowed_values(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        METHODS[name].Config(**kwargs)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("plcl", {"lambda_lc": -0.1}, r"lambda_lc\s+Input should be greater than or equal to 0"),
        ("plcl", {"per_class": 0}, r"per_class\s+Input should be greater than or equal to 1"),
        ("ideal", {"ramp_fraction": 2.0}, r"ramp_fraction\s+Input should be less than or equal to 1"),
        ("ideal", {"upsample_2": "transposed"}, "upsample_1 and upsample_2 must differ"),
        ("supervised", {"loss": "focal"}, r"loss[\s\S]*'dice' or 'dice_ce'"),
    ],
)
def test_finetune_config__bad_values_name_field(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        FINETUNE[name].Config(**kwargs)


def test_method__rejects_wrong_config_type_and_bad_class_count() -> None:
    with pytest.raises(TypeError, match="needs a GLCLConfig"):
        METHODS["glcl"](METHODS["ideal"].Config(), 1, 4)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        FINETUNE["supervised"](FINETUNE["supervised"].Config(**SMALL), 1, 1)


# ------------------------------------------------------------------------------ contracts


def test_pretrain_step__methods_without_stage_raise_and_name_the_strategy() -> None:
    for name, ft in (("supervised", "supervised"), ("plcl", "plcl")):
        m = METHODS[name](METHODS[name].Config(**SMALL), 1, 4)
        with pytest.raises(RuntimeError, match=rf"no pre-training stage.*FINETUNE\['{ft}'\]"):
            m.pretrain_step({"image": torch.zeros(2, 1, 16, 16)}, 0)
        assert set(m.backbone_state()) and all(k.startswith(("encoder.", "decoder.")) for k in m.backbone_state())


def test_pretrain_step__missing_batch_key_and_unknown_stage_are_named() -> None:
    m = METHODS["glcl"](METHODS["glcl"].Config(**_small("glcl")), 1, 4)
    with pytest.raises(KeyError, match=r"missing key\(s\) \['volume', 'partition'\]"):
        m.pretrain_step({"image": torch.zeros(4, 1, 48, 48)}, 0, "global")
    with pytest.raises(ValueError, match=r"stage must be one of \['global', 'local'\]"):
        m.pretrain_step({"image": torch.zeros(4, 1, 48, 48)}, 0, "decoder")
    with pytest.raises(ValueError, match="input_size 48"):
        m.pretrain_step(
            {"image": torch.zeros(4, 1, 32, 32), "volume": torch.arange(4), "partition": torch.zeros(4)}, 0, "global"
        )


def test_forward__is_the_training_step_for_ddp(acdc_batch: dict[str, torch.Tensor]) -> None:
    m = METHODS["mixcl"](METHODS["mixcl"].Config(**_small("mixcl")), 1, 4)
    half = {k: v[:4] for k, v in acdc_batch.items()}
    m.reseed(3)
    a = m(half, step=0)["loss"]
    m.reseed(3)
    b = m.pretrain_step(half, 0)["loss"]
    torch.testing.assert_close(a, b)
    ft = FINETUNE["supervised"](FINETUNE["supervised"].Config(**SMALL), 1, 4).eval()
    torch.testing.assert_close(ft(acdc_batch["image"]), ft.predict(acdc_batch["image"]))


def test_pretrain_step__same_seed_same_views_same_loss(acdc_batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    m = METHODS["lrc"](METHODS["lrc"].Config(**_small("lrc", global_loss="none")), 1, 4)
    acdc_batch = {k: v[:4] for k, v in acdc_batch.items()}
    outs = []
    for _ in range(2):
        m.reseed(11)
        with torch.no_grad():
            outs.append(m.pretrain_step(acdc_batch, 0)["loss"])
    m.reseed(12)
    with torch.no_grad():
        other = m.pretrain_step(acdc_batch, 0)["loss"]
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], other)


def test_glcl_local_stage__encoder_frozen_including_batchnorm_statistics(acdc_batch: dict[str, torch.Tensor]) -> None:
    m = METHODS["glcl"](METHODS["glcl"].Config(**_small("glcl")), 1, 4)
    enc = copy.deepcopy(m.unet.encoder.state_dict())
    enc_ids = {id(p) for p in m.unet.encoder.parameters()}
    params = m.stage_parameters("local")
    assert not enc_ids & {id(p) for p in params}
    opt = torch.optim.Adam(params, lr=1e-2)
    m.train()
    for step in range(2):
        out = m.pretrain_step(acdc_batch, step, "local")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for k, v in m.unet.encoder.state_dict().items():
        assert torch.equal(v, enc[k]), k  # weights AND running stats untouched
    assert all(p.grad is None for p in m.unet.encoder.parameters())
    assert {id(p) for p in m.stage_parameters("global")} >= enc_ids


def test_glcl_local_stage__trained_encoder_option_updates_encoder_and_its_statistics(
    acdc_batch: dict[str, torch.Tensor],
) -> None:
    m = METHODS["glcl"](METHODS["glcl"].Config(**_small("glcl", local_encoder="trained")), 1, 4)
    enc = copy.deepcopy(m.unet.encoder.state_dict())
    enc_ids = {id(p) for p in m.unet.encoder.parameters()}
    params = m.stage_parameters("local")
    assert enc_ids <= {id(p) for p in params}
    frozen = {id(p) for p in METHODS["glcl"](METHODS["glcl"].Config(**_small("glcl")), 1, 4).stage_parameters("local")}
    assert len(params) == len(frozen) + len(enc_ids)
    opt = torch.optim.Adam(params, lr=1e-2)
    m.train()
    out = m.pretrain_step(acdc_batch, 0, "local")
    opt.zero_grad()
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.unet.encoder.parameters())
    opt.step()
    assert m.unet.encoder.training
    changed = [k for k, v in m.unet.encoder.state_dict().items() if not torch.equal(v, enc[k])]
    assert any(k.endswith("running_mean") for k in changed)
    assert any(k.endswith("weight") for k in changed)


@pytest.mark.parametrize("variant, n_views", [("D", 2), ("D-", 3), ("R", 2)])
def test_glcl_global_variants__embed_the_spec_views(
    variant: str, n_views: int, acdc_batch: dict[str, torch.Tensor]
) -> None:
    m = METHODS["glcl"](METHODS["glcl"].Config(**_small("glcl", global_loss=variant)), 1, 4)
    seen: list[int] = []
    m.g1.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    with torch.no_grad():
        out = m.pretrain_step(acdc_batch, 0, "global")
    assert seen == [n_views * acdc_batch["image"].shape[0]]  # G^D: x + t(x); G^D-: x, t1, t2; G^R: t1, t2
    assert torch.isfinite(out["loss"]) and float(out["loss"]) > 0


def test_glcl_backbone_state__encoder_and_first_l_decoder_blocks_only() -> None:
    m = METHODS["glcl"](METHODS["glcl"].Config(**_small("glcl", local_depth=1)), 1, 4)
    keys = set(m.backbone_state())
    assert any(k.startswith("decoder.blocks.0.") for k in keys)
    assert not any(k.startswith("decoder.blocks.1.") for k in keys)
    assert not any(k.startswith("seg_head.") for k in keys)
    ft = FINETUNE["supervised"](FINETUNE["supervised"].Config(**SMALL), 1, 4)
    fresh_block = copy.deepcopy(ft.unet.decoder.blocks[1].state_dict())
    missing, unexpected = ft.load_backbone(m.backbone_state())
    assert not unexpected and all(k.startswith("decoder.blocks.1.") for k in missing)
    for k, v in ft.unet.decoder.blocks[1].state_dict().items():
        assert torch.equal(v, fresh_block[k])
    torch.testing.assert_close(ft.unet.encoder.levels[0][0][0].weight, m.unet.encoder.levels[0][0][0].weight)


def test_load_backbone__shape_mismatch_and_strict_errors_name_the_entry() -> None:
    ft = FINETUNE["supervised"](FINETUNE["supervised"].Config(**SMALL), 1, 4)
    other = METHODS["supervised"](METHODS["supervised"].Config(widths=(4, 16, 16), decoder_widths=(16, 8)), 1, 4)
    with pytest.raises(
        ValueError, match=r"backbone state entry '(en|de)coder\.[\w.]+' has shape .* the network expects"
    ):
        ft.load_backbone(other.backbone_state())
    with pytest.raises(ValueError, match="missing"):
        ft.load_backbone({}, strict=True)


def test_ideal_on_after_step__ema_update_and_queue_push(acdc_batch: dict[str, torch.Tensor]) -> None:
    m: Any = METHODS["ideal"](METHODS["ideal"].Config(**_small("ideal", momentum=0.9)), 1, 4)
    with torch.no_grad():
        for p in m.unet.encoder.parameters():
            p.add_(1.0)  # query != key
    key0 = [p.clone() for p in m.key_encoder.parameters()]
    m.pretrain_step(acdc_batch, 0)
    filled = int(m.loss_fn.queue.filled)
    m.on_after_step()
    for k0, k1, q in zip(key0, m.key_encoder.parameters(), m.unet.encoder.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q)
        assert not k1.requires_grad
    assert int(m.loss_fn.queue.filled) == filled + acdc_batch["image"].shape[0]
    assert set(m.backbone_state()) == {k for k in m.unet.state_dict() if k.startswith("encoder.")}


def test_ideal_geometric_match__runs_and_differs_from_argmax(acdc_batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    a = METHODS["ideal"](METHODS["ideal"].Config(**_small("ideal", negatives="batch")), 1, 4)
    g = METHODS["ideal"](METHODS["ideal"].Config(**_small("ideal", negatives="batch", match="geometric")), 1, 4)
    g.load_state_dict(a.state_dict())
    a.reseed(0)
    g.reseed(0)
    with torch.no_grad():
        la, lg = a.pretrain_step(acdc_batch, 0)["loss"], g.pretrain_step(acdc_batch, 0)["loss"]
    assert torch.isfinite(lg) and not torch.allclose(la, lg)


def test_ideal_finetune__two_decoders_ramp_and_mean_inference(acdc_batch: dict[str, torch.Tensor]) -> None:
    cfg = FINETUNE["ideal"].Config(**SMALL, lambda_max=0.5, ramp_fraction=0.5)
    ft = FINETUNE["ideal"](cfg, 1, 4)
    assert type(ft.unet.decoder.blocks[0].up[0]).__name__ == "ConvTranspose2d"
    assert ft.decoder2.upsample == "bilinear"
    x = acdc_batch["image"][:4]
    bl = {"image": x, "label": acdc_batch["label"][:4]}
    with torch.no_grad():
        lam = [float(ft.finetune_step(bl, None, s, 100)["lambda_c"]) for s in (0, 25, 50, 99)]
    assert lam[0] == pytest.approx(0.5 * np.exp(-5)) and lam[1] == pytest.approx(0.5 * np.exp(-1.25))
    assert lam[2] == lam[3] == 0.5
    ft.eval()
    l1, l2 = ft.stream_logits(x)
    torch.testing.assert_close(ft.predict(x), 0.5 * (l1.softmax(1) + l2.softmax(1)))
    state = METHODS["ideal"](METHODS["ideal"].Config(**SMALL), 1, 4).backbone_state()
    missing, unexpected = ft.load_backbone({**state, "decoder.blocks.0.up.0.weight": torch.zeros(1)})
    assert not missing and unexpected == ["decoder.blocks.0.up.0.weight"]


# ------------------------------------------------------------------------------ PLCL pieces


def test_plcl_contrastive_pairs__reference_layout_and_truncation() -> None:
    full = contrastive_pairs(5, 5)
    assert full.tolist() == [[0, 10], [1, 16], [2, 12], [3, 18], [4, 19], [5, 15], [5, 16], [7, 17], [7, 18], [8, 19]]
    assert len(REFERENCE_PAIRS) == 10
    part = contrastive_pairs(2, 1)  # L0, L1, U0 available
    assert part.tolist() == [[0, 3], [2, 5]]
    assert contrastive_pairs(0, 0).shape == (0, 2)


def test_pseudo_label__argmax_without_crf_and_shape_errors() -> None:
    probs = torch.rand(2, 3, 8, 8).softmax(1)
    assert torch.equal(pseudo_label(probs, torch.rand(2, 1, 8, 8), crf=False), probs.argmax(1))
    with pytest.raises(ValueError, match="image must have shape"):
        pseudo_label(probs, torch.rand(2, 1, 4, 4), crf=False)
    with pytest.raises(ValueError, match="probs must have shape"):
        pseudo_label(probs[0], torch.rand(1, 8, 8), crf=False)


@pytest.mark.skipif(not crf_available(), reason="pydensecrf2 not installed (argmax fallback is tested above)")
def test_pseudo_label__dense_crf_removes_isolated_noisy_pixels() -> None:
    # reference weights (Gaussian sigma 10 px, w 30): the CRF cleans salt-and-pepper errors of a
    # confident prediction around large structures (a half-plane here)
    lbl = torch.zeros(1, 64, 64, dtype=torch.long)
    lbl[:, :, :32] = 1
    gen = torch.Generator().manual_seed(0)
    flip = torch.rand(1, 64, 64, generator=gen) < 0.05
    p1 = torch.where(lbl == 1, 0.9, 0.1)
    p1 = torch.where(flip, 1 - p1, p1)
    probs = torch.stack([1 - p1, p1], 1)
    noisy = probs.argmax(1)
    out = pseudo_label(probs, lbl[:, None].float(), crf=True)
    assert out.shape == (1, 64, 64) and out.dtype == torch.int64
    assert (out != lbl).sum() < (noisy != lbl).sum() / 4
    # without CRF the errors stay
    assert torch.equal(pseudo_label(probs, lbl[:, None].float(), crf=False), noisy)


def test_plcl_finetune__rounds_and_skip_without_all_class_slices(acdc_batch: dict[str, torch.Tensor]) -> None:
    ft = FINETUNE["plcl"](FINETUNE["plcl"].Config(**SMALL), 1, 4)
    assert ft.start_round() == 1 and ft.pseudo_label_name() == "pseudo_r1"
    assert ft.start_round() == 2 and ft.start_round(3) == 3
    with pytest.raises(ValueError, match=r"round must be in \[1, 3\]"):
        ft.start_round()
    lbl = acdc_batch["label"][:4].clone()
    lbl[lbl == 3] = 0  # no slice has all K classes -> no contrastive pair -> term skipped
    out = ft.finetune_step({"image": acdc_batch["image"][:4], "label": lbl}, None, 0, 1)
    assert float(out["lc_skipped"]) == 1.0 and float(out["lc"]) == 0.0
    torch.testing.assert_close(out["loss"], out["dice"])


# ------------------------------------------------------------------------------ loss falls


@pytest.mark.parametrize("name", ["glcl", "ideal", "mixcl", "lrc"])
def test_pretrain__loss_falls_on_real_acdc_slices(name: str, acdc_batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    cls = METHODS[name]
    m = cls(cls.Config(**_small(name)), 1, 4)
    m.train()
    for stage in cls.stages:
        before, after = _pretrain_falls(m, acdc_batch, stage)
        assert after < before, (name, stage, before, after)


def test_lrc_supervised_global__loss_falls(acdc_batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    m = METHODS["lrc"](METHODS["lrc"].Config(**_small("lrc", global_loss="supervised")), 1, 4)
    before, after = _pretrain_falls(m, acdc_batch, None)
    assert after < before


def test_glcl_local_domain_variant__loss_falls(acdc_batch: dict[str, torch.Tensor]) -> None:
    # L^D needs 2 other volumes per partition: 4 volumes x 2 partitions in the batch
    torch.manual_seed(0)
    m = METHODS["glcl"](METHODS["glcl"].Config(**_small("glcl", local_loss="D")), 1, 4)
    before, after = _pretrain_falls(m, acdc_batch, "local")
    assert after < before


@pytest.mark.parametrize("name", ["mixcl", "lrc"])
def test_pretrain_3d_patches__loss_falls(name: str, acdc_batch: dict[str, torch.Tensor]) -> None:
    # 3D option: stack 4 slices of the batch as a (1, 4, 48, 48) patch per "volume"
    torch.manual_seed(0)
    img = acdc_batch["image"].view(2, 4, 48, 48).unsqueeze(1)
    batch = {
        "image": img,
        "label": acdc_batch["label"].view(2, 4, 48, 48),
        "superpixels": acdc_batch["superpixels"].view(2, 4, 48, 48) + 1000 * torch.arange(4).view(1, 4, 1, 1),
    }
    cls = METHODS[name]
    m = cls(cls.Config(**_small(name, dims=3, widths=(4, 8), decoder_widths=(4,))), 1, 4)
    assert m.unet.dim == 3
    before, after = _pretrain_falls(m, batch, None)
    assert after < before


def _finetune_falls(ft: FinetuneStrategy, bl: dict, bu: dict | None, steps: int = 4) -> tuple[float, float]:
    before = copy.deepcopy(ft)
    opt = torch.optim.Adam(ft.parameters(), lr=3e-3)
    for step in range(steps):
        ft.reseed(5)
        out = ft.finetune_step(bl, bu, step, steps)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    res = []
    for m in (before, ft):
        m.reseed(5)
        with torch.no_grad():
            res.append(float(m.finetune_step(bl, bu, steps, steps)["loss"]))
    return res[0], res[1]


@pytest.mark.parametrize("name", ["supervised", "ideal", "plcl"])
def test_finetune__loss_falls_on_real_acdc_slices(name: str, acdc_batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    cls = FINETUNE[name]
    ft = cls(cls.Config(**SMALL), 1, 4)
    # backbone from a (briefly) pre-trained method, as in the pipeline
    src = METHODS["supervised"](METHODS["supervised"].Config(**SMALL), 1, 4)
    ft.load_backbone(src.backbone_state())
    bl = {"image": acdc_batch["image"][:4], "label": acdc_batch["label"][:4]}
    # unlabelled half: labels hidden; PLCL gets pseudo-labels (here: the hidden ground truth)
    bu = {"image": acdc_batch["image"][4:], "pseudo_label": acdc_batch["label"][4:]}
    before, after = _finetune_falls(ft, bl, bu)
    assert after < before


# ------------------------------------------------------------------------------ hyperparameter types


TEMPERATURE_FIELDS = [
    ("glcl", "tau_global"),
    ("glcl", "tau_local"),
    ("ideal", "tau"),
    ("mixcl", "tau"),
    ("lrc", "tau_local"),
    ("lrc", "tau_global"),
]


@pytest.mark.parametrize("name, field", TEMPERATURE_FIELDS)
@pytest.mark.parametrize("bad", [0.0, -0.1, float("inf"), float("nan")])
def test_temperature__one_rule_finite_and_positive(name: str, field: str, bad: float) -> None:
    """Every temperature is a ``Temperature`` (finite, > 0), the same rule as ``check_tau``."""
    with pytest.raises(pydantic.ValidationError, match=field):
        METHODS[name].Config(**{field: bad})
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        check_tau(bad)


def test_temperature__plcl_finetune_uses_the_same_type() -> None:
    assert FINETUNE["plcl"].Config.model_fields["tau"].metadata == base.BaseMethodConfig.model_fields["lr"].metadata
    with pytest.raises(pydantic.ValidationError, match="tau"):
        FINETUNE["plcl"].Config(tau=float("inf"))


def test_config__no_copied_validators_left() -> None:
    """Hyperparameters are checked by their pydantic types, not per-config ``field_validator``s."""
    assert not hasattr(base, "positive")
    for cls in [*METHODS.values(), *FINETUNE.values()]:
        own = {n for n, d in cls.Config.__pydantic_decorators__.field_validators.items()}
        assert own <= {"_norm"}, (cls.__name__, own)


# ------------------------------------------------------------------------------ method hooks


def test_pretrain_reads_labels__declared_by_the_method() -> None:
    reads = {name: cls.pretrain_reads_labels(cls.Config()) for name, cls in METHODS.items()}
    assert reads == {"ideal": False, "glcl": False, "plcl": False, "mixcl": True, "lrc": False, "supervised": False}
    assert METHODS["lrc"].pretrain_reads_labels(METHODS["lrc"].Config(global_loss="supervised"))


def test_superpixel_params__only_lrc_and_from_its_fields() -> None:
    for name, cls in METHODS.items():
        if name != "lrc":
            assert cls.superpixel_params(cls.Config()) == {}
    cfg = METHODS["lrc"].Config(superpixel_scale=50.0, superpixel_sigma=0.5, superpixel_min_size=20)
    assert METHODS["lrc"].superpixel_params(cfg) == {"scale": 50.0, "sigma": 0.5, "min_size": 20}


def test_finetune_hooks__defaults_and_plcl_overrides() -> None:
    sup = FINETUNE["supervised"](FINETUNE["supervised"].Config(**SMALL), 1, 4)
    sup.on_after_step()  # no-op default
    assert sup.pseudo_label_key == "pseudo_label"
    assert sup.start_round(2) == 2
    plcl = FINETUNE["plcl"](FINETUNE["plcl"].Config(**SMALL, pseudo_label_key="pl"), 1, 4)
    assert plcl.pseudo_label_key == "pl"
    assert plcl.start_round(1) == 1 and int(plcl.st_round) == 1
