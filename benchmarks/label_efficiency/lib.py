import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import h
import torch

from localcl.methods import FINETUNE, METHODS

torch.set_num_threads(int(os.environ.get("NT", "1")))
W = (8, 16, 32, 64)
DW = (32, 16, 8)
D = h.data()
VAL = D["val"]


def lr_factor(s, total, kind, warm=0):
    w = min(1.0, (s + 1) / warm) if warm else 1.0
    t = s / max(total, 1)
    if kind == "cosine":
        return w * 0.5 * (1 + math.cos(math.pi * t))
    return w


def make_ft(name="supervised", seed=0, **kw):
    cls = FINETUNE[name]
    cfg = cls.Config(widths=W, decoder_widths=DW, seed=seed, **kw)
    torch.manual_seed(seed)
    return cls(cfg, 1, 4)


def finetune(
    m,
    budget,
    steps=160,
    seed=0,
    lr=1e-3,
    bs=8,
    ubs=8,
    sched="constant",
    eval_every=40,
    unl=None,
    log=None,
    param_groups=None,
):
    lab = h.subset(D["train"], budget)
    g = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.Adam(param_groups or m.parameters(), lr=lr)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, sched))
    curve = []
    t0 = time.time()
    for s in range(steps):
        m.train()
        i = torch.randint(0, len(lab["image"]), (bs,), generator=g)
        bl = {"image": lab["image"][i], "label": lab["label"][i]}
        bu = None
        if unl is not None:
            j = torch.randint(0, len(unl["image"]), (ubs,), generator=g)
            bu = {"image": unl["image"][j]}
        out = m.finetune_step(bl, bu, s, steps)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sch.step()
        if (s + 1) % eval_every == 0 or s + 1 == steps:
            m.eval()
            dsc, pc = h.dice_eval(m.predict, VAL)
            curve.append((s + 1, round(dsc, 4)))
            if log:
                print(
                    log,
                    s + 1,
                    round(dsc, 4),
                    {k: round(v, 3) for k, v in pc.items()},
                    f"{time.time() - t0:.0f}s",
                    flush=True,
                )
    return curve


def make_pre(name, seed=0, **kw):
    cls = METHODS[name]
    cfg = cls.Config(widths=W, decoder_widths=DW, seed=seed, **kw)
    torch.manual_seed(seed)
    return cls(cfg, 1, 4)


def pretrain(m, steps, bs=8, lr=1e-3, seed=0, log_every=100, tag="", cases=None, sched="constant"):
    pool = D["train"]
    g = torch.Generator().manual_seed(2000 + seed)
    opt = torch.optim.Adam(m.stage_parameters(None), lr=lr)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, sched))
    t0 = time.time()
    run = 0.0
    for s in range(steps):
        m.train()
        i = torch.randint(0, len(pool["image"]), (bs,), generator=g)
        out = m.pretrain_step({"image": pool["image"][i], "label": torch.full_like(pool["label"][i], -1)}, s)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sch.step()
        m.on_after_step()
        run = 0.98 * run + 0.02 * float(out["loss"]) if s else float(out["loss"])
        if (s + 1) % log_every == 0:
            print(tag, "pre", s + 1, round(run, 4), f"{time.time() - t0:.0f}s", flush=True)
    return m


def weight_report(state):
    out = {}
    for k, v in state.items():
        if k.endswith("weight") and v.dim() == 4:
            out[k] = round(float(v.norm()), 3)
    return out
