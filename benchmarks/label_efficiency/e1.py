# E1: IDEAL pretraining (momentum as given) -> diag + supervised fine-tune from encoder vs random
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import *

mom = float(sys.argv[1])
steps = int(sys.argv[2])
tag = sys.argv[3]
m = make_pre("ideal", momentum=mom)
init_state = {k: v.clone() for k, v in m.backbone_state().items()}
pretrain(m, steps, tag=tag)
bb = m.backbone_state()
torch.save(bb, os.path.join(h.OUT, f"{tag}.pt"))
w0, w1 = weight_report(init_state), weight_report(bb)
for k in w0:
    print(tag, "wnorm", k, w0[k], "->", w1[k])
