# E5: do the runtime switches keep the Dice? Fine-tuning at equal steps, fp32 eager vs
# channels_last + bf16 autocast (runtime.channels_last, schedule.amp: bf16), 1 thread.
#   python benchmarks/label_efficiency/e5.py STEPS SEED {supervised|ideal} {fp32|bf16cl}
# supervised: the study's baseline; ideal: the acdc_cpu IDEAL fine-tuning (CPS + CutMix, glcl
# augmentation of the unlabelled slices, lambda_max 1, logit inference) from random init.
# Prints the final val Dice (96x96 grid) and the wall time of the training steps.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

from localcl.runtime import RuntimeOptions, apply_runtime

steps, seed, name, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
kw = dict(cutmix=True, unlabelled_augment="glcl", lambda_max=1.0, inference="logits") if name == "ideal" else {}
m = make_ft(name, seed=seed, **kw)
bf16 = mode == "bf16cl"
if bf16:
    apply_runtime(m, RuntimeOptions(threads=None, channels_last=True, compile=False))
budget = D["b3"]
lab = h.subset(D["train"], budget)
unl = None
if name == "ideal":
    pool = [c for c in D["train"]["cases"] if c.split("_")[0] not in {b.split("_")[0] for b in budget}][:40]
    unl = h.subset(D["train"], pool)
g = torch.Generator().manual_seed(1000 + seed)
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, "cosine"))
t_train = 0.0
for s in range(steps):
    m.train()
    t0 = time.perf_counter()
    i = torch.randint(0, len(lab["image"]), (8,), generator=g)
    bu = None
    if unl is not None:
        j = torch.randint(0, len(unl["image"]), (8,), generator=g)
        bu = {"image": unl["image"][j]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = m.finetune_step({"image": lab["image"][i], "label": lab["label"][i]}, bu, s, steps)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    sch.step()
    t_train += time.perf_counter() - t0
m.eval()
dsc, pc = h.dice_eval(m.predict, VAL)
print("E5", name, mode, f"seed={seed}", f"steps={steps}", f"dice={dsc:.4f}", f"train_s={t_train:.0f}", flush=True)
