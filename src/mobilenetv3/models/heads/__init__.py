"""Dense-prediction heads on our backbone (the paper's §6): LR-ASPP for segmentation."""

from .lraspp import LRASPP, LRASPPHead

__all__ = ["LRASPP", "LRASPPHead"]
