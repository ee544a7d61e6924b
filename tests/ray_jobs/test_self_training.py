"""PLCL pseudo-labelling of a stored case (``ray_jobs.train.self_training.pseudo_label_volume``):
an oracle teacher that returns the reference label on the training grid must give back the
reference exactly for the identity geometry, and exactly the nearest round trip of the
reference (training grid -> native grid, cropped area -> background) with resampling +
cropping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ray_jobs.train.self_training import pseudo_label_name, pseudo_label_volume


class OracleTeacher(nn.Module):
    """``predict`` returns the one-hot of the reference slices, batch after batch, as they were
    preprocessed by the samplers' transform (so the test checks the inverse map only)."""

    def __init__(self, labels_hw: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.labels = labels_hw  # (Z, H, W) int64, -1 = padding
        self.k = num_classes
        self.pos = 0

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        lab = self.labels[self.pos : self.pos + b].clamp_min(0)
        self.pos += b
        return torch.nn.functional.one_hot(lab, self.k).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    import storage
    from storage.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("ph")
    src = make_phantom_dataset(root / "src", n_cases=4, seed=3, shape=(40, 36, 5))
    uri = str(root / "ph.zarr")
    storage.ingest(str(src), uri, progress=False)
    return uri


@pytest.mark.parametrize("size,spacing_mm", [((40, 36), None), ((32, 32), 2.0)])
def test_pseudo_label_volume__oracle_teacher_reproduces_reference_in_crop(phantom_store, size, spacing_mm):
    import storage
    from storage.preprocess import preprocess_slice

    st = storage.open_store(phantom_store)
    case = st.labelled_cases[0]
    meta, ref = st.meta(case), st.label(case).astype(np.int64)
    img = st.image(case)
    it = meta["intensity"]
    grid = torch.stack(
        [
            preprocess_slice(
                img[:, :, z], meta["spacing"], it["p1"], it["p99"], size, spacing_mm, {"label": ref[:, :, z]}
            )["label"]
            for z in range(ref.shape[2])
        ]
    )
    spec = {
        "size": list(size),
        "spacing_mm": spacing_mm,
        "normalisation": {"low_percentile": 1.0, "high_percentile": 99.0},
    }
    teacher = OracleTeacher(grid, 4)
    out = pseudo_label_volume(teacher, spec, st, case, crf=False, crf_kwargs={}, batch_size=2)
    assert out.shape == ref.shape and out.dtype == np.uint8
    assert teacher.pos == ref.shape[2]  # every slice went through the teacher once
    if spacing_mm is None:  # identity geometry: exact
        np.testing.assert_array_equal(out, ref)
    else:  # exactly the nearest round trip of the reference (crop/pad area -> background)
        from storage.preprocess import restore_slice

        back = restore_slice(grid.clamp_min(0), ref.shape[:2], meta["spacing"][:2], spacing_mm, nearest=True)
        np.testing.assert_array_equal(out, back.numpy().transpose(1, 2, 0).astype(np.uint8))
        assert (out == ref).mean() > 0.8 and set(np.unique(out)) <= set(range(4))


def test_pseudo_label_name__carries_round_and_config_hash():
    class Cfg:
        def hash(self) -> str:
            return "0123456789abcdef"

    assert pseudo_label_name(Cfg(), 2) == "pseudo_r2_01234567"
