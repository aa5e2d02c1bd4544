"""Lightning glue for MuSc (Li et al., ICLR 2024): training-free, transductive, inside Lightning's test loop.

Spec ``shared/specs/baselines.md`` §4; official code xrli-U/MuSc (b76b93d).

A MuSc score depends on every test image of the category, so ``test_step`` / ``validation_step`` only encode and
store (``defers_predictions = True``). A category is scored as soon as it is complete — all of its images (counted
from the dataset's ``category`` column, summed over ranks) have been encoded — and at epoch end for whatever is
left; the scored batches then go to the evaluator (``pop_deferred_predictions``), which computes metrics as for any
other method. Only the categories in progress are held in memory.

Under DDP each rank stores its own images; when a category is complete every rank gathers the category's tokens
(de-duplicated by image path — the DistributedSampler pads with repeats — and put in sorted-path order), scores
*its own* images against all of them, and the image maxima are gathered for RsCIN over the whole category. The
numbers therefore equal the single-process ones.

Example:
    >>> from zsad.methods.musc import MuSc
    >>> model = MuSc(backbone="tiny", weights="random", image_size=98)
    >>> model.learning_type.value
    'zero_shot'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from zsad.backbone import DEFAULT_BACKBONE, create_backbone
from zsad.data.dataclasses import batch_categories
from zsad.methods.base import ZSADModule
from zsad.methods.musc.torch_model import MuScModel, stratified_subsets

FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class _StoredBatch:
    """A batch waiting for its scores, with its frozen features."""

    batch: Any
    categories: list[str]
    paths: list[str]
    tokens: list[torch.Tensor | None]  # per sample [L, P, C] (own storage, freed once copied for scoring)
    embedding: torch.Tensor  # [B, E]
    scores: list[torch.Tensor | None] = field(default_factory=list)
    maps: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.paths)
        self.maps = [None] * len(self.paths)

    @property
    def complete(self) -> bool:
        return all(score is not None for score in self.scores)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_objects(obj: Any) -> list[Any]:  # noqa: ANN401
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if _world_size() == 1:
        return [obj]
    out: list[Any] = [None] * _world_size()
    dist.all_gather_object(out, obj)
    return out


class MuSc(ZSADModule, AnomalibModule):
    """MuSc: mutual scoring of the unlabeled test images of each category, LNAMD features and RsCIN re-scoring.

    Args:
        backbone: CLIP hub id (default OpenAI ViT-L/14@336), local directory or shipped architecture (``tiny``).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (518; position embeddings bicubically interpolated, as open_clip).
        layers: 1-based layers of the raw residual tokens (``hidden_states[6, 12, 18, 24]``).
        r_list: LNAMD aggregation degrees (1, 3, 5).
        k_ratio: MSM averages the ``int(k_ratio·(N−1))`` smallest image distances (0.3); at least 1 (N ≤ 4 gives 0
            and NaN scores in the official code).
        k_list: RsCIN neighbourhood sizes: ``[1, 2, 3]`` MVTec AD (and the official default), ``[1, 8, 9]`` VisA;
            ``[0]`` or ``[]`` disables RsCIN (image score = maximum of the map).
        divide_num: Split each category into this many subsets stratified by defect folder and score each image
            within its subset only (memory and time / ``divide_num``; the official ``divide_num``). RsCIN still runs
            over the whole category.
        divide_seed: Seed of the subset split.
        ref_chunk: Reference images per distance block (memory ≈ ``4·G⁴·ref_chunk`` bytes; results do not depend
            on it).
        feature_dtype: ``"float16"`` (the official stores fp16 tokens from its autocast encoder), ``"bfloat16"`` or
            ``"float32"``; scoring is always float32 / float64.
        pre_processor: anomalib pre-processor or flag.
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    defers_predictions = True

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "pretrained",
        image_size: int = 518,
        layers: tuple[int, ...] = (6, 12, 18, 24),
        r_list: tuple[int, ...] = (1, 3, 5),
        k_ratio: float = 0.3,
        k_list: tuple[int, ...] = (1, 2, 3),
        divide_num: int = 1,
        divide_seed: int = 0,
        ref_chunk: int = 16,
        feature_dtype: str = "float16",
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = False,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
        if divide_num < 1:
            raise ValueError(f"divide_num must be >= 1, got {divide_num}")
        clip = create_backbone(
            backbone, weights=weights, image_size=image_size, pos_interpolation="bicubic", load_text=False
        )
        self.model = MuScModel(
            clip,
            layers=tuple(layers),
            r_list=tuple(r_list),
            k_ratio=k_ratio,
            k_list=tuple(k_list),
            ref_chunk=ref_chunk,
            feature_dtype=FEATURE_DTYPES[feature_dtype],
        )
        self.divide_num = int(divide_num)
        self.divide_seed = int(divide_seed)
        self._reset()

    # -- no training ------------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Refuse ``fit``: MuSc has nothing to learn."""
        msg = (
            "MuSc is training-free (zero-shot, transductive): there is nothing to fit. Run `zsad test -c "
            "configs/musc/mvtec.yaml` (or anomalib's Engine.test / Engine.validate)."
        )
        raise RuntimeError(msg)

    def configure_optimizers(self) -> None:
        """No optimiser: nothing is trainable."""
        return

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Refused: a score needs every image of the category, which ``predict`` does not gather."""
        msg = (
            "MuSc is transductive: an image's score depends on all test images of its category, so it runs through "
            "`zsad test` / `zsad validate`; for a list of images of one category call `MuSc(...).model(images)`."
        )
        raise NotImplementedError(msg)

    # -- storing ----------------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._stored: list[_StoredBatch] = []
        self._by_category: dict[str, list[tuple[_StoredBatch, int]]] = {}
        self._expected: dict[str, int] | None = None
        self._seen: dict[str, int] = {}
        self._done: set[str] = set()
        self._image_size: tuple[int, int] | None = None
        # DistributedSampler pads the last batches with repeats of the dataset's first images, possibly long after
        # their category was scored and freed: those few paths keep their results.
        self._repeatable: set[str] = set()
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _samples(dataloaders: Any) -> Any:  # noqa: ANN401
        """The anomalib samples table of the (single) dataloader's dataset, or ``None``."""
        if isinstance(dataloaders, list | tuple):
            if len(dataloaders) != 1:
                return None
            dataloaders = dataloaders[0]
        return getattr(getattr(dataloaders, "dataset", None), "samples", None)

    def _expected_counts(self, dataloaders: Any) -> dict[str, int] | None:  # noqa: ANN401
        """Images per category from the dataset's ``category`` column; ``None`` (score at epoch end) if unknown."""
        samples = self._samples(dataloaders)
        if samples is None or "category" not in getattr(samples, "columns", ()):
            return None
        return {str(k): int(v) for k, v in samples["category"].value_counts().items()}

    def _start(self, dataloaders: Any) -> None:  # noqa: ANN401
        self._reset()
        self._expected = self._expected_counts(dataloaders)
        samples = self._samples(dataloaders)
        world = _world_size()
        if self._expected is not None and world > 1 and "image_path" in samples.columns:
            # Padding repeats at most the first world_size - 1 samples of the (unshuffled) test set.
            self._repeatable = {str(path) for path in samples["image_path"].iloc[: world - 1]}

    def on_validation_epoch_start(self) -> None:
        """Empty store; read the category sizes of the validation set."""
        self._start(self.trainer.val_dataloaders)

    def on_test_epoch_start(self) -> None:
        """Empty store; read the category sizes of the test set."""
        self._start(self.trainer.test_dataloaders)

    def on_validation_epoch_end(self) -> None:
        """Free the features (the evaluator has taken the scores)."""
        self._reset()

    def on_test_epoch_end(self) -> None:
        """Free the features (the evaluator has taken the scores)."""
        self._reset()

    def _store(self, batch: Any) -> Any:  # noqa: ANN401
        if self._trainer is not None and self.trainer.sanity_checking:
            return batch  # the sanity check's few batches are no category
        paths = [
            None if p is None else str(p) for p in (getattr(batch, "image_path", None) or [None] * len(batch.image))
        ]
        if any(p is None for p in paths):
            msg = "MuSc needs each test image's path (image_path) to identify images across batches and processes."
            raise ValueError(msg)
        features = self.model.encode(batch.image)
        self._image_size = tuple(int(s) for s in batch.image.shape[-2:])
        # One tensor per sample (cloned out of the batch tensor) so each is freed as soon as its category is scored.
        tokens = [sample.clone() for sample in features["tokens"]]
        stored = _StoredBatch(batch, batch_categories(batch), paths, tokens, features["embedding"])
        self._stored.append(stored)
        for index, category in enumerate(stored.categories):
            if category in self._done:  # a sampler's padding repeat of an image scored earlier
                if paths[index] not in self._kept:
                    msg = (
                        f"MuSc: image {paths[index]} of category {category!r} arrived after the category was scored; "
                        "test sets must be read unshuffled (Lightning's default) so each category is complete once."
                    )
                    raise RuntimeError(msg)
                stored.scores[index], stored.maps[index] = self._kept[paths[index]]
                continue
            self._by_category.setdefault(category, []).append((stored, index))
            self._seen[category] = self._seen.get(category, 0) + 1
        self._score_complete_categories()
        return batch

    def validation_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Encode and store; scores come once the category is complete."""
        return self._store(batch)

    def test_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Encode and store; scores come once the category is complete."""
        return self._store(batch)

    # -- scoring ----------------------------------------------------------------------------------------------------

    def _score_complete_categories(self) -> None:
        """Score every category whose images have all been encoded (by all ranks; collective under DDP)."""
        if self._expected is None:
            return
        names = sorted(self._expected)
        counts = torch.tensor([self._seen.get(name, 0) for name in names], dtype=torch.long, device=self.device)
        if _world_size() > 1:
            # Every rank runs the same number of steps (DistributedSampler pads), so this collective is in lock-step.
            counts = self.all_gather(counts).reshape(-1, len(names)).sum(dim=0)
        for name, count in zip(names, counts.tolist(), strict=True):
            if name not in self._done and count >= self._expected[name]:
                self._score_category(name)

    def _score_category(self, category: str) -> None:
        """MuSc over one whole category; writes scores and maps of this rank's images (collective under DDP)."""
        records = self._by_category.pop(category, [])
        self._done.add(category)
        paths = [stored.paths[index] for stored, index in records]
        tokens, embedding, canonical = self._category_features(records)
        position = {path: i for i, path in enumerate(canonical)}
        subsets = stratified_subsets(canonical, self.divide_num, self.divide_seed)
        repeatable = {position[path] for path in canonical if path in self._repeatable}
        queries = sorted({position[path] for path in paths} | repeatable)
        image_size = self._image_size or (self.hparams.image_size, self.hparams.image_size)
        # Mixed precision is for the encoder only: LNAMD, distances and RsCIN run in float32/float64 as the official.
        with torch.autocast(device_type=self.device.type, enabled=False):
            maps = self.model.score_maps(tokens, image_size, queries=queries, subsets=subsets) if queries else None
        image_scores = torch.full((len(canonical),), float("nan"), dtype=torch.float64, device=embedding.device)
        local_max = maps.flatten(1).amax(dim=1).cpu() if maps is not None else torch.empty(0, dtype=torch.float64)
        for indices, values in _gather_objects((queries, local_max)):
            image_scores[indices] = values.to(image_scores.device)
        with torch.autocast(device_type=self.device.type, enabled=False):
            final = self.model.rescore(image_scores, embedding)
        row_of = {i: row for row, i in enumerate(queries)}
        for i in repeatable:
            self._kept[canonical[i]] = (final[i], maps[row_of[i]].float())
        for (stored, index), path in zip(records, paths, strict=True):
            stored.scores[index] = final[position[path]]
            stored.maps[index] = maps[row_of[position[path]]].float()

    def _category_features(
        self, records: list[tuple[_StoredBatch, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Tokens ``[N, L, P, C]`` and embeddings ``[N, E]`` of a whole category in sorted-path order, and the paths.

        Gathered from every rank under DDP and de-duplicated by path. Each stored sample is freed as soon as it is
        copied, so the category's tokens are held about once, not twice.
        """
        paths = [stored.paths[index] for stored, index in records]
        world = _world_size()
        all_paths = _gather_objects(paths)  # per rank
        canonical = sorted({path for rank_paths in all_paths for path in rank_paths})
        source: dict[str, tuple[int, int]] = {}
        for rank, rank_paths in enumerate(all_paths):
            for row, path in enumerate(rank_paths):
                source.setdefault(path, (rank, row))  # first occurrence in rank order
        if world == 1:
            sample = records[0][0].tokens[records[0][1]]
            tokens = sample.new_empty(len(canonical), *sample.shape)
            embedding = records[0][0].embedding.new_empty(len(canonical), records[0][0].embedding.shape[1])
            for i, path in enumerate(canonical):
                stored, index = records[source[path][1]]
                tokens[i] = stored.tokens[index]
                embedding[i] = stored.embedding[index]
                stored.tokens[index] = None
        else:
            most = max(len(rank_paths) for rank_paths in all_paths)
            shapes = [s for s in _gather_objects(self._token_shape(records)) if s is not None]
            token_shape, embed_dim = shapes[0]
            local_tokens = torch.zeros(most, *token_shape, dtype=self.model.feature_dtype, device=self.device)
            local_embedding = torch.zeros(most, embed_dim, dtype=torch.float32, device=self.device)
            for row, (stored, index) in enumerate(records):
                local_tokens[row] = stored.tokens[index]
                local_embedding[row] = stored.embedding[index]
                stored.tokens[index] = None
            gathered_tokens = self.all_gather(local_tokens)  # [W, most, L, P, C]
            gathered_embedding = self.all_gather(local_embedding)
            del local_tokens
            rows = [source[path] for path in canonical]
            tokens = torch.stack([gathered_tokens[rank, row] for rank, row in rows])
            embedding = torch.stack([gathered_embedding[rank, row] for rank, row in rows])
        for stored, index in records:
            stored.tokens[index] = None  # duplicates of a path, not copied
        return tokens, embedding, canonical

    @staticmethod
    def _token_shape(records: list[tuple[_StoredBatch, int]]) -> tuple[tuple[int, ...], int] | None:
        if not records:
            return None
        stored, index = records[0]
        return tuple(stored.tokens[index].shape), int(stored.embedding.shape[1])

    def pop_deferred_predictions(self, final: bool = False) -> list[Any]:
        """Batches whose every image is scored, in step order (``final``: score what is left first; collective).

        Returns:
            The stored batches with ``pred_score`` ``[B]`` and ``anomaly_map`` ``[B, H, W]`` (float32) filled in.
        """
        if final:
            pending = sorted({name for names in _gather_objects(sorted(self._by_category)) for name in names})
            for category in pending:
                self._score_category(category)
        ready, waiting = [], []
        for stored in self._stored:
            (ready if stored.complete else waiting).append(stored)
        self._stored = waiting
        out = []
        for stored in ready:
            scores = torch.stack([score.float() for score in stored.scores])
            maps = torch.stack(stored.maps)
            out.append(stored.batch.update(pred_score=scores.to(maps.device), anomaly_map=maps))
        return out
