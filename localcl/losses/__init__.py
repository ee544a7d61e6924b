"""Losses of localcl: one module per loss family, each a module class plus a functional form.

Every contrastive loss is built on :func:`localcl.losses.kernel.info_nce`.
One import line per module (keeps parallel additions easy to merge).
"""

from localcl.losses.glcl_global import GLCLGlobalLoss, glcl_global_loss  # noqa: F401
from localcl.losses.glcl_local import GLCLLocalLoss, glcl_local_domain_loss, glcl_local_loss, local_grid  # noqa: F401
from localcl.losses.ideal import (  # noqa: F401
    DenseQueue,
    IDEALDenseLoss,
    bidirectional_consistency,
    consistency_weight,
    ideal_dense_loss,
)
from localcl.losses.kernel import info_nce  # noqa: F401
from localcl.losses.lrc import LRCLoss, felzenszwalb_superpixels, lrc_loss, sample_region_points  # noqa: F401
from localcl.losses.mixcl import MixCLLoss, identity_loss, label_consistency_loss, mixcl_loss, reconstruction_loss  # noqa: F401
from localcl.losses.plcl import PLCLLoss, plcl_loss  # noqa: F401
from localcl.losses.segmentation import CELoss, DiceCELoss, DiceLoss, cross_entropy_loss, dice_ce_loss, dice_loss  # noqa: F401
