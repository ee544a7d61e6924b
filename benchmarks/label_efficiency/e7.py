# E7: why does GLCL's pretraining not pay off at 1 labelled volume? Fine-tune (the study's
# supervised step, 480 cosine steps, batch 8) from an exported GLCL pretraining, 4 ways:
#   random   fresh U-Net (the baseline)
#   full     GLCL's backbone as the study loads it (encoder + decoder blocks d_1..d_l)
#   rescale  the same, each conv's output channels rescaled to the norms of the fresh init
#            (exact under the BatchNorm that follows every conv; undoes the weight growth of
#            contrastive training, which slows Adam's relative updates of those layers)
#   encoder  the encoder only (d_1..d_l fresh)
#   python benchmarks/label_efficiency/e7.py VARIANT SEEDS [PRETRAINED_MODEL_DIR]
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

from ray_jobs.train.checkpoint import load_model

variant, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
pre_dir = sys.argv[3] if len(sys.argv) > 3 else "runs/study/glcl-1vol/pretrain/glcl-s0/pretrain/model"
budget = os.environ.get("BUDGET", "patient099_frame01").split(",")
steps = int(os.environ.get("STEPS", "480"))


def rescaled(state, fresh):
    out = dict(state)
    for k, v in state.items():
        if v.dim() >= 4 and k.endswith("weight"):
            ref = fresh[k].flatten(1).norm(dim=1)
            cur = v.flatten(1).norm(dim=1).clamp_min(1e-12)
            out[k] = v * (ref / cur).view(-1, *([1] * (v.dim() - 1)))
    return out


for seed in seeds:
    m = make_ft("supervised", seed=seed)
    if variant != "random":
        pre, _ = load_model(pre_dir)
        state = pre.backbone_state()
        if variant == "encoder":
            state = {k: v for k, v in state.items() if k.startswith("encoder.")}
        if variant == "rescale":
            state = rescaled(state, m.unet.state_dict())
        missing, unexpected = m.load_backbone(state)
        assert not unexpected, unexpected
    curve = finetune(m, budget, steps=steps, seed=seed, sched="cosine", eval_every=steps // 4)
    print("E7", variant, seed, curve[-1][1], curve, flush=True)
