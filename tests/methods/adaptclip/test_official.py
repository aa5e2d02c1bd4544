"""Import of official-layout AdaptCLIP checkpoints (gaobb/AdaptCLIP ``train.py``: textual/visual/pq learners)."""

from __future__ import annotations

import pytest
import torch

from zsad.backbone import create_backbone
from zsad.methods.adaptclip import AdaptCLIPModel, OfficialCheckpointError, load_official_checkpoint

SIZE = 98


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("tiny", weights="random", image_size=SIZE, pos_interpolation="bilinear")


def _bn(gen: torch.Generator, prefix: str, n: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(n, generator=gen) + 0.5,
        f"{prefix}.bias": torch.randn(n, generator=gen) * 0.1,
        f"{prefix}.running_mean": torch.randn(n, generator=gen) * 0.1,
        f"{prefix}.running_var": torch.rand(n, generator=gen) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(123),
    }


def official_state(backbone, seed: int = 0, n_ctx: int = 12, mid: int = 128) -> dict[str, dict[str, torch.Tensor]]:
    """An official-layout checkpoint written from the official module definitions (adaptcliplib/adaptclip.py)."""
    gen = torch.Generator().manual_seed(seed)
    width, dim = backbone.text_width, backbone.embed_dim
    ids = backbone.tokenizer([" ".join(["X"] * n_ctx) + "."])  # [SOT, x×12, ".", EOT, 0…]
    with torch.no_grad():
        emb = backbone.text.embeddings.token_embedding(ids)  # [1, 77, W]
    textual = {
        "ctx_pos": torch.randn(1, 1, n_ctx, width, generator=gen) * 0.02,
        "ctx_neg": torch.randn(1, 1, n_ctx, width, generator=gen) * 0.02,
    }
    for polarity in ("pos", "neg"):
        textual[f"token_prefix_{polarity}"] = emb[None, :, :1].clone()
        textual[f"token_suffix_{polarity}"] = emb[None, :, 1 + n_ctx :].clone()
        textual[f"tokenized_prompts_{polarity}"] = ids[None].int()
    visual = {}
    for branch in ("local_adater", "global_adapter"):  # sic: the official attribute is misspelt
        visual[f"{branch}.fc.0.weight"] = torch.randn(dim // 4, dim, generator=gen) * 0.2
        visual.update(_bn(gen, f"{branch}.fc.1", dim // 4))
        visual[f"{branch}.fc.3.weight"] = torch.randn(dim, dim // 4, generator=gen) * 0.2
    pq = {}
    for layer in range(4):
        pq.update(_bn(gen, f"sharebn.{layer}", dim))
    seg = {
        "0.weight": torch.randn(mid, dim, 3, 3, generator=gen) * 0.05,
        **{k.removeprefix("x."): v for k, v in _bn(gen, "x.1", mid).items()},
        "3.weight": torch.randn(mid, mid, 2, 2, generator=gen) * 0.05,
        "3.bias": torch.randn(mid, generator=gen) * 0.05,
        "4.weight": torch.randn(mid // 2, mid, 3, 3, generator=gen) * 0.05,
        **{k.removeprefix("x."): v for k, v in _bn(gen, "x.5", mid // 2).items()},
        "7.weight": torch.randn(mid // 2, mid // 2, 2, 2, generator=gen) * 0.05,
        "7.bias": torch.randn(mid // 2, generator=gen) * 0.05,
        "8.weight": torch.randn(2, mid // 2, 1, 1, generator=gen) * 0.05,
        "8.bias": torch.randn(2, generator=gen) * 0.05,
    }
    head = {
        "0.weight": torch.randn(mid, dim, generator=gen) * 0.1,
        **{k.removeprefix("x."): v for k, v in _bn(gen, "x.1", mid).items()},
        "3.weight": torch.randn(mid // 2, mid, generator=gen) * 0.1,
        **{k.removeprefix("x."): v for k, v in _bn(gen, "x.4", mid // 2).items()},
        "6.weight": torch.randn(2, mid // 2, generator=gen) * 0.1,
    }
    for layer in range(4):  # the official ModuleList holds the same head 4 times → 4 identical key copies
        pq.update({f"local_adapter.{layer}.{k}": v for k, v in seg.items()})
        pq.update({f"global_adapter.{layer}.{k}": v for k, v in head.items()})
    return {"textual_learner": textual, "visual_learner": visual, "pq_learner": pq}


def _set_directly(model: AdaptCLIPModel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Assign the same numbers module by module, without the converter."""
    t, v, p = state["textual_learner"], state["visual_learner"], state["pq_learner"]
    with torch.no_grad():
        model.textual.ctx_normal.copy_(t["ctx_pos"][0, 0])
        model.textual.ctx_abnormal.copy_(t["ctx_neg"][0, 0])
        for ours, theirs in (
            (model.visual.local_adapter, "local_adater"),
            (model.visual.global_adapter, "global_adapter"),
        ):
            ours.fc[0].weight.copy_(v[f"{theirs}.fc.0.weight"])
            ours.fc[3].weight.copy_(v[f"{theirs}.fc.3.weight"])
            bn = ours.fc[1]
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(v[f"{theirs}.fc.1.{name}"])
        pq = model.prompt_query
        for layer, bn in enumerate(pq.layer_norms):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(p[f"sharebn.{layer}.{name}"])
        for module, prefix in ((pq.seg_head, "local_adapter.0"), (pq.image_head, "global_adapter.0")):
            for name, tensor in module.state_dict().items():
                if not name.endswith("num_batches_tracked"):
                    tensor.copy_(p[f"{prefix}.{name}"])


def test_official_checkpoint_file_gives_the_outputs_of_directly_set_parameters(backbone, tmp_path) -> None:
    torch.manual_seed(0)
    loaded = AdaptCLIPModel(backbone).eval()
    torch.manual_seed(1)
    direct = AdaptCLIPModel(backbone).eval()
    state = official_state(backbone)
    path = tmp_path / "epoch_15.pth"
    torch.save(state, path)
    load_official_checkpoint(loaded, path)  # weights_only=True inside
    _set_directly(direct, state)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    refs = direct.encode_references(torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        for references in (None, refs):
            a = loaded.forward_features(loaded.encode(images), (SIZE, SIZE), references)
            b = direct.forward_features(direct.encode(images), (SIZE, SIZE), references)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    # And the imported values really differ from a fresh model's (the comparison is not vacuous).
    torch.manual_seed(0)
    fresh = AdaptCLIPModel(backbone).eval()
    assert not torch.equal(fresh.visual.local_adapter.fc[0].weight, loaded.visual.local_adapter.fc[0].weight)


def test_layout_errors_are_reported(backbone) -> None:
    model = AdaptCLIPModel(backbone)
    state = official_state(backbone)
    # Four copies of a shared head that disagree cannot be represented.
    broken = {g: dict(sd) for g, sd in state.items()}
    broken["pq_learner"]["local_adapter.3.8.bias"] = broken["pq_learner"]["local_adapter.3.8.bias"] + 1
    with pytest.raises(OfficialCheckpointError, match="differs between layers"):
        load_official_checkpoint(model, broken)
    missing = {g: dict(sd) for g, sd in state.items()}
    del missing["visual_learner"]["global_adapter.fc.3.weight"]
    with pytest.raises(OfficialCheckpointError, match="missing"):
        load_official_checkpoint(model, missing)
    extra = {g: dict(sd) for g, sd in state.items()}
    extra["pq_learner"]["compound_prompt.0"] = torch.zeros(1)
    with pytest.raises(OfficialCheckpointError, match="Unknown keys"):
        load_official_checkpoint(model, extra)
    with pytest.raises(OfficialCheckpointError, match="missing"):
        load_official_checkpoint(model, {"textual_learner": state["textual_learner"]})
    # Another backbone width: shapes do not fit.
    with pytest.raises(OfficialCheckpointError, match="shapes"):
        load_official_checkpoint(model, official_state(backbone, mid=64))


def test_unreadable_or_foreign_files_name_the_file(backbone, tmp_path) -> None:
    """Issue 15 (6c): a bare tensor, non-dict groups, garbage or NaN adapters gave torch errors without the file."""
    model = AdaptCLIPModel(backbone)
    state = official_state(backbone)
    cases = {
        "tensor.pth": (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor"),
        "groups.pth": (lambda p: torch.save({g: torch.zeros(2) for g in state}, p), "'textual_learner' is a Tensor"),
        "garbage.pth": (lambda p: p.write_bytes(b"\x00not a checkpoint" * 10), "truncated or corrupt"),
        "nan.pth": (
            lambda p: torch.save(
                {
                    **state,
                    "pq_learner": {
                        **state["pq_learner"],
                        "sharebn.0.weight": torch.full(state["pq_learner"]["sharebn.0.weight"].shape, float("nan")),
                    },
                },
                p,
            ),
            "non-finite",
        ),
    }
    for name, (write, reason) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(OfficialCheckpointError, match=reason) as error:
            load_official_checkpoint(model, path)
        assert name in str(error.value)
    # A truncated real checkpoint.
    good = tmp_path / "epoch_15.pth"
    torch.save(state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(OfficialCheckpointError, match=r"truncated\.pth.*truncated or corrupt"):
        load_official_checkpoint(model, truncated)
    load_official_checkpoint(model, good)  # the intact file still loads
