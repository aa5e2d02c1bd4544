"""MSFlow's public class: fit and test through the CLI on generated Gogan data, schedule, offline weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zsad.backbone.cnn import PretrainedWeightsError
from zsad.cli import build_cli
from zsad.methods.msflow import MSFlow

CONFIGS = Path(__file__).parents[3] / "configs" / "msflow"
TINY = [
    "--model.init_args.backbone=resnet18",
    "--model.init_args.pretrained=false",
    "--model.init_args.image_size=64",
    "--model.init_args.blocks=[1,1,1]",
    "--model.init_args.condition_channels=[8,8,8]",
]


def test_fits_and_tests_one_gogan_category_through_the_cli(tmp_path: Path, gogan_like_root: Path) -> None:
    run = tmp_path / "run"
    args = [
        "fit",
        "-c",
        str(CONFIGS / "gogan.yaml"),
        *TINY,
        f"--data.init_args.root={gogan_like_root}",
        "--data.init_args.category=nunozumi",
        "--data.init_args.num_workers=0",
        "--trainer.max_epochs=2",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=true",
    ]
    cli = build_cli(args)
    model = cli.model
    assert model.trainer.current_epoch == 2
    rows = {r["category"]: r for r in json.loads(next(run.rglob("results/metrics.json")).read_text())}
    assert set(rows) == {"nunozumi", "mean"}
    defects = {"crack_joint_opening", "efflorescence", "exudate", "spalling_missing"}  # the config asks for them
    assert {f"image_auroc_{d}" for d in defects} <= set(rows["nunozumi"])
    assert 0.0 <= rows["nunozumi"]["image_auroc"] <= 1.0 and 0.0 <= rows["nunozumi"]["pixel_aupro"] <= 1.0

    # The checkpoint reproduces the scores (random extractor weights travel with it; pretrained ones are rebuilt).
    ckpt = next(run.rglob("*.ckpt"))
    assert any(k.startswith("model.extractor.") for k in torch.load(ckpt, weights_only=False)["state_dict"])
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    reloaded = MSFlow.load_from_checkpoint(ckpt, weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(images).pred_score, model.model.cpu()(images).pred_score)


def test_learning_rate_follows_the_official_warmup_and_decay() -> None:
    module = MSFlow(
        backbone="resnet18",
        pretrained=False,
        image_size=64,
        blocks=(1, 1, 1),
        evaluator=False,
        condition_channels=(8, 8, 8),
    )
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(100):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Official train.py: LinearLR(0.3 -> 1 over 3 meta-epochs x 4 sub-epochs) and MultiStepLR([75, 90], 0.33), both
    # stepped once per (sub-)epoch.
    expected = [1e-4 * (0.3 + 0.7 * min(e, 12) / 12) * 0.33 ** sum(e >= m for m in (75, 90)) for e in range(100)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_missing_pretrained_extractor_offline_names_the_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError) as info:
        MSFlow(backbone="wide_resnet50_2", pretrained=True)
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in message


def test_anomalib_finds_msflow_by_name() -> None:
    from anomalib.models import AnomalibModule, get_model

    assert AnomalibModule in MSFlow.__bases__
    model = get_model("msflow", backbone="resnet18", pretrained=False, image_size=64, blocks=(1, 1, 1))
    assert type(model) is MSFlow and model.learning_type.value == "one_class"
