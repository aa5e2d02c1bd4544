"""MSFlow (Zhou et al., TNNLS 2024) in plain PyTorch: multi-scale CNN features, parallel flows, a fusion flow.

Spec ``shared/specs/baselines.md`` §5; official code cool-xuan/msflow (``models/flow_models.py``,
``models/freia_utils.py``, ``train.py``, ``post_process.py``). The flows are built from FrEIA (``SequenceINN``,
``PermuteRandom``, ``InvertibleModule``) and anomalib's :class:`~anomalib.models.components.flow.AllInOneBlock` (a
copy of FrEIA's, which the official code uses); besides ``InferenceBatch`` these are the only non-PyTorch imports.

Pipeline of one image (input ``S x S``, ImageNet-normalised):

1. A frozen ImageNet ResNet gives the outputs of ``layer1``, ``layer2``, ``layer3`` (strides 4, 8, 16), each
   average-pooled (3x3, stride 2, padding 1).
2. **Parallel flows**: per scale a conditional normalising flow of ``n`` all-in-one blocks (2, 5, 8), conditioned on
   a 2-D sine/cosine positional encoding (64 channels), maps features ``h_s`` to ``z_s``.
3. **Fusion flow**: a random channel permutation per scale, then one coupling layer whose subnets mix all scales
   (pooled to the coarsest, convolved, split back and upsampled), so each ``z_s`` depends on every scale.
4. Training: negative log-likelihood ``sum_s 0.5 ||z_s||^2 - log|det J|`` per image, averaged over the batch.
5. Test: ``log p_s = -0.5 mean_c z_s^2`` per position. Score maps as ``post_process.py``: the *additive* map sums the
   per-scale probability maps ``exp(log p_s - max log p_s)``; the *multiplicative* map exponentiates the sum of the
   log-likelihoods; each anomaly map is ``max(map) - map`` per image; the image score is the mean of the top 10 % of
   the multiplicative anomaly map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components.flow import AllInOneBlock
from FrEIA.framework import SequenceINN
from FrEIA.modules import InvertibleModule, PermuteRandom
from torch import nn

#: ResNet stages whose outputs MSFlow reads (``models/resnet/resnet.py`` returns ``[x1, x2, x3]``).
STAGES = ("layer1", "layer2", "layer3")
#: Choices of the map returned as ``anomaly_map``.
ANOMALY_MAPS = ("add", "mul")


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """2-D sine/cosine positional encoding ``[channels, height, width]`` (the official ``positionalencoding2d``).

    The first half of the channels encodes the column, the second half the row, each alternating sin / cos over
    frequencies ``10000^(-2i / (channels/2))``.
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs a channel count divisible by 4, got {channels}")
    encoding = torch.zeros(channels, height, width)
    half = channels // 2
    div_term = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    pos_w = torch.arange(0.0, width)[:, None] * div_term  # [W, half/2]
    pos_h = torch.arange(0.0, height)[:, None] * div_term  # [H, half/2]
    encoding[0:half:2] = torch.sin(pos_w).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(pos_w).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(pos_h).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(pos_h).T[:, :, None].expand(-1, -1, width)
    return encoding


class ConvLayerNormSubnet(nn.Module):
    """Coupling subnet of the parallel flows: conv3x3 → channel LayerNorm → ReLU → conv3x3 (``subnet_conv_ln``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.norm = nn.LayerNorm(in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, C_out, H, W]``."""
        x = self.conv1(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(F.relu(x))


def parallel_flow(channels: int, condition_channels: int, blocks: int, clamp: float) -> SequenceINN:
    """One scale's conditional flow: ``blocks`` all-in-one blocks with softplus global affine scaling.

    Dimensions are declared ``(C, 1, 1)`` as in the official code: every operation is convolutional, so the flow
    accepts any spatial size.
    """
    flow = SequenceINN(channels, 1, 1)
    for _ in range(blocks):
        flow.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(condition_channels, 1, 1),
            subnet_constructor=ConvLayerNormSubnet,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
        )
    return flow


def _pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)``; a plain average pool when the sizes divide (the same windows and values).

    The plain pool is what an ONNX export (``zsad export``) can hold: the exporter cannot write an adaptive pool whose
    input size is only known at run time (the batch axis stays dynamic).
    """
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if height % size[0] == 0 and width % size[1] == 0:
        return F.avg_pool2d(x, (height // size[0], width // size[1]))
    return F.adaptive_avg_pool2d(x, size)


class FusionNet(nn.Module):
    """Cross-scale mixing of the fusion coupling's subnet (``FusionNet(add=True)``).

    All scales are average-pooled to the coarsest size, concatenated, passed through conv3x3 → LayerNorm → ReLU →
    conv3x3 → ReLU (hidden width a quarter of the input), split back per scale, upsampled bilinearly
    (``align_corners=True``) to each scale's size and added to that scale's input.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        total = sum(channels)
        hidden = total // 4
        self.channels = list(channels)
        self.conv1 = nn.Conv2d(total, hidden, 3, 1, 1)
        self.norm = nn.LayerNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, total, 3, 1, 1)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale inputs ``[B, C_s, H_s, W_s]`` → per-scale outputs of the same shapes."""
        coarsest = (int(xs[-1].shape[-2]), int(xs[-1].shape[-1]))
        out = torch.cat([_pool_to(x, coarsest) for x in xs], dim=1)
        out = self.conv1(out)
        out = F.relu(self.norm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        out = F.relu(self.conv2(out))
        parts = torch.split(out, self.channels, dim=1)
        return [
            x + F.interpolate(part, size=x.shape[-2:], mode="bilinear", align_corners=True)
            for x, part in zip(xs, parts, strict=True)
        ]


class FusionSubnet(nn.Module):
    """Subnet of the fusion coupling (``FusionSTNets``).

    Cross-scale mixing, then per-scale 3x3 convs for ``s`` and ``t``; returns ``[s, t]`` concatenated per scale.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.mix = FusionNet(channels)
        self.conv_s = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for c in channels)
        self.conv_t = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for c in channels)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale halves → per-scale ``cat([s, t])`` with twice the channels."""
        mixed = self.mix(xs)
        return [
            torch.cat([conv_s(x), conv_t(x)], dim=1)
            for conv_s, conv_t, x in zip(self.conv_s, self.conv_t, mixed, strict=True)
        ]


class FusionCoupling(InvertibleModule):
    """The fusion flow's multi-input affine coupling (``FusionCouplingLayer``), a FrEIA invertible module.

    Each scale is split into channel halves ``(x1, x2)``. ``y1 = e(s2) * x1 + t2`` with ``(s2, t2)`` from the halves
    ``x2`` of *all* scales, then ``y2 = e(s1) * x2 + t1`` with ``(s1, t1)`` from all ``y1``. The soft clamp
    ``e(s) = exp(clamp * 0.636 * atan(s / clamp))`` bounds the scales; ``log|det J| = sum log e(s1) + log e(s2)``.
    """

    def __init__(
        self, dims_in: list[tuple[int, ...]], dims_c: list[tuple[int, ...]] | None = None, clamp: float = 1.9
    ) -> None:
        super().__init__(dims_in, dims_c or [])
        channels = [dims[0] for dims in dims_in]
        if any(c % 2 for c in channels):
            raise ValueError(f"the fusion coupling needs even channel counts, got {channels}")
        self.split = [c // 2 for c in channels]
        self.clamp = clamp
        self.subnet1 = FusionSubnet(self.split)
        self.subnet2 = FusionSubnet(self.split)

    def log_scale(self, s: torch.Tensor) -> torch.Tensor:
        """Soft-clamped log scale ``clamp * 0.636 * atan(s / clamp)``."""
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def _scale_shift(self, subnet: FusionSubnet, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        st = subnet(xs)
        return [p.chunk(2, dim=1)[0] for p in st], [p.chunk(2, dim=1)[1] for p in st]

    def forward(
        self,
        x_or_z: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Forward (``rev=False``) or inverse pass over all scales; returns outputs and ``log|det J|`` ``[B]``."""
        del c, jac
        halves = [x.split(list((h, h)), dim=1) for x, h in zip(x_or_z, self.split, strict=True)]
        a_list, b_list = [h[0] for h in halves], [h[1] for h in halves]
        if not rev:
            s2, t2 = self._scale_shift(self.subnet2, b_list)
            y1 = [torch.exp(self.log_scale(s)) * a + t for a, s, t in zip(a_list, s2, t2, strict=True)]
            s1, t1 = self._scale_shift(self.subnet1, y1)
            y2 = [torch.exp(self.log_scale(s)) * b + t for b, s, t in zip(b_list, s1, t1, strict=True)]
            sign = 1.0
        else:  # a_list holds y1, b_list holds y2
            s1, t1 = self._scale_shift(self.subnet1, a_list)
            y2 = [(b - t) / torch.exp(self.log_scale(s)) for b, s, t in zip(b_list, s1, t1, strict=True)]
            s2, t2 = self._scale_shift(self.subnet2, y2)
            y1 = [(a - t) / torch.exp(self.log_scale(s)) for a, s, t in zip(a_list, s2, t2, strict=True)]
            sign = -1.0
        outputs = [torch.clamp(torch.cat([p, q], dim=1), -1e6, 1e6) for p, q in zip(y1, y2, strict=True)]
        log_det = sum(
            self.log_scale(a).sum(dim=(1, 2, 3)) + self.log_scale(b).sum(dim=(1, 2, 3))
            for a, b in zip(s1, s2, strict=True)
        )
        return outputs, sign * log_det

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Shapes are unchanged."""
        return input_dims


class FusionFlow(nn.Module):
    """The fusion flow: a fixed random channel permutation per scale, then one :class:`FusionCoupling`.

    Permutations are FrEIA's ``PermuteRandom`` (drawn from NumPy's global generator, seeded by ``seed_everything``).

    The official code wires the same two steps as a FrEIA ``GraphINN``, whose module order is not stable between
    constructions (its ``load_weights`` re-maps permutations by size); a fixed order keeps checkpoints loadable.
    """

    def __init__(self, channels: Sequence[int], clamp: float) -> None:
        super().__init__()
        self.permutations = nn.ModuleList(PermuteRandom([(c, 1, 1)]) for c in channels)
        self.coupling = FusionCoupling([(c, 1, 1) for c in channels], clamp=clamp)

    def forward(self, xs: Sequence[torch.Tensor], rev: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-scale latents and ``log|det J|`` ``[B]`` (permutations have determinant ±1); ``rev`` inverts."""
        if not rev:
            permuted = [perm([x])[0][0] for perm, x in zip(self.permutations, xs, strict=True)]
            return self.coupling(permuted)
        ys, log_det = self.coupling(list(xs), rev=True)
        return [perm([y], rev=True)[0][0] for perm, y in zip(self.permutations, ys, strict=True)], log_det


def fusion_flow(channels: Sequence[int], clamp: float) -> FusionFlow:
    """The fusion flow over scales with ``channels`` (see :class:`FusionFlow`)."""
    return FusionFlow(channels, clamp)


def post_process(
    log_likelihoods: Sequence[torch.Tensor], image_size: tuple[int, int], top_k: float
) -> dict[str, torch.Tensor]:
    """Score maps and image scores from the per-scale log-likelihood maps (official ``post_process``).

    Args:
        log_likelihoods: Per scale ``[B, h_s, w_s]`` maps ``-0.5 * mean_c z^2``.
        image_size: Output map size.
        top_k: Fraction of the map's pixels whose mean is the image score (0.1).

    Returns:
        ``{"score": [B], "add": [B, H, W], "mul": [B, H, W]}``: the image score and the two anomaly maps.
    """

    def upsample(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:, None], size=image_size, mode="bilinear", align_corners=True)[:, 0]

    def image_max(x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1), keepdim=True)

    log_p = sum(upsample(lp) for lp in log_likelihoods)
    prob_mul = torch.exp(log_p - image_max(log_p))
    anomaly_mul = image_max(prob_mul) - prob_mul
    prob_add = sum(upsample(torch.exp(lp - image_max(lp))) for lp in log_likelihoods)
    anomaly_add = image_max(prob_add) - prob_add
    k = max(1, int(image_size[0] * image_size[1] * top_k))
    score = anomaly_mul.flatten(1).topk(k, dim=1).values.mean(dim=1)
    return {"score": score, "add": anomaly_add, "mul": anomaly_mul}


class MSFlowModel(nn.Module):
    """MSFlow over a frozen feature extractor.

    Args:
        extractor: Frozen module mapping images ``[B, 3, S, S]`` to the three stage outputs (see
            :data:`STAGES`) and exposing ``channels`` (their channel counts).
        condition_channels: Positional-encoding channels per scale (64).
        blocks: All-in-one blocks of each scale's parallel flow ((2, 5, 8)).
        clamp: Affine soft-clamping of both flows (1.9).
        top_k: Fraction of map pixels averaged into the image score (0.1).
        anomaly_map: ``"add"`` (the official pixel-AUROC map) or ``"mul"`` (the official AU-PRO map and the one
            the image score is read from) as the returned ``anomaly_map``.
    """

    def __init__(
        self,
        extractor: nn.Module,
        condition_channels: Sequence[int] = (64, 64, 64),
        blocks: Sequence[int] = (2, 5, 8),
        clamp: float = 1.9,
        top_k: float = 0.1,
        anomaly_map: str = "add",
    ) -> None:
        super().__init__()
        channels = list(extractor.channels)
        if not len(channels) == len(condition_channels) == len(blocks):
            raise ValueError(
                f"one condition width and one block count per scale: {len(channels)} scales, "
                f"condition_channels={list(condition_channels)}, blocks={list(blocks)}"
            )
        if anomaly_map not in ANOMALY_MAPS:
            raise ValueError(f"anomaly_map must be one of {ANOMALY_MAPS}, got {anomaly_map!r}")
        if not 0.0 < top_k <= 1.0:
            raise ValueError(f"top_k must be in (0, 1], got {top_k}")
        self.extractor = extractor.eval().requires_grad_(False)
        self.condition_channels = [int(c) for c in condition_channels]
        self.pool = nn.AvgPool2d(3, 2, 1)
        self.parallel_flows = nn.ModuleList(
            parallel_flow(c, cc, n, clamp) for c, cc, n in zip(channels, self.condition_channels, blocks, strict=True)
        )
        self.fusion_flow = fusion_flow(channels, clamp)
        self.top_k = float(top_k)
        self.anomaly_map = anomaly_map

    def train(self, mode: bool = True) -> MSFlowModel:
        """Train the flows; the extractor stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.extractor.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen, pooled multi-scale features ``{stage: [B, C_s, h_s, w_s]}``."""
        features = self.extractor(images)
        return {stage: self.pool(features[i]) for i, stage in enumerate(STAGES)}

    def flows(self, features: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Parallel then fusion flow: latents ``z_s`` per scale and the total ``log|det J|`` ``[B]``."""
        latents, log_det = [], 0.0
        for feature, flow, cond_channels in zip(
            features.values(), self.parallel_flows, self.condition_channels, strict=True
        ):
            batch, _, height, width = feature.shape
            condition = positional_encoding_2d(cond_channels, height, width).to(feature)
            z, jac = flow(feature, c=[condition[None].expand(batch, -1, -1, -1)])
            latents.append(z)
            log_det = log_det + jac
        latents, fusion_jac = self.fusion_flow(latents)
        return list(latents), log_det + fusion_jac

    @staticmethod
    def nll(latents: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
        """Training loss: mean over images of ``sum_s 0.5 * ||z_s||^2 - log|det J|`` (not divided by dimension)."""
        return (sum(0.5 * (z**2).sum(dim=(1, 2, 3)) for z in latents) - log_det).mean()

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: the negative log-likelihood; eval: ``InferenceBatch(pred_score, anomaly_map)``."""
        latents, log_det = self.flows(self.encode(images))
        if self.training:
            return self.nll(latents, log_det)
        log_likelihoods = [-0.5 * (z**2).mean(dim=1) for z in latents]
        out = post_process(log_likelihoods, tuple(images.shape[-2:]), self.top_k)
        return InferenceBatch(pred_score=out["score"], anomaly_map=out[self.anomaly_map].float())
