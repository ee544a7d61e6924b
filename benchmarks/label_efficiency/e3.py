# E3: linear probe + health of pretrained vs random encoder
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

from localcl.diagnostics import encoder_health, linear_probe

lab = h.subset(D["train"], D["b3"])
for name, path in [("random", None)] + [(p, p) for p in sys.argv[1:]]:
    torch.manual_seed(0)
    m = make_ft("supervised", seed=0)
    if path:
        m.load_backbone(torch.load(path), strict=False)
    enc = m.unet.encoder
    pr = linear_probe(enc, lab["image"], lab["label"], VAL["image"], VAL["label"], 4, steps=300, group=VAL["case"])
    hl = encoder_health(enc, lab["image"][:64])
    print(name, "probe", round(pr["dice"], 4), "ce", round(pr["train_ce"], 3), flush=True)
    for r in hl:
        print("  ", r["layer"], {k: round(v, 3) for k, v in r.items() if k != "layer"})
