"""`zsad predict` / `zsad calibrate` / `zsad export` on a user's folder, as a new user runs them."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tests.deploy.conftest import predict_args
from zsad.cli import build_cli, main
from zsad.deploy.writer import read_predictions


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open() as handle:
        return list(csv.DictReader(handle))


def test_predict_on_a_folder_without_config_writes_a_row_and_unique_files_per_image(
    tiny_checkpoint: Path, photo_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_cli(
        predict_args(
            tiny_checkpoint, photo_folder, tmp_path, "--predictions.save_maps=npy", "--predictions.save_overlays=true"
        )
    )
    csv_path = tmp_path / "predictions" / "predictions.csv"
    assert str(csv_path) in capsys.readouterr().out
    rows = _rows(csv_path)
    inputs = {str(p) for p in photo_folder.rglob("*") if p.is_file()}
    assert {row["image_path"] for row in rows} == inputs and len(rows) == 4
    assert all(row["pred_label"] == "" and row["calibrated"] == "false" for row in rows)  # no invented threshold
    assert all(0.0 <= float(row["pred_score"]) <= 1.0 for row in rows)
    maps = [row["anomaly_map"] for row in rows]
    overlays = [row["overlay"] for row in rows]
    assert len(set(maps)) == len(set(overlays)) == 4 and all(Path(p).is_file() for p in maps + overlays)
    records = {Path(r["image_path"]).name: r for r in read_predictions(csv_path.with_suffix(".jsonl"))}
    # maps at each image's displayed resolution: the EXIF-rotated 64x40 JPEG is 64 high and 40 wide
    assert np.load(records["rotated.jpg"]["anomaly_map"]).shape == (64, 40)
    assert (records["rotated.jpg"]["height"], records["rotated.jpg"]["width"]) == (64, 40)
    assert np.load(records["img1.png"]["anomaly_map"]).shape == (40, 64)
    assert records["img1.png"]["regions"] is None  # no pixel threshold: no regions


def test_calibrate_at_target_fpr_then_predict_labels_and_regions(
    tiny_checkpoint: Path, mvtec_like_root: Path, tmp_path: Path
) -> None:
    normal = tmp_path / "normal"
    for i, path in enumerate(sorted(mvtec_like_root.glob("*/train/good/*.png"))):
        shutil.copy(path, normal.mkdir(exist_ok=True) or normal / f"{i:02d}.png")
    assert len(list(normal.iterdir())) == 8
    calibrated = tmp_path / "calibrated.ckpt"
    main(
        [
            "calibrate",
            f"--ckpt_path={tiny_checkpoint}",
            "--target_fpr=0.25",
            f"--output={calibrated}",
            "--data=zsad.data.Images",
            f"--data.root={normal}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    build_cli(
        predict_args(calibrated, normal, tmp_path, "--predictions.save_maps=npy", "--predictions.map_resolution=input")
    )
    rows = _rows(tmp_path / "predictions" / "predictions.csv")
    assert [row["calibrated"] for row in rows] == ["true"] * 8
    assert sorted(row["pred_label"] for row in rows) == ["0"] * 6 + ["1"] * 2  # 25 % of the 8 normal images
    records = read_predictions(tmp_path / "predictions" / "predictions.jsonl")
    pixel_threshold = records[0]["pixel_threshold"]
    maps = np.stack([np.load(r["anomaly_map"]) for r in records])
    assert maps.shape == (8, 98, 98)
    assert (maps >= np.float32(pixel_threshold)).mean() == pytest.approx(0.25, abs=1 / maps.size)
    for record, anomaly_map in zip(records, maps, strict=True):
        labels, count = ndimage.label(anomaly_map >= np.float32(pixel_threshold))
        assert record["n_regions"] == count == len(record["regions"])
        assert [r["area"] for r in record["regions"]] == [int((labels == i).sum()) for i in range(1, count + 1)]


def test_onnx_export_of_a_calibrated_checkpoint_predicts_like_pytorch(
    tiny_checkpoint: Path, photo_folder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    calibrated = tmp_path / "calibrated.ckpt"
    main(
        [
            "calibrate",
            f"--ckpt_path={tiny_checkpoint}",
            "--target_fpr=0.5",
            f"--output={calibrated}",
            "--data=zsad.data.Images",
            f"--data.root={photo_folder}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    onnx_path = tmp_path / "model.onnx"
    main(["export", f"--ckpt_path={calibrated}", "--format=onnx", f"--output={onnx_path}"])
    build_cli(predict_args(calibrated, photo_folder, tmp_path / "torch"))
    build_cli(
        [a for a in predict_args("", photo_folder, tmp_path / "onnx") if not a.startswith("--ckpt_path")]
        + [f"--model={onnx_path}"]
    )
    torch_rows = _rows(tmp_path / "torch" / "predictions" / "predictions.csv")
    onnx_rows = _rows(tmp_path / "onnx" / "predictions" / "predictions.csv")
    assert [r["image_path"] for r in onnx_rows] == [r["image_path"] for r in torch_rows]
    for ours, theirs in zip(onnx_rows, torch_rows, strict=True):
        assert float(ours["pred_score"]) == pytest.approx(float(theirs["pred_score"]), abs=1e-4)
        assert ours["image_threshold"] == theirs["image_threshold"] != ""  # thresholds travel in the export
    assert sorted(r["pred_label"] for r in onnx_rows) == ["0", "0", "1", "1"]
