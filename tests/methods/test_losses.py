"""The shared focal and Dice losses equal the official definitions written out here."""

from __future__ import annotations

import torch

from zsad.methods.losses import BinaryDiceLoss, FocalLoss, segmentation_loss


def reference_focal(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    # Hsuxu/Loss_ToolBox as used by AnomalyCLIP: one-hot clamped to [eps/(C-1), 1-eps], p_t + eps, mean.
    c = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, c)
    t = target.reshape(-1).long()
    onehot = torch.zeros_like(p).scatter_(1, t[:, None], 1.0).clamp(eps / (c - 1), 1 - eps)
    pt = (onehot * p).sum(1) + eps
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def reference_dice(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for i in range(p.shape[0]):
        total += (2 * (p[i] * g[i]).sum() + 1) / (p[i].sum() + g[i].sum() + 1)
    return 1 - total / p.shape[0]


def test_focal_matches_reference_on_maps_and_scores() -> None:
    torch.manual_seed(0)
    abnormal = torch.rand(3, 5, 5)
    probs = torch.stack([1 - abnormal, abnormal], 1)
    mask = torch.rand(3, 5, 5) > 0.7
    torch.testing.assert_close(FocalLoss()(probs, mask), reference_focal(probs, mask))
    score = torch.rand(4)
    labels = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(FocalLoss()(torch.stack([1 - score, score], 1), labels),
                               reference_focal(torch.stack([1 - score, score], 1), labels))


def test_dice_and_segmentation_loss() -> None:
    torch.manual_seed(1)
    m = torch.rand(2, 6, 6)
    g = (torch.rand(2, 6, 6) > 0.5).float()
    torch.testing.assert_close(BinaryDiceLoss()(m, g), reference_dice(m, g))
    focal, dice = FocalLoss(), BinaryDiceLoss()
    full = segmentation_loss(m, g.bool(), focal, dice)
    expected = reference_focal(torch.stack([1 - m, m], 1), g) + reference_dice(m, g) + reference_dice(1 - m, 1 - g)
    torch.testing.assert_close(full, expected)
    without = segmentation_loss(m, g.bool(), focal, dice, normal_dice=False)
    torch.testing.assert_close(without, expected - reference_dice(1 - m, 1 - g))


def test_perfect_prediction_has_lower_loss() -> None:
    g = torch.zeros(1, 8, 8, dtype=torch.bool)
    g[0, 2:5, 2:5] = True
    perfect = g.float() * 0.99 + 0.005
    wrong = 1 - perfect
    focal, dice = FocalLoss(), BinaryDiceLoss()
    assert segmentation_loss(perfect, g, focal, dice) < 0.1 < segmentation_loss(wrong, g, focal, dice)
