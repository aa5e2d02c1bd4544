"""Losses shared by the CLIP ZSAD methods (``shared/specs/README.md`` §5).

The official AnomalyCLIP / APRIL-GAN / AdaCLIP / AdaptCLIP code uses one ``loss.py``: a focal loss on probabilities
with a 2-class axis and a binary Dice loss with smooth 1. These are written to match those definitions exactly.
"""

from __future__ import annotations

import torch
from torch import nn

FOCAL_EPS = 1e-5


class FocalLoss(nn.Module):
    """Focal loss on class probabilities (softmax applied by the caller).

    ``p_t = Σ_c onehot_c · p_c + ε`` with the one-hot target clamped to ``[ε/(C−1), 1−ε]``;
    ``loss = mean(−(1 − p_t)^γ · log p_t)`` over every pixel (or sample).

    Args:
        gamma: Focusing parameter (2 in every official repository).
        eps: Smoothing of the one-hot target and of ``p_t``.
    """

    def __init__(self, gamma: float = 2.0, eps: float = FOCAL_EPS) -> None:
        super().__init__()
        self.gamma = gamma
        self.eps = eps

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: probs ``[B, C, ...]`` probabilities; target ``[B, ...]`` or ``[B, 1, ...]`` integer labels."""
        num_classes = probs.shape[1]
        target = target.long()
        if target.dim() == probs.dim():
            target = target.squeeze(1)
        onehot = torch.nn.functional.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
        onehot = onehot.clamp(self.eps / (num_classes - 1), 1.0 - self.eps)
        p_t = (onehot * probs).sum(dim=1) + self.eps
        return (-((1.0 - p_t) ** self.gamma) * p_t.log()).mean()


class BinaryDiceLoss(nn.Module):
    """``1 − mean_b (2 Σ p·g + 1) / (Σ p + Σ g + 1)`` with sums over each sample's pixels."""

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: probs ``[B, H, W]`` foreground probabilities; target ``[B, H, W]`` in {0, 1}."""
        p = probs.reshape(probs.shape[0], -1)
        g = target.reshape(target.shape[0], -1).to(p.dtype)
        dice = (2 * (p * g).sum(1) + self.smooth) / (p.sum(1) + g.sum(1) + self.smooth)
        return 1.0 - dice.mean()


def segmentation_loss(
    abnormal: torch.Tensor,
    mask: torch.Tensor,
    focal: FocalLoss,
    dice: BinaryDiceLoss,
    normal_dice: bool = True,
) -> torch.Tensor:
    """The pixel term every method shares: ``Focal([1−M, M], G) + Dice(M, G) [+ Dice(1−M, 1−G)]``.

    Args:
        abnormal: ``[B, H, W]`` abnormal probability map ``M``.
        mask: ``[B, H, W]`` binary ground truth ``G``.
        focal: The focal loss.
        dice: The Dice loss.
        normal_dice: Add the normal-channel Dice (AnomalyCLIP, AdaptCLIP; APRIL-GAN omits it).
    """
    g = mask.to(abnormal.dtype)
    loss = focal(torch.stack([1.0 - abnormal, abnormal], dim=1), mask) + dice(abnormal, g)
    if normal_dice:
        loss = loss + dice(1.0 - abnormal, 1.0 - g)
    return loss
