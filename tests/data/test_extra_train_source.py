"""CrossDataset's extra training sources (AdaCLIP's industrial + medical training pool)."""

from __future__ import annotations

from pathlib import Path

import torch

from zsad.data import CrossDataset
from zsad.data.synthetic import make_mvtec_like


def test_extra_folder_source_joins_the_training_pool(tmp_path: Path) -> None:
    common = {"n_train": 1, "n_test_good": 2, "n_test_defect": 1}
    main = make_mvtec_like(tmp_path / "main", categories=("alpha",), domain="a", **common)
    extra = make_mvtec_like(tmp_path / "extra", categories=("polyp",), domain="b", **common)
    target = make_mvtec_like(tmp_path / "target", categories=("beta",), domain="b", **common)
    alone = CrossDataset(train={"dataset": "mvtec", "root": main}, test={"dataset": "mvtec", "root": target})
    both = CrossDataset(
        train={"dataset": "mvtec", "root": main},
        test={"dataset": "mvtec", "root": target},
        extra_train=[{"dataset": "folder", "root": extra, "name": "colondb"}],
        mosaic_probability=1.0,
        image_size=56,
        train_batch_size=64,
    )
    alone.setup()
    both.setup()
    n_extra = len(both.train_data) - len(alone.train_data)
    assert n_extra > 0
    assert set(both.train_data.samples["category"]) == {"alpha", "polyp"}
    assert both.train_data.name == "mvtec+colondb"
    # The mosaic stays with the main source; the extra source's samples are plain.
    assert both.train_data.datasets[0].mosaic_probability == 1.0
    assert both.train_data.datasets[1].mosaic_probability == 0.0
    batch = next(iter(both.train_dataloader()))  # the Resize reaches every part, so samples of both collate
    assert sorted(set(batch.category)) == ["alpha", "polyp"]
    assert batch.image.shape[-2:] == torch.Size([56, 56])
