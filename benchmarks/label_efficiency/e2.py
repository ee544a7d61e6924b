# E2: IDEAL two-stream fine-tuning variants; logs Dice of stream1, stream2, prob-mean, logit-mean
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

steps = int(sys.argv[1])
seed = int(sys.argv[2])
init = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else ""
kw = json.loads(os.environ.get("KW", "{}"))
lr = float(os.environ.get("LR", "1e-3"))
sched = os.environ.get("SCHED", "cosine")
m = make_ft("ideal", seed=seed, **kw)
if init:
    m.load_backbone(torch.load(init), strict=False)
st = h.data()
budget = D["b3"]
pool = [c for c in D["train"]["cases"] if c.split("_")[0] not in {b.split("_")[0] for b in budget}]
pool = pool[:40]
unl = h.subset(D["train"], pool)
tag = os.environ.get("TAG", "ideal") + f"-s{seed}"
lab = h.subset(D["train"], budget)
g = torch.Generator().manual_seed(1000 + seed)
opt = torch.optim.Adam(m.parameters(), lr=lr)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, sched))
t0 = time.time()
ev = max(steps // 8, 20)
for s in range(steps):
    m.train()
    i = torch.randint(0, len(lab["image"]), (8,), generator=g)
    j = torch.randint(0, len(unl["image"]), (8,), generator=g)
    out = m.finetune_step({"image": lab["image"][i], "label": lab["label"][i]}, {"image": unl["image"][j]}, s, steps)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    sch.step()
    if (s + 1) % ev == 0 or s + 1 == steps:
        m.eval()
        r = {}
        with torch.no_grad():
            r["s1"] = h.dice_eval(lambda x: m.stream_logits(x)[0], VAL)[0]
            r["s2"] = h.dice_eval(lambda x: m.stream_logits(x)[1], VAL)[0]
            r["pmean"] = h.dice_eval(lambda x: sum(torch.softmax(l, 1) for l in m.stream_logits(x)), VAL)[0]
            r["lmean"] = h.dice_eval(lambda x: sum(m.stream_logits(x)), VAL)[0]
        print(
            tag,
            s + 1,
            {k: round(v, 4) for k, v in r.items()},
            {k: round(float(v), 3) for k, v in out.items()},
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
