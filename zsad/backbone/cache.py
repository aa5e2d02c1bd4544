"""Frozen-feature cache: run the frozen encoder once per training image and train the learnable head over its output.

Every zsad method whose trainable parts sit after the frozen CLIP encoder splits its torch model into
``encode(images) -> dict[str, Tensor]`` (frozen, no grad) and ``forward_features(features, image_size)`` (the
learnable head). The encoder output of a fixed image under a fixed pre-processing never changes, so re-running the
1 TFLOP ViT-L/14 forward every epoch is wasted work: this module stores it on disk once and replays it.

Pieces:

* :class:`FeatureStore` — one directory per *feature identity* (everything that determines the features: the
  method's encoder class and settings, the backbone identity and a fingerprint of its weights, the model
  pre-processing, the dataset-side transforms, the Lightning precision, the store dtype), holding one safetensors
  file per image keyed by the image and mask files' path + size + mtime (or content hash) and label. Changing any of
  these gives a different key, so stale features are never read (invalidation by construction). Files are written to
  a temporary name and renamed (atomic), so an interrupted extraction leaves only complete items and the next run
  extracts the rest (resume).
* :class:`FeatureCache` — a Lightning :class:`~lightning.pytorch.Callback`: at ``fit`` it extracts the missing items
  of the datamodule's training set with the model's own pre-processor and ``encode`` (with the trainer's precision),
  then hands Lightning a loader over the stored features that keeps the original loader's sampler, batch size and
  ``drop_last`` — the same seed visits the same batches in the same order, so training with the cache gives the
  uncached result up to the store's fp16 rounding. Batches are :class:`CachedFeatureBatch` (no pixels at all), so an
  epoch costs only the learnable head.

Opting in is one flag: a zsad method with a ``feature_cache`` argument attaches the callback itself
(``--model.init_args.feature_cache=.zsad_cache``); any Lightning run can also add it explicitly
(``--trainer.callbacks+=zsad.backbone.cache.FeatureCache --trainer.callbacks.cache_dir=.zsad_cache``). The module
only needs ``model.encode``/``model.forward_features`` and a ``compute_loss`` that reads features through
``ZSADModule.batch_features`` (``supports_feature_cache = True``).

Only training uses the cache: validation and test always run the encoder (the target domain is scored once).
Datasets with per-epoch randomness (random augmentations, mosaics, synthetic anomalies) are refused, because cached
features would freeze one draw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision.tv_tensors import Mask

from zsad.atomic import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

#: Bump when the on-disk layout or the meaning of a key changes (old stores are then ignored, never misread).
CACHE_FORMAT_VERSION = 1
#: Temporary files older than this are leftovers of a killed extraction and are removed.
STALE_TMP_SECONDS = 600.0
_FEATURE_PREFIX = "f."
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class FeatureCacheError(RuntimeError):
    """The run cannot use the feature cache (no datamodule, a random dataset, a method without ``encode``)."""


# --------------------------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------------------------


def stable_hash(obj: object, length: int = 20) -> str:
    """Hex SHA-256 of the canonical JSON of ``obj`` (dict keys sorted; unknown objects by ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_signature(path: str | os.PathLike | None, content_hash: bool = False) -> dict[str, object] | None:
    """What identifies a file's content: absolute path, size and mtime (ns), or its SHA-256 with ``content_hash``."""
    if path is None or (isinstance(path, float)) or str(path) in ("", "nan", "None"):
        return None
    p = Path(path).expanduser().resolve()
    stat = p.stat()
    signature: dict[str, object] = {"path": str(p), "size": stat.st_size}
    if content_hash:
        signature["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    else:
        signature["mtime_ns"] = stat.st_mtime_ns
    return signature


def module_fingerprint(module: nn.Module, per_tensor: int = 64) -> str:
    """Cheap fingerprint of a module's weights: names, shapes and the first ``per_tensor`` values of every tensor.

    Distinguishes two random seeds, two checkpoints or a changed layer without hashing 1.2 GB.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        head = tensor.detach().flatten()[:per_tensor].to("cpu", torch.float64)
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class ItemSource:
    """The files one dataset item is read from, as the dataset's sample table names them."""

    image_path: str
    mask_path: str | None = None
    label: int | None = None
    category: str | None = None


def _clean(value: object) -> object:
    # pandas turns None into NaN in mixed columns.
    if value is None or (isinstance(value, float) and value != value) or value == "":  # noqa: PLR0124 - NaN test
        return None
    return value


def describe_dataset(dataset: Dataset) -> list[ItemSource] | None:
    """The files behind each index of a map-style dataset, or ``None`` if the dataset does not say.

    Understands anomalib datasets (a ``samples`` table with ``image_path``, ``mask_path``, ``label_index``,
    ``category``), ``ConcatDataset`` and ``Subset``.
    """
    if isinstance(dataset, Subset):
        inner = describe_dataset(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [describe_dataset(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return None
    out = []
    for row in samples.itertuples(index=False):
        label = _clean(getattr(row, "label_index", None))
        category = _clean(getattr(row, "category", None))
        mask = _clean(getattr(row, "mask_path", None))
        out.append(
            ItemSource(
                image_path=str(row.image_path),
                mask_path=None if mask is None else str(mask),
                label=None if label is None else int(label),
                category=None if category is None else str(category),
            ),
        )
    return out


def _leaf_datasets(dataset: Dataset) -> Iterator[Dataset]:
    if isinstance(dataset, Subset):
        yield from _leaf_datasets(dataset.dataset)
    elif isinstance(dataset, ConcatDataset):
        for d in dataset.datasets:
            yield from _leaf_datasets(d)
    else:
        yield dataset


def dataset_transform_identity(dataset: Dataset) -> list[str]:
    """``repr`` of the dataset-side transforms (anomalib ``augmentations`` / ``transform``) of every leaf dataset.

    Raises:
        FeatureCacheError: If a leaf dataset draws something at random per epoch (random augmentations, mosaics,
            synthetic anomalies): its features are not fixed, so they cannot be cached.
    """
    reprs = []
    for leaf in _leaf_datasets(dataset):
        transform = getattr(leaf, "augmentations", None) or getattr(leaf, "transform", None)
        text = repr(transform)
        random_parts = []
        if "Random" in text:
            random_parts.append(f"random augmentations {text}")
        if float(getattr(leaf, "mosaic_probability", 0.0) or 0.0) > 0:
            random_parts.append("mosaic_probability > 0")
        if getattr(leaf, "anomalies", None) is not None:
            random_parts.append("synthetic anomalies")
        if random_parts:
            msg = (
                f"The training set of {type(leaf).__name__} draws {', '.join(random_parts)} every epoch, so its "
                "encoder features are not fixed and cannot be cached. Train without the feature cache "
                "(drop --model.init_args.feature_cache / the FeatureCache callback) or remove the randomness."
            )
            raise FeatureCacheError(msg)
        reprs.append(text)
    return reprs


# --------------------------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------------------------


class FeatureStore:
    """A directory of per-item safetensors files for one feature identity.

    Layout: ``<root>/<identity hash>/identity.json`` (the identity in clear, for humans) and
    ``<root>/<identity hash>/<item key>.safetensors`` holding ``f.<name>`` feature tensors (``dtype``), ``gt_mask``
    (bool ``[H, W]``, absent when the item has none), ``gt_label`` (0-d int64), ``image_size`` (int64 ``[2]``) and
    metadata ``image_path``, ``category``, ``feature_dtypes`` (the encoder's dtypes, restored on read).

    Args:
        root: Cache root (e.g. ``.zsad_cache``); shared by any number of identities and datasets.
        identity: Everything that determines the features (JSON-serialisable).
        dtype: Storage dtype of floating features (``float16`` halves the 8.4 MB per ViT-L image at 518 px).
        content_hash: Key image and mask files by their SHA-256 instead of size + mtime.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        identity: dict[str, Any],
        dtype: str = "float16",
        content_hash: bool = False,
    ) -> None:
        if dtype not in _DTYPES:
            msg = f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}."
            raise ValueError(msg)
        self.root = Path(root).expanduser()
        self.dtype = dtype
        self.content_hash = content_hash
        self.identity = {"format": CACHE_FORMAT_VERSION, "dtype": dtype, **identity}
        self.key = stable_hash(self.identity)
        self.directory = self.root / self.key

    # -- keys -------------------------------------------------------------------------------------------------------

    def item_key(self, source: ItemSource) -> str:
        """Key of one item: its image and mask file signatures and label."""
        return stable_hash(
            {
                "image": file_signature(source.image_path, self.content_hash),
                "mask": file_signature(source.mask_path, self.content_hash),
                "label": source.label,
            },
            length=24,
        )

    def path(self, item_key: str) -> Path:
        """File of an item."""
        return self.directory / f"{item_key}.safetensors"

    def has(self, item_key: str) -> bool:
        """Whether an item is stored (files appear only complete, by atomic rename)."""
        return self.path(item_key).is_file()

    # -- writing ----------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory, write ``identity.json`` and remove temporary files of killed extractions."""
        self.directory.mkdir(parents=True, exist_ok=True)
        identity_file = self.directory / "identity.json"
        if not identity_file.exists():
            atomic_write_text(identity_file, json.dumps(self.identity, indent=2, sort_keys=True, default=str))
        now = time.time()
        for tmp in self.directory.glob("*.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def write(
        self,
        item_key: str,
        features: dict[str, torch.Tensor],
        gt_label: int | None,
        gt_mask: torch.Tensor | None,
        image_size: tuple[int, int],
        image_path: str,
        category: str | None,
    ) -> None:
        """Store one item atomically (temporary file + rename)."""
        store_dtype = _DTYPES[self.dtype]
        tensors: dict[str, torch.Tensor] = {}
        dtypes = {}
        for name, value in features.items():
            value = value.detach().to("cpu")
            dtypes[name] = str(value.dtype).removeprefix("torch.")
            if value.is_floating_point():
                value = value.to(store_dtype)
            tensors[_FEATURE_PREFIX + name] = value.contiguous()
        if gt_mask is not None:
            tensors["gt_mask"] = gt_mask.detach().to("cpu", torch.bool).contiguous()
        tensors["gt_label"] = torch.tensor(-1 if gt_label is None else int(gt_label), dtype=torch.int64)
        tensors["image_size"] = torch.tensor(list(image_size), dtype=torch.int64)
        metadata = {
            "image_path": str(image_path),
            "category": "" if category is None else str(category),
            "feature_dtypes": json.dumps(dtypes),
        }
        with atomic_path(self.path(item_key)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    # -- reading ----------------------------------------------------------------------------------------------------

    def read(self, item_key: str) -> dict[str, Any]:
        """One stored item.

        Returns:
            ``features`` (encoder dtypes restored), ``gt_mask``, ``gt_label``, ``image_size``, ``image_path``,
            ``category``.
        """
        with safe_open(str(self.path(item_key)), framework="pt") as f:
            metadata = f.metadata() or {}
            dtypes = json.loads(metadata.get("feature_dtypes", "{}"))
            features = {}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name.startswith(_FEATURE_PREFIX):
                    key = name[len(_FEATURE_PREFIX) :]
                    value = f.get_tensor(name)
                    features[key] = value.to(getattr(torch, dtypes.get(key, str(value.dtype).removeprefix("torch."))))
            mask = f.get_tensor("gt_mask") if "gt_mask" in f.keys() else None  # noqa: SIM118
            label = int(f.get_tensor("gt_label"))
            size = tuple(int(v) for v in f.get_tensor("image_size"))
        return {
            "features": features,
            "gt_mask": mask,
            "gt_label": None if label < 0 else label,
            "image_size": size,
            "image_path": metadata.get("image_path", ""),
            "category": metadata.get("category") or None,
        }

    def size_bytes(self) -> int:
        """Bytes on disk of this identity's items."""
        return sum(p.stat().st_size for p in self.directory.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# Dataset and batch of stored features
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CachedFeatureBatch:
    """A training batch replayed from the store: encoder features instead of pixels.

    ``image`` is always ``None`` (anomalib's pre-processor passes it and the already-resized ``gt_mask`` through
    unchanged); ``image_size`` is the ``(H, W)`` the features were extracted at, which ``forward_features`` needs.
    """

    features: dict[str, torch.Tensor]
    image_size: tuple[int, int]
    gt_label: torch.Tensor | None = None
    gt_mask: torch.Tensor | None = None
    image_path: list[str] = field(default_factory=list)
    category: list[str] | None = None
    image: None = None

    def __len__(self) -> int:
        """Batch size."""
        return next(iter(self.features.values())).shape[0]

    @property
    def batch_size(self) -> int:
        """Batch size."""
        return len(self)


class CachedFeatureDataset(Dataset):
    """Map-style dataset over stored items, index ``i`` = item ``i`` of the original training set."""

    def __init__(self, store: FeatureStore, item_keys: Sequence[str]) -> None:
        self.store = store
        self.item_keys = list(item_keys)

    def __len__(self) -> int:
        """Number of items."""
        return len(self.item_keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One stored item (see :meth:`FeatureStore.read`)."""
        return self.store.read(self.item_keys[index])


def collate_cached(items: list[dict[str, Any]]) -> CachedFeatureBatch:
    """Stack stored items into a :class:`CachedFeatureBatch` (missing masks become all-zero masks)."""
    sizes = {item["image_size"] for item in items}
    if len(sizes) != 1:
        msg = f"Cached items of one batch have different input sizes {sorted(sizes)}."
        raise FeatureCacheError(msg)
    (size,) = sizes
    features = {key: torch.stack([item["features"][key] for item in items]) for key in items[0]["features"]}
    masks = None
    if any(item["gt_mask"] is not None for item in items):
        masks = Mask(
            torch.stack([
                item["gt_mask"] if item["gt_mask"] is not None else torch.zeros(size, dtype=torch.bool)
                for item in items
            ]),
        )
    labels = None
    if all(item["gt_label"] is not None for item in items):
        labels = torch.tensor([item["gt_label"] for item in items], dtype=torch.long)
    categories = [item["category"] for item in items]
    return CachedFeatureBatch(
        features=features,
        image_size=size,
        gt_label=labels,
        gt_mask=masks,
        image_path=[item["image_path"] for item in items],
        category=None if any(c is None for c in categories) else categories,
    )


# --------------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------------


def extract_missing(
    store: FeatureStore,
    dataset: Dataset,
    sources: Sequence[ItemSource],
    item_keys: Sequence[str],
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    transform: Callable | None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    context: Callable[[], Any] | None = None,
) -> int:
    """Encode and store every item whose key is not in the store yet; returns how many were extracted.

    Items are written one by one as soon as their batch is encoded, so a killed extraction resumes where it stopped.
    The global RNG state is left untouched (the loader's draws happen under ``fork_rng``), so a run that extracts
    and a run that finds everything cached shuffle their training batches identically.

    Args:
        store: Destination.
        dataset: The original (pixel) dataset, items returned in the order of ``sources``.
        sources: :func:`describe_dataset` of ``dataset``.
        item_keys: ``store.item_key(source)`` per index.
        encode: The frozen encoder, ``images -> {name: [B, ...]}``.
        transform: The model-side pre-processing, ``transform(image, mask) -> (image, mask)`` (anomalib
            ``PreProcessor.transform``), or ``None``.
        device: Where ``encode`` runs.
        batch_size: Extraction batch size.
        num_workers: Data-loader workers for reading the images.
        collate_fn: The dataset's collate function.
        context: Factory of a context manager around ``encode`` (e.g. the trainer's precision autocast).
    """
    missing = [i for i, key in enumerate(item_keys) if not store.has(key)]
    store.prepare()
    if not missing:
        return 0
    rank_zero_info(
        f"Feature cache: encoding {len(missing)} of {len(item_keys)} training images once into {store.directory} "
        f"({len(item_keys) - len(missing)} already there).",
    )
    loader = DataLoader(
        Subset(dataset, missing),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    done = 0
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for batch in loader:
            images, masks = batch.image, batch.gt_mask
            if transform is not None:
                images, masks = transform(images, masks)
            with context() if context is not None else nullcontext():
                features = encode(images.to(device))
            size = tuple(int(s) for s in images.shape[-2:])
            paths = list(getattr(batch, "image_path", None) or [None] * len(images))
            categories = getattr(batch, "category", None)
            labels = getattr(batch, "gt_label", None)
            for j in range(len(images)):
                index = missing[done + j]
                expected = sources[index].image_path
                if paths[j] is not None and Path(paths[j]).resolve() != Path(expected).resolve():
                    msg = f"Dataset item {index} is {paths[j]} but its sample table says {expected}."
                    raise FeatureCacheError(msg)
                store.write(
                    item_keys[index],
                    {name: value[j] for name, value in features.items()},
                    gt_label=None if labels is None else int(labels[j]),
                    gt_mask=None if masks is None else masks[j],
                    image_size=size,
                    image_path=expected,
                    category=categories[j] if categories is not None else sources[index].category,
                )
            done += len(images)
    rank_zero_info(
        f"Feature cache: {done} images encoded in {time.perf_counter() - start:.1f} s "
        f"({store.size_bytes() / 2**20:.1f} MiB in {store.directory}).",
    )
    return done


# --------------------------------------------------------------------------------------------------------------------
# Lightning callback
# --------------------------------------------------------------------------------------------------------------------


class FeatureCache(Callback):
    """Train over stored frozen-encoder features instead of pixels (opt-in, ``fit`` only).

    At ``fit`` the datamodule's ``train_dataloader`` is wrapped: the first call extracts what the store lacks, then
    returns a loader over the stored features with the original loader's sampler, batch size and ``drop_last``.
    The module must expose ``model.encode``/``model.forward_features`` and read features with
    ``batch_features(batch)`` (zsad methods with ``supports_feature_cache = True``).

    Args:
        cache_dir: Cache root directory (created on demand; safe to delete at any time).
        dtype: Storage dtype of the features (``float16`` default; ``float32`` for bit-exact replay).
        content_hash: Key image files by content hash instead of path + size + mtime (slower, survives copies).
        extraction_batch_size: Batch size of the one-off extraction (default: the training loader's).
    """

    def __init__(
        self,
        cache_dir: str = ".zsad_cache",
        dtype: str = "float16",
        content_hash: bool = False,
        extraction_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            msg = f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}."
            raise ValueError(msg)
        self.cache_dir = cache_dir
        self.dtype = dtype
        self.content_hash = content_hash
        self.extraction_batch_size = extraction_batch_size
        self.store: FeatureStore | None = None
        self._patched = None

    @staticmethod
    def _check_module(pl_module: LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        if model is None or not (hasattr(model, "encode") and hasattr(model, "forward_features")):
            msg = (
                f"{type(pl_module).__name__} has no `model.encode` / `model.forward_features` split, so the frozen "
                "features cannot be cached."
            )
            raise FeatureCacheError(msg)
        if not getattr(pl_module, "supports_feature_cache", False):
            msg = f"{type(pl_module).__name__} does not read cached features (supports_feature_cache is False)."
            raise FeatureCacheError(msg)
        return model

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Wrap the datamodule's ``train_dataloader`` for ``fit``."""
        if stage != "fit":
            return
        self._check_module(pl_module)
        datamodule = trainer.datamodule
        if datamodule is None:
            msg = "The feature cache needs a LightningDataModule (trainer.fit(model, datamodule=...))."
            raise FeatureCacheError(msg)
        datamodule.__dict__.pop("train_dataloader", None)  # a wrapper left by an interrupted fit
        original = datamodule.train_dataloader
        # Shadow the bound method on this instance only; Lightning asks `trainer.datamodule.train_dataloader()`.
        datamodule.train_dataloader = lambda: self.cached_loader(original(), trainer, pl_module)
        self._patched = datamodule

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: ARG002
        """Restore the datamodule's own ``train_dataloader``."""
        if self._patched is not None:
            self._patched.__dict__.pop("train_dataloader", None)
            self._patched = None

    def identity(self, trainer: Trainer, pl_module: LightningModule, dataset: Dataset) -> dict[str, Any]:
        """Everything that determines the stored features."""
        model = self._check_module(pl_module)
        pre_processor = getattr(pl_module, "pre_processor", None)
        transform = getattr(pre_processor, "transform", None)
        encode_config = model.encode_config() if hasattr(model, "encode_config") else dict(pl_module.hparams)
        backbone = getattr(model, "backbone", None)
        return {
            "encoder": f"{type(model).__module__}.{type(model).__qualname__}",
            "encode": encode_config,
            "backbone": backbone.identity() if hasattr(backbone, "identity") else None,
            "weights": module_fingerprint(backbone if backbone is not None else model),
            "pre_processing": repr(transform),
            "dataset_transforms": dataset_transform_identity(dataset),
            "precision": str(trainer.precision),
        }

    def cached_loader(self, loader: DataLoader, trainer: Trainer, pl_module: LightningModule) -> DataLoader:
        """Extract what is missing, then a loader over the store that batches like ``loader``."""
        dataset = loader.dataset
        sources = describe_dataset(dataset)
        if sources is None:
            msg = (
                f"The training dataset {type(dataset).__name__} does not list its files (an anomalib `samples` "
                "table), so cached features could not be matched to images."
            )
            raise FeatureCacheError(msg)
        store = FeatureStore(
            self.cache_dir,
            self.identity(trainer, pl_module, dataset),
            dtype=self.dtype,
            content_hash=self.content_hash,
        )
        item_keys = [store.item_key(source) for source in sources]
        pre_processor = getattr(pl_module, "pre_processor", None)
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Under DDP the first rank extracts while the others wait, then every rank reads the same store.
            if trainer.is_global_zero:
                extract_missing(
                    store,
                    dataset,
                    sources,
                    item_keys,
                    encode=pl_module.model.encode,
                    transform=getattr(pre_processor, "transform", None),
                    device=pl_module.device,
                    batch_size=self.extraction_batch_size or loader.batch_size or 8,
                    num_workers=loader.num_workers,
                    collate_fn=loader.collate_fn,
                    context=trainer.precision_plugin.forward_context,
                )
            trainer.strategy.barrier("zsad_feature_cache")
        finally:
            pl_module.train(was_training)
        absent = [key for key in item_keys if not store.has(key)]
        if absent:
            msg = f"{len(absent)} items are missing from {store.directory} after extraction (shared storage?)."
            raise FeatureCacheError(msg)
        self.store = store
        cached = CachedFeatureDataset(store, item_keys)
        if loader.batch_size is None:  # a custom batch sampler: replay it as is
            return DataLoader(cached, batch_sampler=loader.batch_sampler, collate_fn=collate_cached)
        return DataLoader(
            cached,
            batch_size=loader.batch_size,
            sampler=loader.sampler,
            drop_last=loader.drop_last,
            collate_fn=collate_cached,
            generator=loader.generator,
        )
