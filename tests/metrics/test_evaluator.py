"""ZSADEvaluator with a plain Lightning Trainer: per-category values, mean, logged keys, files, pictures, edge cases."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from anomalib.metrics import Evaluator
from metrics_toy import CATEGORIES, ToyDataModule, ToyDataset, ToyModel, expected_metrics, run_test, toy_batch

from zsad.metrics import ZSADEvaluator, metric_columns
from zsad.metrics.per_category import PerCategoryMetrics

COLUMNS = metric_columns()


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory) -> tuple[ZSADEvaluator, list[dict[str, float]], Path]:
    """One test run shared by the read-only checks below (Trainer start-up is the slow part)."""
    out = tmp_path_factory.mktemp("run")
    evaluator = ZSADEvaluator(stages=("test",), save_images=1, output_dir=str(out))
    logged = run_test(evaluator, str(out))
    return evaluator, logged, out


def test_per_category_values_equal_the_functional_api(tested) -> None:
    evaluator, _, _ = tested
    expected = expected_metrics(ToyDataset())
    assert set(evaluator.results) == {*CATEGORIES, "mean"}
    for category in CATEGORIES:
        for metric in COLUMNS:
            assert evaluator.results[category][metric] == pytest.approx(expected[category][metric], abs=1e-12)


def test_mean_is_the_unweighted_mean_over_categories(tested) -> None:
    evaluator, _, _ = tested
    for metric in COLUMNS:
        values = [evaluator.results[c][metric] for c in CATEGORIES]
        assert evaluator.results["mean"][metric] == pytest.approx(np.mean(values), abs=1e-12)


def test_logged_keys_follow_stage_dataset_category_metric(tested) -> None:
    evaluator, logged, _ = tested
    for category in (*CATEGORIES, "mean"):
        for metric in COLUMNS:
            key = f"test/toy/{category}/{metric}"
            assert logged[0][key] == pytest.approx(evaluator.results[category][metric], abs=1e-6)


def test_results_files(tested) -> None:
    evaluator, _, out = tested
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["category"] for r in rows] == [*CATEGORIES, "mean"]
    assert list(rows[0]) == ["category", *COLUMNS]
    assert float(rows[-1]["pixel_aupro"]) == evaluator.results["mean"]["pixel_aupro"]  # full precision kept
    records = json.loads((out / "metrics.json").read_text())
    assert records[1]["category"] == "cable"
    assert records[1]["image_ap"] == evaluator.results["cable"]["image_ap"]
    markdown = (out / "metrics.md").read_text().splitlines()
    assert markdown[0].startswith("| category | image AUROC |")
    mean_cells = markdown[-1].strip("| ").split(" | ")
    assert mean_cells[0] == "mean"
    assert mean_cells[COLUMNS.index("pixel_aupro") + 1] == f"{100 * evaluator.results['mean']['pixel_aupro']:.1f}"
    assert not list(out.glob("*.tmp-*"))  # no temporary files left behind


def test_pictures_are_written(tested) -> None:
    _, _, out = tested
    for category in CATEGORIES:
        overlays = list((out / "images" / category).glob("*.png"))
        assert len(overlays) == 1 and overlays[0].name.startswith("scratch_")  # anomalous images first
        assert (out / "curves" / f"{category}.png").stat().st_size > 10_000


def test_is_an_anomalib_evaluator_and_registered_as_callback() -> None:
    evaluator = ZSADEvaluator()
    model = ToyModel(evaluator)
    assert isinstance(evaluator, Evaluator)
    assert model.evaluator is evaluator
    assert evaluator in model.configure_callbacks()
    assert not any(key.startswith("evaluator.") for key in model.state_dict())  # nothing leaks into checkpoints


def test_validation_stage_logs_val_keys_and_writes_no_files(tmp_path: Path) -> None:
    evaluator = ZSADEvaluator(stages=("val",))
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    logged = trainer.validate(ToyModel(evaluator), datamodule=ToyDataModule(n=12), verbose=False)
    assert logged[0]["val/toy/mean/pixel_aupro"] == pytest.approx(evaluator.results["mean"]["pixel_aupro"], abs=1e-6)
    assert evaluator.results_by_stage.keys() == {"val"}
    assert not list(tmp_path.glob("metrics.*"))


def test_default_output_dir_is_results_under_the_run(tmp_path: Path) -> None:
    evaluator = ZSADEvaluator(stages=("test",), compute_pixel=False)
    logged = run_test(evaluator, str(tmp_path), n=9)
    assert (tmp_path / "results" / "metrics.csv").exists()
    header = (tmp_path / "results" / "metrics.csv").read_text().splitlines()[0]
    assert header == "category,image_auroc,image_ap,image_f1max"
    assert not any("pixel" in key for key in logged[0])


# --------------------------------------------------------------------------------------------------------------------
# PerCategoryMetrics directly (no Trainer)
# --------------------------------------------------------------------------------------------------------------------


def test_image_only_data_skips_pixel_metrics() -> None:
    state = PerCategoryMetrics()
    state.update(toy_batch(list(range(12)), with_masks=False))
    out = state.compute()
    for category in CATEGORIES:
        assert not math.isnan(out["metrics"][category]["image_ap"])
        assert math.isnan(out["metrics"][category]["pixel_aupro"])


def test_repeated_images_are_counted_once() -> None:
    once, twice = PerCategoryMetrics(), PerCategoryMetrics()
    once.update(toy_batch(list(range(12))))
    twice.update(toy_batch(list(range(12))))
    with pytest.warns(UserWarning, match="duplicate image paths"):
        twice.update(toy_batch([0, 3, 4]))
        out_twice = twice.compute()
    assert out_twice["metrics"] == once.compute()["metrics"]
    assert out_twice["counts"]["bottle"]["images"] == 4


def test_category_without_anomalies_gives_nan_and_the_mean_skips_it() -> None:
    state = PerCategoryMetrics()
    state.update(toy_batch([0, 9, 1, 4, 7]))  # bottle: 0 and 9 are good images only
    out = state.compute()
    assert math.isnan(out["metrics"]["bottle"]["image_auroc"])
    assert math.isnan(out["metrics"]["bottle"]["pixel_aupro"])
    from zsad.metrics.per_category import unweighted_mean

    assert unweighted_mean(out["metrics"], COLUMNS)["pixel_aupro"] == out["metrics"]["cable"]["pixel_aupro"]


def test_nan_in_a_map_is_a_clear_error_naming_the_image() -> None:
    batch = toy_batch([0, 1])
    batch.anomaly_map[1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values for \['/toy/cable/test/good/001.png'\]"):
        PerCategoryMetrics().update(batch)


def test_map_mask_size_mismatch_is_a_clear_error() -> None:
    batch = toy_batch([0, 1])
    batch.anomaly_map = torch.nn.functional.interpolate(batch.anomaly_map[:, None], size=(12, 12))[:, 0]
    with pytest.raises(ValueError, match="mask resolution"):
        PerCategoryMetrics().update(batch)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown stages"):
        ZSADEvaluator(stages=("train",))
    with pytest.raises(ValueError, match="fpr_limit"):
        ZSADEvaluator(fpr_limit=1.5)


def test_results_do_not_clash_with_the_csv_logger(tmp_path: Path) -> None:
    """Lightning's CSVLogger (the default without tensorboard) writes its own metrics.csv into log_dir."""
    from lightning.pytorch.loggers import CSVLogger

    evaluator = ZSADEvaluator(stages=("test",), compute_pixel=False)
    run_test(evaluator, str(tmp_path), n=9, logger=CSVLogger(str(tmp_path), name="logs"))
    run_dirs = list((tmp_path / "logs").glob("version_*"))
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "results" / "metrics.json").exists()
    assert (run_dirs[0] / "metrics.csv").exists()  # the logger's own file, intact


def test_native_resolution_reads_masks_from_disk_and_resizes_the_maps(tmp_path: Path) -> None:
    """Gogan at 256 (here 64) px evaluated natively while the model ran at 98 px: an oracle map scores 1.0."""
    import torch.nn.functional as torch_f

    from zsad.data import read_native_masks
    from zsad.data.dataclasses import ZSADBatch, ZSADItem
    from zsad.data.synthetic import make_gogan_like
    from zsad.metrics.evaluator import native_resolution_samples
    from zsad.metrics.per_category import PerCategoryMetrics

    root = make_gogan_like(tmp_path / "gogan", size=64)
    paths = sorted((root / "nunozumi" / "test").rglob("*.png"))[:6]
    labels = [int(p.parent.name != "good") for p in paths]
    mask_paths = [str(root / "nunozumi" / "ground_truth" / p.parent.name / f"{p.stem}_mask.png") if y else None
                  for p, y in zip(paths, labels, strict=True)]
    native = read_native_masks([str(p) for p in paths], mask_paths, torch.tensor(labels))
    assert all(m.shape == (64, 64) for m in native) and any(m.any() for m in native)
    # What a perfect model returns at its 98-px input: the mask, upsampled.
    oracle = [torch_f.interpolate(m[None, None].float(), size=(98, 98), mode="nearest")[0, 0] for m in native]
    empty = torch.zeros(98, 98, dtype=torch.bool)
    items = [ZSADItem(image=torch.zeros(3, 98, 98), gt_label=torch.tensor(y), gt_mask=empty,
                      image_path=str(p), mask_path=mp or "", category="nunozumi")
             for p, y, mp in zip(paths, labels, mask_paths, strict=True)]
    batch = ZSADBatch.collate(items)
    batch.mask_path = mask_paths
    batch.update(pred_score=torch.tensor(labels, dtype=torch.float32), anomaly_map=torch.stack(oracle))
    samples = native_resolution_samples(batch)
    assert [tuple(s.anomaly_map.shape) for s in samples] == [(1, 64, 64)] * len(paths)
    state = PerCategoryMetrics(True, 0.3, False)
    for sample in samples:
        state.update(sample)
    metrics = state.compute()["metrics"]["nunozumi"]
    assert metrics["pixel_auroc"] > 0.99 and metrics["pixel_aupro"] > 0.95
    with pytest.raises(ValueError, match="resolution"):
        ZSADEvaluator(resolution="original")


def test_category_without_normal_images_reports_nan_not_a_perfect_ap(caplog: pytest.LogCaptureFixture) -> None:
    dataset = ToyDataset(25)
    items = [dataset[i] for i in range(25)]
    # bottle keeps only its anomalous images: AP and F1-max would be 1.0 for any scores, AUROC undefined.
    keep = [i for i, item in enumerate(items) if item.category != "bottle" or int(item.gt_label) == 1]
    assert any(items[i].category == "bottle" for i in keep)
    state = PerCategoryMetrics()
    state.update(toy_batch(keep))
    with caplog.at_level("WARNING"):
        out = state.compute()
    for metric in ("image_auroc", "image_ap", "image_f1max"):
        assert math.isnan(out["metrics"]["bottle"][metric])
        assert not math.isnan(out["metrics"]["cable"][metric])
    assert not math.isnan(out["metrics"]["bottle"]["pixel_auroc"])  # normal pixels exist inside defect images
    assert "bottle: no normal (test/good/) test images" in caplog.text
