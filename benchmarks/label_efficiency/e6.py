# E6: MixCL pretraining with the label budget's slices mixed into every batch, then a linear probe
# and supervised fine-tuning (480 cosine steps) for seeds 0-2, against the same harness baseline.
#   LPB=4 python benchmarks/label_efficiency/e6.py STEPS TAG [SEEDS]
# LPB: labelled slices (from the 3-patient budget) per pretraining batch of 8; 0 = slices drawn
# uniformly from the whole train pool (what the study's sampler does: about 4 % of slices carry
# labels, so L_lab sees a labelled slice in about a third of the batches). KW: MixCL config JSON.
# PSEED: the pretraining seed (weights, views, batch draws; default 0).
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

from localcl.diagnostics import linear_probe

steps, tag = int(sys.argv[1]), sys.argv[2]
seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1,2").split(",")]
lpb = int(os.environ.get("LPB", "0"))
pseed = int(os.environ.get("PSEED", "0"))
kw = json.loads(os.environ.get("KW", "{}"))
budget = D["b3"]
pool = D["train"]
vis = torch.tensor([pool["cases"][int(c)] in set(budget) for c in pool["case"]])
labels = torch.where(vis[:, None, None], pool["label"], torch.full_like(pool["label"], -1))
li = vis.nonzero().flatten()
path = os.path.join(h.OUT, f"{tag}.pt")
if not os.path.exists(path):
    m = make_pre("mixcl", seed=pseed, **kw)
    m.set_total_steps(steps)
    g = torch.Generator().manual_seed(2000 + pseed)
    opt = torch.optim.Adam(m.stage_parameters(None), lr=1e-3)
    t0, run = time.time(), 0.0
    for s in range(steps):
        m.train()
        i = torch.randint(0, len(pool["image"]), (8 - lpb,), generator=g)
        if lpb:
            i = torch.cat([li[torch.randint(0, len(li), (lpb,), generator=g)], i])
        out = m.pretrain_step({"image": pool["image"][i], "label": labels[i]}, s)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.on_after_step()
        run = 0.98 * run + 0.02 * float(out["loss"]) if s else float(out["loss"])
        if (s + 1) % 100 == 0:
            parts = {k: round(float(v), 3) for k, v in out.items()}
            print(tag, "pre", s + 1, round(run, 4), parts, f"{time.time() - t0:.0f}s", flush=True)
    torch.save(m.backbone_state(), path)
lab = h.subset(D["train"], budget)
ft = make_ft("supervised", seed=0)
ft.load_backbone(torch.load(path), strict=False)
pr = linear_probe(
    ft.unet.encoder, lab["image"], lab["label"], VAL["image"], VAL["label"], 4, steps=300, group=VAL["case"]
)
print(tag, "probe", round(pr["dice"], 4), flush=True)
for seed in seeds:
    ft = make_ft("supervised", seed=seed)
    ft.load_backbone(torch.load(path), strict=False)
    curve = finetune(ft, budget, steps=480, seed=seed, sched="cosine", eval_every=480)
    print(tag, "ft", seed, curve[-1][1], flush=True)
