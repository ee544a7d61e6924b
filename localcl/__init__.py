"""localcl: dense contrastive pretraining and semi-supervised fine-tuning, pure PyTorch.

No Ray, no storage: everything here takes tensors and returns tensors or dicts of tensors.
"""

__version__ = "0.1.0"
