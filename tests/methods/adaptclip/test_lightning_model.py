"""AdaptCLIP's Lightning glue without a Trainer run: k-shot scoring of mixed-category batches and reference caching."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from zsad.data import ZSADBatch
from zsad.methods.adaptclip import AdaptCLIP

SIZE = 98


class _References:
    """A datamodule stand-in answering ``few_shot_references`` with fixed images per category, counting calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.images = {
            c: torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
            for i, c in enumerate(("a", "b"))
        }

    def few_shot_references(self, category: str, k: int, seed: int) -> SimpleNamespace:
        self.calls.append((category, k, seed))
        return SimpleNamespace(image=self.images[category][:k])


def _batch(categories: list[str], seed: int) -> ZSADBatch:
    image = torch.randn(len(categories), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return ZSADBatch(image=image, gt_label=torch.zeros(len(categories), dtype=torch.long), category=categories)


def test_mixed_category_batches_use_each_category_references_fetched_once() -> None:
    module = AdaptCLIP(backbone="tiny", weights="random", image_size=SIZE, k_shot=2, reference_seed=20, evaluator=False)
    module.eval()
    data = _References()
    module.trainer = SimpleNamespace(datamodule=data)
    with torch.no_grad():
        first = module.predict_batch(_batch(["a", "b", "a"], seed=1))
        second = module.predict_batch(_batch(["b", "b"], seed=2))
        # Independent reference: each sample alone against its own category's two normalised references.
        for batch, pred in ((_batch(["a", "b", "a"], seed=1), first), (_batch(["b", "b"], seed=2), second)):
            for i, category in enumerate(batch.category):
                refs = module.model.encode_references(module.pre_processor.transform(data.images[category][:2]))
                alone = module.model(batch.image[i : i + 1], refs)
                torch.testing.assert_close(pred.pred_score[i : i + 1], alone.pred_score, atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(pred.anomaly_map[i : i + 1], alone.anomaly_map, atol=1e-6, rtol=1e-5)
    assert data.calls == [("a", 2, 20), ("b", 2, 20)]  # once per category across batches, with k and the seed
    # A new test run draws afresh.
    module.on_test_start()
    with torch.no_grad():
        module.predict_batch(_batch(["a"], seed=3))
    assert data.calls[-1] == ("a", 2, 20) and len(data.calls) == 3
