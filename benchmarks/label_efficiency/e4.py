# E4: IDEAL pretraining with config kwargs (JSON in KW) -> saved encoder + linear probe vs random
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

from localcl.diagnostics import linear_probe

steps, tag = int(sys.argv[1]), sys.argv[2]
kw = json.loads(os.environ.get("KW", "{}"))
m = make_pre(os.environ.get("METHOD", "ideal"), **kw)
m.set_total_steps(steps)
pretrain(m, steps, tag=tag, sched=os.environ.get("SCHED", "constant"))
path = os.path.join(h.OUT, f"{tag}.pt")
torch.save(m.backbone_state(), path)
lab = h.subset(D["train"], D["b3"])
ft = make_ft("supervised", seed=0)
ft.load_backbone(torch.load(path), strict=False)
pr = linear_probe(
    ft.unet.encoder, lab["image"], lab["label"], VAL["image"], VAL["label"], 4, steps=300, group=VAL["case"]
)
print(tag, "probe", round(pr["dice"], 4), "ce", round(pr["train_ce"], 3), flush=True)
