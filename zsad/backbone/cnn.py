"""ImageNet CNN feature extractors (torchvision ResNets) for the unsupervised baselines, with offline-safe weights.

zsad's CLIP methods never use these; MSFlow does. Pretrained weights come from torchvision's release files, cached
in the torch hub directory (``torch.hub.get_dir()/checkpoints``). Offline, a missing file raises
:class:`PretrainedWeightsError` naming the file, the URL and the folder to put it in, instead of a network trace.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

__all__ = ["RESNETS", "PretrainedWeightsError", "ResNetStages", "hub_checkpoint_file", "load_hub_checkpoint"]

#: Supported extractors and their torchvision ImageNet weights (the ``torchvision.models`` URLs the official MSFlow
#: code loads: the V1 weights).
RESNETS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights.IMAGENET1K_V1",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights.IMAGENET1K_V1",
}


class PretrainedWeightsError(FileNotFoundError):
    """Pretrained weights (or another asset a model downloads) are missing and cannot be downloaded."""


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in {"1", "true", "yes"} for name in ("HF_HUB_OFFLINE", "ZSAD_OFFLINE"))


def hub_checkpoint_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url``: ``<torch hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def load_hub_checkpoint(url: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict at ``url`` from the torch hub cache, downloaded there when online.

    Args:
        url: Release URL of the weights.
        what: What the weights are for, named in the error.

    Raises:
        PretrainedWeightsError: The file is not cached and cannot be downloaded (``HF_HUB_OFFLINE=1`` or
            ``ZSAD_OFFLINE=1`` set, or the download failed).
    """
    path = hub_checkpoint_file(url)
    hint = (
        f"{what}: pretrained weights {path.name} are not in {path.parent} and cannot be downloaded here. "
        f"Download {url} and put it at {path} (the torch hub cache; set TORCH_HOME to move it), or use random "
        "weights (pretrained: false) for tests only."
    )
    if not path.is_file():
        if _offline():
            raise PretrainedWeightsError(hint)
        try:
            torch.hub.load_state_dict_from_url(url, progress=False)
        except Exception as err:  # noqa: BLE001 - any network failure means the same thing to the user
            raise PretrainedWeightsError(f"{hint} (download failed: {err})") from err
    return torch.load(path, map_location="cpu", weights_only=True)


class ResNetStages(nn.Module):
    """A frozen torchvision ResNet returning the outputs of ``layer1``, ``layer2`` and ``layer3``.

    Args:
        name: One of :data:`RESNETS` (``wide_resnet50_2`` in MSFlow).
        pretrained: Load torchvision's ImageNet weights (from the torch hub cache); ``False``: random weights, for
            tests and benchmarks only.

    Attributes:
        channels: Output channels of the three stages (``[256, 512, 1024]`` for ``wide_resnet50_2``).
    """

    def __init__(self, name: str = "wide_resnet50_2", pretrained: bool = True) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown extractor {name!r}; choose from {sorted(RESNETS)}")
        self.name = name
        self.pretrained = bool(pretrained)
        state = None
        if pretrained:  # before building the network: a missing file fails fast
            weights = torchvision.models.get_weight(RESNETS[name])
            state = load_hub_checkpoint(weights.url, f"{name} ({RESNETS[name]})")
        network = torchvision.models.get_model(name, weights=None)
        if state is not None:
            network.load_state_dict(state)
        self.stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
        self.layer1, self.layer2, self.layer3 = network.layer1, network.layer2, network.layer3
        self.channels = [self._out_channels(layer) for layer in (self.layer1, self.layer2, self.layer3)]
        self.eval().requires_grad_(False)

    @staticmethod
    def _out_channels(layer: nn.Sequential) -> int:
        block = layer[-1]
        return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels

    def identity(self) -> dict[str, str | bool]:
        """What determines the weights: recorded in checkpoints."""
        return {"name": self.name, "pretrained": self.pretrained}

    def train(self, mode: bool = True) -> ResNetStages:  # noqa: ARG002
        """Always eval: the extractor is frozen, BatchNorm keeps its ImageNet statistics."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, S, S]`` → ``[layer1 [B, C1, S/4, S/4], layer2 (S/8), layer3 (S/16)]``."""
        x1 = self.layer1(self.stem(images))
        x2 = self.layer2(x1)
        return [x1, x2, self.layer3(x2)]
