"""Losses of localcl: one module per loss family, each a module class plus a functional form.

Every contrastive loss is built on :func:`localcl.losses.kernel.info_nce`.
One import line per module (keeps parallel additions easy to merge).
"""
from localcl.losses.kernel import info_nce  # noqa: F401
from localcl.losses.segmentation import CELoss, DiceCELoss, DiceLoss, cross_entropy_loss, dice_ce_loss, dice_loss  # noqa: F401
