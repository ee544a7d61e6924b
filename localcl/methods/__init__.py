"""Method registry: ``METHODS`` (pre-training) and ``FINETUNE`` (fine-tuning strategies).

Plain dicts (solo-learn style), checked at the entry point with :func:`get_method` /
:func:`get_finetune`, which name the valid keys on a typo. Contract: ``docs/interfaces.md`` and
:mod:`localcl.methods.base`.

| name | stages | ``pretrain_batch`` | default fine-tuning | spec |
|---|---|---|---|---|
| ``glcl`` | global, local | partition | supervised (Dice incl. bg) | §1 |
| ``plcl`` | — | None | plcl | §2 |
| ``ideal`` | main | slices | ideal (two-stream) | §3 |
| ``mixcl`` | main | slices (labels, -1 unknown) | supervised (Dice + CE) | §4 |
| ``lrc`` | main | slices+superpixels | supervised (Dice + CE) | §5 |
| ``supervised`` | — | None | supervised | baseline |
"""

from __future__ import annotations

from localcl.methods.base import FinetuneStrategy, PretrainMethod
from localcl.methods.glcl import GLCL
from localcl.methods.ideal import IDEAL, IDEALFinetune
from localcl.methods.lrc import LRC
from localcl.methods.mixcl import MixCL
from localcl.methods.plcl import PLCL, PLCLFinetune
from localcl.methods.supervised import Supervised, SupervisedFinetune

__all__ = ["FINETUNE", "METHODS", "get_finetune", "get_method"]

METHODS: dict[str, type[PretrainMethod]] = {
    "ideal": IDEAL,
    "glcl": GLCL,
    "plcl": PLCL,
    "mixcl": MixCL,
    "lrc": LRC,
    "supervised": Supervised,
}

FINETUNE: dict[str, type[FinetuneStrategy]] = {
    "supervised": SupervisedFinetune,
    "ideal": IDEALFinetune,
    "plcl": PLCLFinetune,
}


def get_method(name: str) -> type[PretrainMethod]:
    """``METHODS[name]``; ``ValueError`` listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    return METHODS[name]


def get_finetune(name: str) -> type[FinetuneStrategy]:
    """``FINETUNE[name]``; ``ValueError`` listing the valid names otherwise."""
    if name not in FINETUNE:
        raise ValueError(f"unknown fine-tuning strategy {name!r}; valid strategies: {sorted(FINETUNE)}")
    return FINETUNE[name]
