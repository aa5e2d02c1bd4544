"""Run the cells of an experiment: one LightningCLI run (or ``zsad benchmark``) per cell, in sequence, resumable.

Each cell runs ``zsad fit --test_after_fit true`` (trained methods) or ``zsad test`` (training-free ones) with the
method's config plus overrides that put everything the run writes into the cell's directory:
``--trainer.default_root_dir``, a CSV (or W&B) logger there, and ``ZSADEvaluator`` writing
``<cell>/results/metrics.json``. ``<cell>/cell.json`` records the cell's arguments, their hash, status, time and
error. A cell is finished when ``results/metrics.json`` exists and ``cell.json`` carries the same hash: a re-run
skips it, so an interrupted grid resumes where it stopped, and a changed config or override runs it again. A failed
cell is recorded (``status: failed`` and ``error.txt``) and the grid goes on; the next run retries it.

Cells run in this process by default: on a shared CPU box importing torch, transformers and anomalib costs more than
a smoke cell itself, and an exception (jsonargparse's ``SystemExit`` included) is caught per cell. ``isolate=True``
runs each cell as a ``python -m zsad.cli`` subprocess instead (log in ``<cell>/log.txt``), so that a crash, a CUDA
out-of-memory or leaked memory cannot take the rest of a long GPU grid with it.

``--smoke`` rewrites every cell generically: the tiny random CLIP at the spec's ``smoke.image_size`` (for models that
take ``backbone`` / ``weights`` / ``image_size``), generated datasets (``zsad.data.synthetic``) in place of the
spec's datasets, one epoch with few batches, no pictures; the method's ``smoke_overrides`` adapt models that are not
CLIP (a small random backbone for PatchCore). EfficientAD trains on two downloads (its teacher and Imagenette);
in smoke mode it gets stand-ins generated under ``<output>/smoke_assets`` (a random teacher with few channels, found
through ``XDG_CACHE_HOME`` where anomalib looks for the released one, and a folder of noise images), labelled there as
smoke-only. A real run never sees them and still fails offline with the error naming the files to download.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from zsad.atomic import atomic_write_text
from zsad.experiment.spec import Cell, ExperimentSpec

__all__ = [
    "CellResult",
    "cell_argv",
    "cell_dir",
    "config_hash",
    "make_smoke_data",
    "make_smoke_efficientad_assets",
    "run_cells",
]

#: Smoke trainer settings: the grid's plumbing in minutes (the numbers mean nothing).
SMOKE_TRAINER = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
)
#: Smoke model init arguments, passed only to models whose constructor takes them.
SMOKE_MODEL = {"backbone": "tiny", "weights": "random"}
DEFAULT_SMOKE_DATASETS = {
    "mvtec": {"generator": "mvtec", "domain": "a", "categories": ["alpha", "beta"]},
    "visa": {"generator": "mvtec", "domain": "b", "categories": ["gamma", "delta"]},
    "gogan": {"generator": "gogan"},
}
#: EfficientAD's smoke stand-ins: teacher width (the released teacher has 384) and the Imagenette stand-in's folder.
SMOKE_EFFICIENTAD_CHANNELS = 8
SMOKE_ASSETS = "smoke_assets"
_SMOKE_ASSETS_README = """Smoke-only stand-ins written by `zsad experiment run --smoke` for EfficientAD's two downloads.
They are NOT anomalib's released teacher and NOT Imagenette: numbers computed with them mean nothing.
  cache/anomalib/pre_trained/efficientad_pretrained_weights/pretrained_teacher_small.pth
      a randomly initialised {channels}-channel teacher (the smoke cells run with teacher_out_channels={channels}),
      found by anomalib through XDG_CACHE_HOME=<this folder>/cache, set for the EfficientAD smoke cells only
  imagenette/noise/*.png
      random-noise images in an ImageFolder tree, in place of Imagenette's penalty images
Real runs use ~/.cache/anomalib/pre_trained and the config's imagenet_dir (see configs/efficientad/*.yaml).
"""
_PLACEHOLDER = re.compile(r"\{(output|cell|smoke_data|seed|category)\}")
CellResult = dict[str, Any]


def cell_dir(output: Path, cell: Cell) -> Path:
    """``<output>/cells/<method>/<protocol>/seed<seed>``."""
    return output / "cells" / cell.id


def _substitute(text: str, values: dict[str, str]) -> str:
    # Only the known placeholders: YAML flow mappings such as `{dataset: mvtec, root: x}` stay untouched.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _model_class(config: Path) -> type | None:
    import importlib

    data = yaml.safe_load(config.read_text()) or {}
    class_path = (data.get("model") or {}).get("class_path", "")
    if not class_path:
        return None
    if "." not in class_path:
        import zsad.methods

        return getattr(zsad.methods, class_path, None)
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def _is_efficientad(config: Path) -> bool:
    cls = _model_class(config)
    return cls is not None and cls.__name__ == "EfficientAd" and cls.__module__.startswith("anomalib.")


def _init_args(config: Path) -> set[str]:
    cls = _model_class(config)
    return set(inspect.signature(cls.__init__).parameters) if cls is not None else set()


def _smoke_dataset(spec: ExperimentSpec, name: str) -> dict[str, Any]:
    datasets = {**DEFAULT_SMOKE_DATASETS, **(spec.smoke.get("datasets") or {})}
    if name not in datasets:
        raise ValueError(f"{spec.path}: smoke.datasets has no entry for dataset {name!r}; add one (generator: mvtec).")
    return datasets[name]


def _smoke_data_arg(spec: ExperimentSpec, name: str) -> str:
    """A CrossDataset source/target mapping for the generated copy of dataset ``name``."""
    info = _smoke_dataset(spec, name)
    root = f"{{smoke_data}}/{name}"
    if info.get("generator") == "gogan":
        return f"{{dataset: gogan, root: {root}}}"
    return f"{{dataset: mvtec, root: {root}, name: {name}}}"


def smoke_categories(spec: ExperimentSpec, dataset: str) -> list[str]:
    """Categories of the generated stand-in for ``dataset``."""
    from zsad.data.layouts import GOGAN_CATEGORIES

    info = _smoke_dataset(spec, dataset)
    if info.get("generator") == "gogan":
        return list(info.get("categories", GOGAN_CATEGORIES))
    return list(info.get("categories", ["alpha", "beta"]))


def _data_section(config: Path) -> dict[str, Any]:
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    return data if isinstance(data, dict) else {}


def smoke_datasets(cell: Cell) -> tuple[str | None, str]:
    """``(source, target)`` dataset names a smoke cell reads (``source`` ``None`` for one-dataset data modules).

    The config's data module decides, not the protocol: a cross-dataset config tested on a one-dataset protocol
    (AnomalyCLIP's MVTec-trained model on Gogan) still trains on its own source.
    """
    data = _data_section(cell.config)
    target = cell.protocol.target or cell.protocol.dataset
    if str(data.get("class_path", "")).endswith("CrossDataset"):
        train = (data.get("init_args") or {}).get("train") or {}
        source = cell.protocol.source or (train.get("dataset") if isinstance(train, dict) else None) or "mvtec"
        return source, target  # type: ignore[return-value]
    return None, target  # type: ignore[return-value]


def make_smoke_data(spec: ExperimentSpec, root: Path, names: Sequence[str]) -> Path:
    """Write the generated datasets ``names`` (once; a ``.done`` marker makes re-runs skip them)."""
    from zsad.data.synthetic import make_gogan_like, make_mvtec_like

    for name in sorted(set(names)):
        folder = root / name
        if (folder / ".done").exists():
            continue
        info = _smoke_dataset(spec, name)
        size = int(info.get("size", 64))
        seed = int(info.get("seed", sum(map(ord, name))))  # different images per dataset, the same every run
        counts = {
            "n_train": int(info.get("n_train", 4)),
            "n_test_good": int(info.get("n_test_good", 3)),
            "n_test_defect": int(info.get("n_test_defect", 1)),
        }
        if info.get("generator") == "gogan":
            make_gogan_like(folder, categories=smoke_categories(spec, name), size=size, seed=seed, **counts)
        else:
            make_mvtec_like(
                folder,
                categories=smoke_categories(spec, name),
                domain=info.get("domain", "a"),
                size=size,
                seed=seed,
                **counts,
            )
        (folder / ".done").write_text("generated by zsad experiment --smoke\n")
    return root


def make_smoke_efficientad_assets(root: Path) -> Path:
    """Write EfficientAD's smoke-only stand-ins under ``root`` once (see ``root/README.txt``); returns the cache root.

    anomalib reads the teacher from ``platformdirs.user_cache_path("anomalib")/pre_trained/...``; the smoke cells
    point ``XDG_CACHE_HOME`` at ``root/cache`` so the random teacher is found there and the user's real cache is
    never read or written.

    Raises:
        RuntimeError: The platform's cache folder does not follow ``XDG_CACHE_HOME`` (macOS, Windows).
    """
    import numpy as np
    import torch
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel
    from PIL import Image

    cache = root / "cache"
    if (root / ".done").exists():
        return cache
    with _environment({"XDG_CACHE_HOME": str(cache)}):
        from anomalib.utils.path import get_pretrained_weights_dir

        weights = get_pretrained_weights_dir() / "efficientad_pretrained_weights"
    if not weights.resolve().is_relative_to(cache.resolve()):
        msg = (
            f"EfficientAD smoke stand-ins: anomalib's cache folder ({weights}) does not follow XDG_CACHE_HOME on this "
            "platform, so a random teacher cannot be provided without touching the real cache; leave EfficientAD out "
            "of the smoke run (--methods) or run on Linux."
        )
        raise RuntimeError(msg)
    weights.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = EfficientAdModel(teacher_out_channels=SMOKE_EFFICIENTAD_CHANNELS, model_size="small").teacher
    torch.save(teacher.state_dict(), weights / "pretrained_teacher_small.pth")
    noise = root / "imagenette" / "noise"
    noise.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(noise / f"{i}.png")
    (root / "README.txt").write_text(_SMOKE_ASSETS_README.format(channels=SMOKE_EFFICIENTAD_CHANNELS))
    (root / ".done").write_text("generated by zsad experiment --smoke\n")
    return cache


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (in-process cells), restoring the previous values after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cell_argv(spec: ExperimentSpec, cell: Cell, smoke: bool, wandb_project: str | None = None) -> list[str]:
    """The cell's command line with ``{output}``, ``{cell}``, ``{smoke_data}``, ``{category}`` placeholders.

    Placeholders keep the hash independent of where the output folder lives (cells computed on another machine
    and copied here are still recognised as finished).
    """
    config = str(cell.config)
    if spec.kind == "benchmark":
        argv = ["benchmark", "--config", config, "--weights", "random", "--json", "{cell}/results/benchmark.json"]
        if smoke:
            size = str(spec.smoke.get("image_size", 98))
            argv += ["--backbone", "tiny", "--image_size", size, "--batches", "1", "--warmup", "0", "--threads", "1"]
        return [*argv, *cell.method.overrides, *(cell.method.smoke_overrides if smoke else ())]
    argv = [cell.method.command, "--config", config, f"--seed_everything={cell.seed}"]
    if cell.method.command == "fit":
        argv.append("--test_after_fit=true")
    argv += [
        "--trainer.default_root_dir={cell}",
        "--model.init_args.evaluator=zsad.metrics.ZSADEvaluator",
        "--model.init_args.evaluator.init_args.output_dir={cell}/results",
        "--trainer.enable_progress_bar=false",
    ]
    if wandb_project:
        argv += [
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            f"--trainer.logger.init_args.project={wandb_project}",
            "--trainer.logger.init_args.save_dir={cell}",
            f"--trainer.logger.init_args.name={cell.id}",
        ]
    else:
        argv += [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir={cell}",
            "--trainer.logger.init_args.name=logs",
        ]
    accepted = _init_args(cell.config)
    if "feature_cache" in accepted and cell.method.uses_feature_cache(cell.protocol.key):
        # One store for the whole experiment: its keys hold everything that determines the features (backbone,
        # size, layers, stream, image file), so two cells encoding the same images with the same frozen encoder
        # share the entries and different encoders never collide.
        argv.append("--model.init_args.feature_cache={output}/feature_cache")
    protocol = cell.protocol
    if smoke:
        for key, value in {**SMOKE_MODEL, "image_size": spec.smoke.get("image_size", 98)}.items():
            if key in accepted:
                argv.append(f"--model.init_args.{key}={value}")
        if "visualizer" in accepted:
            argv.append("--model.init_args.visualizer=false")
        if _is_efficientad(cell.config):  # the smoke-only stand-ins of make_smoke_efficientad_assets
            argv += [
                f"--model.init_args.imagenet_dir={{output}}/{SMOKE_ASSETS}/imagenette",
                "--model.init_args.model_size=small",
                f"--model.init_args.teacher_out_channels={SMOKE_EFFICIENTAD_CHANNELS}",
            ]
        argv += list(SMOKE_TRAINER) + [
            "--model.init_args.evaluator.init_args.save_images=0",
            "--trainer.enable_model_summary=false",
        ]
        source, target = smoke_datasets(cell)
        if source is not None:
            argv += [
                f"--data.init_args.train={_smoke_data_arg(spec, source)}",
                f"--data.init_args.test={_smoke_data_arg(spec, target)}",
            ]
        else:
            argv.append(f"--data.init_args.root={{smoke_data}}/{target}")
        argv.append("--data.init_args.num_workers=0")
    if cell.method.runs_per_category(cell.protocol.key):
        argv.append("--data.init_args.category={category}")
    argv += [*protocol.overrides, *cell.method.overrides]
    if smoke:
        argv += list(cell.method.smoke_overrides)
    return argv


def config_hash(spec: ExperimentSpec, cell: Cell, argv: Sequence[str], categories: Sequence[str]) -> str:
    """SHA-256 of what determines a cell's result: its arguments, the config file's text and its categories."""
    payload = {
        "argv": list(argv),
        "config": cell.config.read_text(),
        "categories": list(categories),
        "kind": spec.kind,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _same_digest(directory: Path, digest: str) -> bool:
    try:
        return json.loads((directory / "cell.json").read_text()).get("config_hash") == digest
    except (OSError, json.JSONDecodeError):
        return False


def is_finished(directory: Path, digest: str) -> bool:
    """A cell is done when its ``results/metrics.json`` exists and ``cell.json`` carries the same config hash."""
    return (directory / "results" / "metrics.json").is_file() and _same_digest(directory, digest)


def _run_in_process(argv: list[str]) -> None:
    from zsad.cli import main

    saved = sys.argv
    sys.argv = saved[:1]  # LightningCLI would otherwise also see this process's own arguments
    try:
        main(argv)
    except SystemExit as err:  # jsonargparse reports a bad argument by exiting
        if err.code not in (0, None):
            raise RuntimeError(f"zsad {' '.join(argv[:1])} exited with {err.code} (a bad argument? see above)") from err
    finally:
        sys.argv = saved
        gc.collect()


def _run_subprocess(argv: list[str], log: Path, env: dict[str, str]) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.call(
            [sys.executable, "-m", "zsad.cli", *argv], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"zsad {argv[0]} exited with {code}; log {log}:\n{tail}")


def _benchmark_to_metrics(directory: Path) -> None:
    """``results/benchmark.json`` → ``results/metrics.json`` rows (the form every cell's results take)."""
    result = json.loads((directory / "results" / "benchmark.json").read_text())
    values = {k: result.get(k) for k in ("trainable_parameters", "total_parameters", "inference_images_per_s")}
    rows = [{"category": "benchmark", **values}, {"category": "mean", **values}]
    atomic_write_text(directory / "results" / "metrics.json", json.dumps(rows, indent=2) + "\n")


def _merge_categories(directory: Path, categories: Sequence[str]) -> None:
    """Per-category runs → one ``results/metrics.{csv,json,md}`` with every category and their unweighted mean."""
    from zsad.metrics.report import MEAN_ROW, results_rows, write_results

    per_category: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for category in categories:
        rows = json.loads((directory / "categories" / category / "results" / "metrics.json").read_text())
        for row in rows:
            if row["category"] == MEAN_ROW:
                continue
            values = {k: float("nan") if v is None else float(v) for k, v in row.items() if k != "category"}
            columns += [c for c in values if c not in columns]
            per_category[str(row["category"])] = values
    write_results(directory / "results", results_rows(per_category, columns), columns)


def _write_record(directory: Path, record: dict[str, Any]) -> None:
    atomic_write_text(directory / "cell.json", json.dumps(record, indent=2) + "\n")


def run_cells(
    spec: ExperimentSpec,
    cells: Sequence[Cell],
    output: Path,
    smoke: bool = False,
    isolate: bool = False,
    wandb_project: str | None = None,
) -> list[CellResult]:
    """Run ``cells`` in sequence; finished ones are skipped, failed ones recorded. Returns one record per cell."""
    output = Path(output).resolve()
    smoke_root = output / "smoke_data"
    if smoke and spec.kind == "metrics":
        make_smoke_data(spec, smoke_root, [n for c in cells for n in smoke_datasets(c) if n])
    env = {**os.environ, "WANDB_RUN_GROUP": spec.name}  # every cell's W&B run lands in the experiment's group
    previous_group = os.environ.get("WANDB_RUN_GROUP")
    os.environ["WANDB_RUN_GROUP"] = spec.name
    try:
        return _run_all(spec, cells, output, smoke, isolate, wandb_project, smoke_root, env)
    finally:  # in-process cells only: leave the caller's environment as it was
        if previous_group is None:
            os.environ.pop("WANDB_RUN_GROUP", None)
        else:
            os.environ["WANDB_RUN_GROUP"] = previous_group


def _run_all(
    spec: ExperimentSpec,
    cells: Sequence[Cell],
    output: Path,
    smoke: bool,
    isolate: bool,
    wandb_project: str | None,
    smoke_root: Path,
    env: dict[str, str],
) -> list[CellResult]:
    records = []
    for index, cell in enumerate(cells, 1):
        directory = cell_dir(output, cell)
        argv_template = cell_argv(spec, cell, smoke, wandb_project)
        if cell.method.runs_per_category(cell.protocol.key):
            dataset = smoke_datasets(cell)[1]
            categories = smoke_categories(spec, dataset) if smoke else list(cell.protocol.categories)
        else:
            categories = []
        digest = config_hash(spec, cell, argv_template, categories)
        prefix = f"[{index}/{len(cells)}] {cell.id}"
        if is_finished(directory, digest):
            print(f"{prefix}: finished earlier, skipped ({directory}/results/metrics.json)", flush=True)  # noqa: T201
            records.append(json.loads((directory / "cell.json").read_text()))
            continue
        # Categories finished by an interrupted attempt with the same arguments are kept (a 15-category cell resumes).
        resumable = _same_digest(directory, digest)
        values = {"output": str(output), "cell": str(directory), "smoke_data": str(smoke_root), "seed": str(cell.seed)}
        record: dict[str, Any] = {
            "id": cell.id,
            "method": cell.method.key,
            "protocol": cell.protocol.key,
            "seed": cell.seed,
            "config": str(cell.config),
            "smoke": smoke,
            "config_hash": digest,
            "argv": argv_template,
            "categories": categories,
            "status": "running",
        }
        (directory / "results").mkdir(parents=True, exist_ok=True)
        (directory / "results" / "metrics.json").unlink(missing_ok=True)  # a stale result never counts as finished
        _write_record(directory, record)
        print(f"{prefix}: running -> {directory}", flush=True)  # noqa: T201
        start = time.perf_counter()
        try:
            cell_env: dict[str, str] = {}
            if smoke and spec.kind == "metrics" and _is_efficientad(cell.config):
                assets = output / SMOKE_ASSETS
                cell_env["XDG_CACHE_HOME"] = str(make_smoke_efficientad_assets(assets))
                print(f"{prefix}: smoke-only EfficientAD teacher and Imagenette stand-ins in {assets}", flush=True)  # noqa: T201
            runs = [(c, directory / "categories" / c) for c in categories] or [(None, directory)]
            for category, run_dir in runs:
                if category is not None and resumable and (run_dir / "results" / "metrics.json").is_file():
                    print(f"{prefix}: category {category} finished earlier, kept", flush=True)  # noqa: T201
                    continue
                (run_dir / "results" / "metrics.json").unlink(missing_ok=True)
                argv = [
                    _substitute(a, {**values, "cell": str(run_dir), "category": category or ""}) for a in argv_template
                ]
                if isolate:
                    _run_subprocess(argv, run_dir / "log.txt", {**env, **cell_env})
                else:
                    with _environment(cell_env):
                        _run_in_process(argv)
            if spec.kind == "benchmark":
                _benchmark_to_metrics(directory)
            elif categories:
                _merge_categories(directory, categories)
            if not (directory / "results" / "metrics.json").is_file():
                raise RuntimeError(f"the run wrote no {directory}/results/metrics.json (did it test?)")
            record["status"] = "done"
            (directory / "error.txt").unlink(missing_ok=True)
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            _write_record(directory, record)
            raise
        except Exception as err:  # noqa: BLE001 - a failed cell is recorded and the grid goes on
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"[:2000]
            atomic_write_text(directory / "error.txt", traceback.format_exc())
            print(f"{prefix}: FAILED ({record['error'][:300]}); traceback in {directory}/error.txt", flush=True)  # noqa: T201
        record["seconds"] = round(time.perf_counter() - start, 1)
        _write_record(directory, record)
        if record["status"] == "done":
            print(f"{prefix}: done in {record['seconds']:.0f} s", flush=True)  # noqa: T201
        records.append(record)
    return records
