"""zsad's methods are anomalib models: found by ``get_model`` after ``import zsad``, runnable by anomalib's Engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.engine import Engine
from anomalib.models import AnomalibModule, get_model, list_models

import zsad  # noqa: F401 - importing zsad is the whole registration
from zsad.data import Gogan


@pytest.mark.parametrize(
    ("name", "cls_name"),
    [("learnable_vectors", "LearnableVectors"), ("anomalyclip", "AnomalyCLIP"), ("adaptclip", "AdaptCLIP"),
     ("clipada", "CLIPADA"), ("april_gan", "APRILGAN")],
)
def test_every_method_is_found_by_anomalibs_get_model(name: str, cls_name: str) -> None:
    cls = getattr(zsad.methods, cls_name)
    assert AnomalibModule in cls.__bases__  # direct subclass: what anomalib's get_model/list_models see
    assert cls_name in list_models(case="pascal")
    model = get_model(name, backbone="tiny", image_size=98)
    assert type(model) is cls


def test_engine_fits_and_tests_a_zsad_model_on_gogan(tmp_path: Path, gogan_like_root: Path) -> None:
    model = get_model("learnable_vectors", backbone="tiny", image_size=98)
    datamodule = Gogan(root=gogan_like_root, category="nunozumi", train_batch_size=4, eval_batch_size=4,
                       num_workers=0)
    engine = Engine(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule, verbose=False)
    assert 0.0 <= results[0]["test/gogan/mean/image_auroc"] <= 1.0
    assert "test/gogan/nunozumi/pixel_aupro" in results[0]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints and all(p.stat().st_size < 200_000 for p in checkpoints)  # no frozen CLIP inside
