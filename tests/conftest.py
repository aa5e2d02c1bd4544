"""Shared test set-up: one torch thread (the tiny model is 10-50x slower with 2 threads on a loaded box), W&B off,
hub offline, and session-wide fixtures for the tiny backbone and generated datasets."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The tiny random-weight CLIP (24 vision layers, 98 px = 7x7 grid), text tower included. Do not mutate."""
    from zsad.backbone import create_backbone

    return create_backbone("tiny", weights="random", image_size=98)
