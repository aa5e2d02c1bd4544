"""Offline-safe pretrained assets of anomalib's own models (PatchCore, EfficientAD, any timm-backbone model).

anomalib downloads what its models need at run time: timm backbone weights when the model is built (PatchCore's
``wide_resnet50_2``), EfficientAD's teacher weights and the Imagenette penalty images when training starts. Offline
that fails deep inside a download with a network trace. :func:`ensure_model_assets` checks the same files first and
raises one :class:`~zsad.backbone.cnn.PretrainedWeightsError` that names each missing file, where to get it and the
folder to put it in. Online, missing files are fetched through the libraries' own download functions first.

``zsad fit|validate|test|predict`` call it on the model's config before building the model (``zsad.cli``); with
anomalib's ``Engine``, call it yourself::

    ensure_model_assets("anomalib.models.EfficientAd", {"imagenet_dir": "datasets/imagenette"}, fitting=True)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zsad.backbone.cnn import PretrainedWeightsError

__all__ = ["efficientad_assets", "ensure_model_assets", "ensure_timm_weights"]

#: Weight files timm looks for in a Hugging Face model repository, in its order of preference.
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in {"1", "true", "yes"} for name in ("HF_HUB_OFFLINE", "ZSAD_OFFLINE"))


def _resolve_class(class_path: str | type) -> type | None:
    if isinstance(class_path, type):
        return class_path
    module_name, _, name = str(class_path).rpartition(".")
    if not module_name:
        return None
    try:
        module = __import__(module_name, fromlist=[name])
    except ImportError:
        return None
    return getattr(module, name, None)


def _init_arg(cls: type, init_args: Mapping[str, Any], name: str) -> Any:  # noqa: ANN401
    """An init argument from the config, else the class's default (``inspect.Parameter.empty`` if none)."""
    if name in init_args and init_args[name] is not None:
        return init_args[name]
    parameter = inspect.signature(cls.__init__).parameters.get(name)
    return parameter.default if parameter is not None else inspect.Parameter.empty


def ensure_timm_weights(name: str) -> None:
    """Make sure timm can load the pretrained weights of ``name`` (e.g. ``wide_resnet50_2``) without a network.

    timm reads them from the Hugging Face hub cache (``timm/<model>.<tag>``). Missing there: downloaded when online,
    else :class:`PretrainedWeightsError` with the repository, the file and the cache folder.
    """
    import timm
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return  # not a hub-hosted timm model: nothing zsad can check
    repo = cfg.hf_hub_id
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in TIMM_HUB_FILES):
        return
    hint = (
        f"timm backbone {name!r}: pretrained weights {repo}/{TIMM_HUB_FILES[0]} are not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} and cannot be downloaded here. On a connected machine run "
        f"`huggingface-cli download {repo}` and copy the cache folder models--{repo.replace('/', '--')} into "
        f"{constants.HF_HUB_CACHE} (HF_HOME moves it), or set the model's pre_trained: false (random weights, tests "
        "only)."
    )
    if _offline():
        raise PretrainedWeightsError(hint)
    try:
        hf_hub_download(repo, TIMM_HUB_FILES[0])
    except Exception as err:  # noqa: BLE001 - whatever the network says, the user needs the same instructions
        raise PretrainedWeightsError(f"{hint} (download failed: {err})") from err


def efficientad_assets(model_size: str, imagenet_dir: str | Path) -> list[tuple[Path, str, str]]:
    """What anomalib's ``EfficientAd`` reads when training starts: ``[(path, download URL, what to do)]``.

    Args:
        model_size: ``"small"`` or ``"medium"`` (anomalib's ``EfficientAdModelSize`` value).
        imagenet_dir: The model's ``imagenet_dir`` (Imagenette, the penalty images).
    """
    from anomalib.models.image.efficient_ad.lightning_model import IMAGENETTE_DOWNLOAD_INFO, WEIGHTS_DOWNLOAD_INFO
    from anomalib.utils.path import get_pretrained_weights_dir

    size = getattr(model_size, "value", model_size)
    weights_dir = get_pretrained_weights_dir() / "efficientad_pretrained_weights"
    return [
        (
            weights_dir / f"pretrained_teacher_{size}.pth",
            WEIGHTS_DOWNLOAD_INFO.url,
            f"extract {Path(WEIGHTS_DOWNLOAD_INFO.url).name} into {weights_dir.parent} "
            f"(it creates {weights_dir.name}/)",
        ),
        (
            Path(imagenet_dir),
            IMAGENETTE_DOWNLOAD_INFO.url,
            f"extract {IMAGENETTE_DOWNLOAD_INFO.name} so that {imagenet_dir}/imagenette2/<class>/... holds the images "
            "(any ImageFolder tree of natural images works)",
        ),
    ]


def _ensure_efficientad(init_args: Mapping[str, Any], cls: type) -> None:
    from anomalib.data.utils import download_and_extract
    from anomalib.models.image.efficient_ad.lightning_model import IMAGENETTE_DOWNLOAD_INFO, WEIGHTS_DOWNLOAD_INFO

    size = _init_arg(cls, init_args, "model_size")
    imagenet_dir = Path(_init_arg(cls, init_args, "imagenet_dir"))
    assets = efficientad_assets(size, imagenet_dir)
    teacher, imagenette = assets[0][0], assets[1][0]
    missing = [asset for asset in assets if not asset[0].exists()]
    if not missing:
        return
    errors = []
    if not _offline():  # anomalib's own downloads, where anomalib would do them, but failing here with instructions
        for path, info, target in (
            (teacher, WEIGHTS_DOWNLOAD_INFO, teacher.parent.parent),
            (imagenette, IMAGENETTE_DOWNLOAD_INFO, imagenette),
        ):
            if path.exists():
                continue
            try:
                download_and_extract(target, info)
            except Exception as err:  # noqa: BLE001
                errors.append(f"{info.url}: {err}")
        missing = [asset for asset in assets if not asset[0].exists()]
        if not missing:
            return
    lines = [
        f"EfficientAD needs files that are missing and cannot be downloaded here{' (offline)' if _offline() else ''}:"
    ]
    lines += [f"  - {path}: download {url} and {todo}" for path, url, todo in missing]
    lines += [f"  download failed: {e}" for e in errors]
    raise PretrainedWeightsError("\n".join(lines))


def ensure_model_assets(
    class_path: str | type, init_args: Mapping[str, Any] | None = None, fitting: bool = False
) -> None:
    """Check (and online, fetch) what an anomalib model downloads, before it is built or trained.

    Args:
        class_path: The model class or its import path (``anomalib.models.Patchcore``).
        init_args: Its init arguments from the config (defaults filled from the class signature).
        fitting: The model is about to be trained (EfficientAD's teacher and Imagenette are only read then).

    Raises:
        PretrainedWeightsError: Naming every missing file, its source and the folder to put it in.
    """
    cls = _resolve_class(class_path)
    if cls is None:
        return
    init_args = dict(init_args or {})
    backbone = _init_arg(cls, init_args, "backbone")
    pre_trained = _init_arg(cls, init_args, "pre_trained")
    if cls.__module__.startswith("anomalib.") and isinstance(backbone, str) and pre_trained is True:
        ensure_timm_weights(backbone)
    if fitting and cls.__name__ == "EfficientAd" and cls.__module__.startswith("anomalib."):
        _ensure_efficientad(init_args, cls)
