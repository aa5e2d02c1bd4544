"""Per-defect-type image AUROC (``ZSADEvaluator(per_defect_type=True)``) against scikit-learn, generated Gogan data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from anomalib import LearningType
from anomalib.models import AnomalibModule
from sklearn.metrics import roc_auc_score

from zsad.data import Gogan
from zsad.metrics import ZSADEvaluator
from zsad.metrics.per_category import defect_type


class RecordingScorer(AnomalibModule):
    """Scores an image by a fixed random projection of its pixels and records ``(path, label, score)``."""

    def __init__(self, evaluator: ZSADEvaluator) -> None:
        super().__init__(pre_processor=False, post_processor=False, evaluator=evaluator, visualizer=False)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[str, int, float]] = []

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {}

    def test_step(self, batch: Any, batch_idx: int) -> Any:  # noqa: ANN401, ARG002
        weights = torch.linspace(-1.0, 1.0, batch.image[0].numel()).reshape(batch.image[0].shape)
        scores = (batch.image * weights.sin()).flatten(1).sum(1)
        batch.update(pred_score=scores, anomaly_map=batch.image[:, 0].clone())
        self.seen += [(p, int(y), float(s)) for p, y, s in zip(batch.image_path, batch.gt_label, scores, strict=True)]
        return batch


def test_each_defect_type_is_scored_against_the_normal_images(tmp_path: Path, gogan_like_root: Path) -> None:
    out = tmp_path / "results"
    evaluator = ZSADEvaluator(stages=("test",), per_defect_type=True, output_dir=str(out))
    model = RecordingScorer(evaluator)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    datamodule = Gogan(root=gogan_like_root, category="tanizumi", eval_batch_size=5, num_workers=0, image_size=32)
    (logged,) = trainer.test(model, datamodule=datamodule, verbose=False)

    normal = [(y, s) for p, y, s in model.seen if y == 0]
    types = sorted({defect_type(p) for p, y, _ in model.seen if y == 1})
    assert types == ["crack_joint_opening", "efflorescence", "spalling_missing"]  # tanizumi has no exudate
    rows = {r["category"]: r for r in json.loads((out / "metrics.json").read_text())}
    for name in types:
        chosen = normal + [(y, s) for p, y, s in model.seen if y == 1 and defect_type(p) == name]
        expected = roc_auc_score([y for y, _ in chosen], [s for _, s in chosen])
        key = f"image_auroc_{name}"
        assert rows["tanizumi"][key] == pytest.approx(expected, abs=1e-12)
        assert rows["mean"][key] == pytest.approx(expected, abs=1e-12)  # one category: the mean is that category
        assert logged[f"test/gogan/tanizumi/{key}"] == pytest.approx(expected, abs=1e-6)
    # The overall image AUROC is unchanged by the option, and the Markdown / CSV tables carry the new columns.
    expected_all = roc_auc_score([y for _, y, _ in model.seen], [s for *_, s in model.seen])
    assert rows["tanizumi"]["image_auroc"] == pytest.approx(expected_all, abs=1e-12)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == [f"image_auroc_{t}" for t in types]
    assert "image_auroc_efflorescence" in (out / "metrics.md").read_text()


def test_without_the_option_no_defect_columns_appear(tmp_path: Path, gogan_like_root: Path) -> None:
    evaluator = ZSADEvaluator(stages=("test",), output_dir=str(tmp_path))
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    datamodule = Gogan(root=gogan_like_root, category="tanizumi", eval_batch_size=8, num_workers=0, image_size=32)
    trainer.test(RecordingScorer(evaluator), datamodule=datamodule, verbose=False)
    assert not any(k.startswith("image_auroc_") for k in evaluator.results["tanizumi"])


@pytest.mark.parametrize(("path", "expected"), [("root/cat/test/crack/001.png", "crack"), (None, "")])
def test_defect_type_is_the_parent_folder(path: str | None, expected: str) -> None:
    assert defect_type(path) == expected
