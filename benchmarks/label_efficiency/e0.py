# E0: supervised from scratch / from a backbone file: val curve
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

steps = int(sys.argv[1])
sched = sys.argv[2]
seed = int(sys.argv[3])
init = sys.argv[4] if len(sys.argv) > 4 else ""
lr = float(os.environ.get("LR", "1e-3"))
m = make_ft("supervised", seed=seed)
if init:
    miss, unexp = m.load_backbone(torch.load(init), strict=False)
tag = f"sup-{sched}-s{seed}-{os.path.basename(init) or 'rand'}-lr{lr}"
c = finetune(m, D["b3"], steps=steps, seed=seed, sched=sched, eval_every=max(steps // 10, 20), log=tag, lr=lr)
print(tag, "CURVE", c)
