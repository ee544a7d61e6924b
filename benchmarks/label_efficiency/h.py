"""Label-efficiency research harness: ACDC slices at 96x96 / 2.5 mm held in memory, plain loops.

Made for fast ablations of the study's 3-patient cell (docs/results/acdc.md, "Investigation");
the study itself (``localcl study``) is the product path. Needs a store made with
``localcl ingest <ACDC MSD folder> runs/acdc.zarr`` (or ``LOCALCL_ACDC_STORE``). Dice here is
computed on the 96x96 resampled grid per volume, not on the native grid as the study does.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
OUT = os.environ.get("LOCALCL_RESEARCH_OUT", os.path.join(ROOT, "runs", "label_efficiency"))
os.makedirs(OUT, exist_ok=True)
import numpy as np
import torch

import storage
from storage.samplers import SliceDataset

URI = os.environ.get("LOCALCL_ACDC_STORE", os.path.join(ROOT, "runs", "acdc.zarr"))
CACHE = os.path.join(OUT, "data.pt")


def _collect(cases, hide=False):
    ds = SliceDataset(URI, cases, size=(96, 96), spacing_mm=2.5, seed=0, hide_labels=list(cases) if hide else [])
    items = list(iter(ds))
    img = torch.stack([it["image"] for it in items])
    lab = torch.stack([it["label"] for it in items])
    ci = torch.tensor([int(it["case_index"]) for it in items])
    si = torch.tensor([int(it["slice_index"]) for it in items])
    return dict(image=img, label=lab, case=ci, slice=si, cases=list(cases))


def data():
    if os.path.exists(CACHE):
        return torch.load(CACHE)
    st = storage.open_store(URI)
    cat = st.catalog
    d = {}
    train = cat.splits["train"]
    val = cat.splits["val"]
    d["train"] = _collect(train)
    d["val"] = _collect(val)
    for n in (3, 7):
        d[f"b{n}"] = cat.label_budget(n, 0)
    torch.save(d, CACHE)
    return d


def subset(split, cases):
    idx = torch.tensor([i for i in range(len(split["case"])) if split["cases"][int(split["case"][i])] in set(cases)])
    return {k: (v[idx] if torch.is_tensor(v) else v) for k, v in split.items()}


def dice_eval(predict, val, K=4, bs=64):
    """Mean over val volumes of mean fg Dice (classes present in pred or ref), 96x96 grid; per class means too."""
    with torch.no_grad():
        preds = []
        for i in range(0, len(val["image"]), bs):
            preds.append(predict(val["image"][i : i + bs]).argmax(1))
        pred = torch.cat(preds)
    per_case, per_cls = [], {c: [] for c in range(1, K)}
    for c_idx in val["case"].unique():
        m = val["case"] == c_idx
        p, r = pred[m], val["label"][m]
        vals = []
        for c in range(1, K):
            pp, rr = p == c, r == c
            den = int(pp.sum() + rr.sum())
            if den:
                dsc = 2.0 * int((pp & rr).sum()) / den
                vals.append(dsc)
                per_cls[c].append(dsc)
        per_case.append(np.mean(vals) if vals else 1.0)
    return float(np.mean(per_case)), {c: float(np.mean(v)) for c, v in per_cls.items()}
