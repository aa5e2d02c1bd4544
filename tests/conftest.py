"""Shared test set-up: one torch thread (the tiny model is 10-50x slower with 2 threads on a loaded box), W&B off,
hub offline, and session-wide fixtures for the tiny backbone and generated datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Shared helpers at the top of tests/ (``ddp_launch``) importable from every folder, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))

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


# --------------------------------------------------------------------------------------------------------------------
# Generated datasets (zsad.data.synthetic), one per session and layout. Treat them as read-only: tests that need to
# break a dataset generate their own copy (it takes milliseconds). The VisA fixture is the raw download layout;
# anomalib's Visa.prepare_data (run by any VisA datamodule) adds its converted visa_pytorch/ tree next to it.
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mvtec_like_root(tmp_path_factory):
    """MVTec-layout dataset, domain "a": categories alpha/beta, 64 px, 4 train / 3 good / 4x3 defect images each."""
    from zsad.data.synthetic import make_mvtec_like

    return make_mvtec_like(tmp_path_factory.mktemp("mvtec_like_a"), domain="a")


@pytest.fixture(scope="session")
def mvtec_like_root_b(tmp_path_factory):
    """MVTec-layout dataset in the other visual domain ("b"), for cross-dataset tests."""
    from zsad.data.synthetic import make_mvtec_like

    return make_mvtec_like(tmp_path_factory.mktemp("mvtec_like_b"), domain="b")


@pytest.fixture(scope="session")
def visa_like_root(tmp_path_factory):
    """Raw VisA layout (split_csv/1cls.csv, class-id masks), categories candle/capsules, 64x96 JPEGs."""
    from zsad.data.synthetic import make_visa_like

    return make_visa_like(tmp_path_factory.mktemp("visa_like"))


@pytest.fixture(scope="session")
def gogan_like_root(tmp_path_factory):
    """Gogan layout (nunozumi/tanizumi, tanizumi without exudate), 64 px PNGs to keep tests fast."""
    from zsad.data.synthetic import make_gogan_like

    return make_gogan_like(tmp_path_factory.mktemp("gogan_like"), size=64)
