"""The frozen-feature cache: training over it gives the uncached vectors (fp16 tolerance), it is read instead of
re-encoding, it is invalidated by whatever determines the features, and an interrupted extraction resumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torchvision.tv_tensors import Image, Mask

from zsad.backbone.cache import (
    FeatureCache,
    FeatureCacheError,
    FeatureStore,
    collate_cached,
    describe_dataset,
    extract_missing,
)
from zsad.data import CrossDataset
from zsad.methods import LearnableVectors

EPOCHS = 3


def _datamodule(train_root: Path, test_root: Path, **kwargs) -> CrossDataset:
    return CrossDataset(
        train={"dataset": "mvtec", "root": str(train_root)},
        test={"dataset": "mvtec", "root": str(test_root)},
        train_batch_size=4,
        seed=5,
        **kwargs,
    )


def _fit(train_root: Path, test_root: Path, cache: Path | None, **model_kwargs) -> LearnableVectors:
    seed_everything(7)
    model = LearnableVectors(
        backbone="tiny", weights="random", image_size=98, lr=0.01, evaluator=False,
        feature_cache=None if cache is None else str(cache), **model_kwargs,
    )
    trainer = Trainer(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=_datamodule(train_root, test_root))
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mvtec_like_root: Path, mvtec_like_root_b: Path) -> dict:
    cache = tmp_path_factory.mktemp("feature_cache")
    plain = _fit(mvtec_like_root, mvtec_like_root_b, None)
    first = _fit(mvtec_like_root, mvtec_like_root_b, cache)
    store_dirs = [p for p in cache.iterdir() if p.is_dir()]
    stamps = {p: p.stat().st_mtime_ns for p in store_dirs[0].glob("*.safetensors")}
    second = _fit(mvtec_like_root, mvtec_like_root_b, cache)
    return {"plain": plain, "first": first, "second": second, "cache": cache, "dirs": store_dirs, "stamps": stamps}


def test_training_over_the_cache_gives_the_uncached_vectors(runs: dict) -> None:
    seed_everything(7)
    initial = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False).model.vectors
    plain, cached = runs["plain"].model, runs["first"].model
    moved = (plain.vectors - initial).abs().max().item()
    diff = (plain.vectors - cached.vectors).abs().max().item()
    assert moved > 0.05, "training did not move the vectors; the comparison would be vacuous"
    assert diff < 2e-3 * max(1.0, plain.vectors.abs().max().item()), f"cached training differs by {diff}"
    assert diff < 0.05 * moved
    torch.testing.assert_close(cached.layer_logits, plain.layer_logits, atol=2e-3, rtol=0)


def test_a_second_run_reads_the_store_and_repeats_the_first_exactly(runs: dict, mvtec_like_root: Path) -> None:
    assert len(runs["dirs"]) == 1
    files = sorted(runs["dirs"][0].glob("*.safetensors"))
    assert len(files) == len(list(mvtec_like_root.glob("*/test/*/*.png")))  # one item per training image
    assert {p: p.stat().st_mtime_ns for p in files} == runs["stamps"], "items were re-extracted"
    assert not list(runs["dirs"][0].glob("*.tmp-*"))
    torch.testing.assert_close(runs["second"].model.vectors, runs["first"].model.vectors, rtol=0, atol=0)


def _store_for(model: LearnableVectors, dm: CrossDataset, root: Path) -> tuple[FeatureStore, list[str], list]:
    trainer = Trainer(accelerator="cpu", logger=False)
    callback = FeatureCache(str(root))
    dm.setup("fit")
    trainer.strategy.connect(model)
    store = FeatureStore(root, callback.identity(trainer, model, dm.train_data))
    sources = describe_dataset(dm.train_data)
    return store, [store.item_key(s) for s in sources], sources


def test_the_key_changes_with_everything_that_determines_the_features(
    tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path
) -> None:
    def key(**kwargs) -> str:
        model = LearnableVectors(backbone="tiny", weights="random", evaluator=False, **{"image_size": 98, **kwargs})
        return _store_for(model, _datamodule(mvtec_like_root, mvtec_like_root_b), tmp_path)[0].key

    base = key()
    assert key() == base  # deterministic
    assert key(lr=0.5, sigma=1.0) == base  # head settings do not change the frozen features
    assert key(layers=(6, 24)) != base
    assert key(image_size=112) != base
    assert key(global_ln_post=False) != base
    assert key(dpam_start=20) != base
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    with torch.no_grad():
        model.backbone.vision.encoder.layers[3].mlp.fc1.weight.add_(1e-3)  # other weights, same name
    assert _store_for(model, _datamodule(mvtec_like_root, mvtec_like_root_b), tmp_path)[0].key != base


def test_a_changed_image_invalidates_only_its_item(tmp_path: Path, mvtec_like_root_b: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(mvtec_like_root_b, root)
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    store, keys, sources = _store_for(model, _datamodule(root, root), tmp_path / "cache")
    changed = Path(sources[5].image_path)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    _, new_keys, _ = _store_for(model, _datamodule(root, root), tmp_path / "cache")
    assert [i for i, (a, b) in enumerate(zip(keys, new_keys, strict=True)) if a != b] == [5]


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path: Path, mvtec_like_root_b: Path) -> None:
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    dm = _datamodule(mvtec_like_root_b, mvtec_like_root_b)
    store, keys, sources = _store_for(model, dm, tmp_path / "cache")
    calls = []

    def dying_encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return model.model.encode(images)

    common = {"transform": model.pre_processor.transform, "batch_size": 4, "collate_fn": dm.train_data.collate_fn}
    with pytest.raises(KeyboardInterrupt):
        extract_missing(store, dm.train_data, sources, keys, dying_encode, **common)
    assert sum(store.has(k) for k in keys) == 8 and not list(store.directory.glob("*.tmp-*"))
    calls.clear()
    done = extract_missing(store, dm.train_data, sources, keys, model.model.encode, **common)
    assert done == len(keys) - 8 and all(store.has(k) for k in keys)
    # Stored items are what the encoder gives for the pre-processed image (fp16), with mask and label.
    item = store.read(keys[10])
    raw = dm.train_data[10]
    image, mask = model.pre_processor.transform(Image(raw.image.unsqueeze(0)), Mask(raw.gt_mask.unsqueeze(0)))
    expected = model.model.encode(image)
    assert item["features"]["patches"].dtype == torch.float32  # restored to the encoder's dtype
    torch.testing.assert_close(item["features"]["patches"], expected["patches"][0], atol=2e-3, rtol=2e-3)
    assert item["gt_mask"].shape == (98, 98) and item["gt_mask"].any()
    assert torch.equal(item["gt_mask"], mask[0].bool()) and item["gt_label"] == int(raw.gt_label) == 1
    batch = collate_cached([store.read(k) for k in keys[:3]])
    assert batch.features["patches"].shape == (3, 4, 49, 16) and batch.image_size == (98, 98) and batch.image is None


def test_random_training_data_is_refused(tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path) -> None:
    seed_everything(7)
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False,
                             feature_cache=str(tmp_path))
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FeatureCacheError, match="mosaic"):
        trainer.fit(model, datamodule=_datamodule(mvtec_like_root, mvtec_like_root_b, mosaic_probability=0.2))
