"""Experiment specs: which methods, protocols, seeds and metrics make a table, and the grid of cells they span.

A spec is a YAML file (see ``experiments/seed000_table1.yaml``):

.. code-block:: yaml

    name: seed000_table1                 # W&B group and default output folder
    title: Seed 000, Table 1 ...
    kind: metrics                        # `metrics` (LightningCLI runs) or `benchmark` (`zsad benchmark`)
    seeds: [111, 222, 333]
    metrics: [pixel_auroc, pixel_ap, ...]
    protocols:
      visa_to_mvtec: {label: MVTec AD, source: visa, target: mvtec}   # cross-dataset (trained methods)
      mvtec: {label: MVTec AD, dataset: mvtec, categories: [bottle, cable]}   # one dataset
    smoke: {image_size: 98, datasets: {mvtec: {generator: mvtec, domain: a, categories: [alpha, beta]}}}
    methods:
      anomalyclip:
        label: AnomalyCLIP
        command: fit                     # fit (then test on the target) | test (training-free)
        configs: {visa_to_mvtec: configs/anomalyclip/visa_to_mvtec.yaml}
        overrides: []                    # extra LightningCLI arguments for every cell of the method
        smoke_overrides: []              # extra arguments in --smoke only (non-CLIP models)
        per_category: false              # one run per category (one-class models such as PatchCore), or a list
                                         # of protocols (MuSc: Gogan's data module holds one category per run)
        feature_cache: true              # share <output>/feature_cache (false, or a list of protocols)
        paper: {visa_to_mvtec: {pixel_auroc: 91.1}}

A cell is one (method, protocol, seed); its id ``<method>/<protocol>/seed<seed>`` names its directory
``<output>/cells/<method>/<protocol>/seed<seed>``. A method whose config file or model class does not exist is kept
as a "not available" row instead of breaking the spec.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Cell", "ExperimentSpec", "MethodSpec", "Protocol", "SpecError", "load_spec"]

KINDS = ("metrics", "benchmark")
COMMANDS = ("fit", "test")
#: Metric labels of the tables (the evaluator's keys; the benchmark's result keys).
METRIC_LABELS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "pixel_aupro": "AU-PRO",
    "pixel_pro_repo": "PRO (repo)",
    "trainable_parameters": "trainable",
    "total_parameters": "total",
    "inference_images_per_s": "images/s",
}


class SpecError(ValueError):
    """An experiment spec that cannot be used; the message names the file and the field to fix."""


@dataclass(frozen=True)
class Protocol:
    """A column group of the table: a cross-dataset pair (``source`` → ``target``) or one ``dataset``."""

    key: str
    label: str
    source: str | None = None
    target: str | None = None
    dataset: str | None = None
    categories: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    @property
    def is_cross(self) -> bool:
        """Whether the protocol trains on ``source`` and tests on ``target``."""
        return self.source is not None


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: one method, its config file per protocol and its published numbers."""

    key: str
    label: str
    configs: dict[str, str]
    command: str = "fit"
    overrides: tuple[str, ...] = ()
    smoke_overrides: tuple[str, ...] = ()
    per_category: tuple[str, ...] = ()
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""
    feature_cache: tuple[str, ...] | None = None

    def runs_per_category(self, protocol: str) -> bool:
        """Whether this protocol's cells run once per category (``--data.init_args.category``) and merge the rows."""
        return protocol in self.per_category

    def uses_feature_cache(self, protocol: str) -> bool:
        """Whether the shared frozen-feature store serves this protocol's cells (``None``: every protocol)."""
        return self.feature_cache is None or protocol in self.feature_cache


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a method on a protocol with a seed."""

    method: MethodSpec
    protocol: Protocol
    seed: int
    config: Path

    @property
    def id(self) -> str:
        """``<method>/<protocol>/seed<seed>``: the directory under ``cells/`` and the sweep value."""
        return f"{self.method.key}/{self.protocol.key}/seed{self.seed}"


@dataclass
class ExperimentSpec:
    """A parsed spec file."""

    path: Path
    name: str
    title: str
    kind: str
    seeds: list[int]
    metrics: list[str]
    protocols: dict[str, Protocol]
    methods: dict[str, MethodSpec]
    smoke: dict[str, Any]
    decimals: int = 1
    figure: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def config_path(self, method: MethodSpec, protocol: str) -> Path | None:
        """The method's config for ``protocol``, resolved against the working directory, else the spec's folder."""
        name = method.configs.get(protocol)
        if name is None:
            return None
        path = Path(name)
        if path.is_absolute() or path.exists():
            return path
        beside = self.path.parent.parent / path  # experiments/<spec>.yaml → the repository root
        return beside if beside.exists() else path

    def availability(self, method: MethodSpec) -> str | None:
        """``None`` when every config of the method exists and its model class imports, else the reason."""
        for protocol in self.protocols:
            path = self.config_path(method, protocol)
            if path is None:
                return f"no config for protocol {protocol!r}"
            if not path.is_file():
                return f"{path} does not exist yet"
            reason = model_class_missing(path)
            if reason:
                return reason
        return None

    def select_seeds(self, count: int | None) -> list[int]:
        """The first ``count`` listed seeds, continued with consecutive integers when ``count`` exceeds the list."""
        if count is None:
            return list(self.seeds)
        if count < 1:
            raise SpecError(f"--seeds must be >= 1, got {count}.")
        seeds = list(self.seeds[:count])
        while len(seeds) < count:
            seeds.append(seeds[-1] + 1)
        return seeds

    def cells(self, seeds: list[int], only: str | None = None) -> list[Cell]:
        """Every cell of the available methods, in spec order (method, protocol, seed), filtered by ``only``."""
        patterns = [p.strip() for p in (only or "").split(",") if p.strip()]
        out = []
        for method in self.methods.values():
            if self.availability(method):
                continue
            for protocol in self.protocols.values():
                for seed in seeds:
                    cell = Cell(method, protocol, seed, self.config_path(method, protocol.key))  # type: ignore[arg-type]
                    if not patterns or any(fnmatch.fnmatchcase(cell.id, p) for p in patterns):
                        out.append(cell)
        return out

    def all_cell_ids(self, seeds: list[int]) -> list[str]:
        """Ids of every cell of the available methods (the sweep's grid)."""
        return [cell.id for cell in self.cells(seeds)]


def model_class_missing(config: Path) -> str | None:
    """``None`` when the config's ``model.class_path`` imports, else why not (a method not merged yet)."""
    data = yaml.safe_load(config.read_text()) or {}
    model = data.get("model")
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if not class_path:
        return None  # the CLI will report the config's own problem when the cell runs
    if "." not in class_path:
        import zsad.methods

        return None if hasattr(zsad.methods, class_path) else f"model class {class_path} is not in zsad.methods"
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return f"model class {class_path} cannot be imported ({err})"
    return None if hasattr(module, name) else f"model class {class_path} does not exist"


def _strings(value: Any, where: str) -> tuple[str, ...]:  # noqa: ANN401
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where} must be a list of strings (LightningCLI arguments), got {value!r}.")
    return tuple(value)


def _cache_protocols(value: Any, protocols: dict[str, Protocol], where: str) -> tuple[str, ...] | None:  # noqa: ANN401
    """``feature_cache: true`` (default) → ``None`` (all), ``false`` → none, a list → those protocols."""
    if value is True:
        return None
    if value is False:
        return ()
    if isinstance(value, list) and set(value) <= set(protocols):
        return tuple(value)
    raise SpecError(f"{where}.feature_cache must be true, false or a list of protocols, got {value!r}.")


def _per_category_protocols(value: Any, protocols: dict[str, Protocol], where: str) -> tuple[str, ...]:  # noqa: ANN401
    """``per_category: false`` (default) → none, ``true`` → every protocol, a list → those protocols."""
    if value is None or value is False:
        return ()
    if value is True:
        return tuple(protocols)
    if isinstance(value, list) and set(value) <= set(protocols):
        return tuple(value)
    raise SpecError(f"{where}.per_category must be true, false or a list of protocols, got {value!r}.")


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and check a spec file.

    Raises:
        SpecError: Missing file or field, unknown kind/command/protocol; the message names the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"experiment spec {path} does not exist (the shipped ones are experiments/seed*.yaml).")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping.")
    for key in ("name", "metrics", "protocols", "methods"):
        if key not in raw:
            raise SpecError(f"{path}: missing required field `{key}`.")
    kind = raw.get("kind", "metrics")
    if kind not in KINDS:
        raise SpecError(f"{path}: kind must be one of {KINDS}, got {kind!r}.")
    seeds = raw.get("seeds", [111])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SpecError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}.")
    protocols = {}
    for key, value in raw["protocols"].items():
        value = value or {}
        cross = "source" in value or "target" in value
        if kind == "benchmark":  # a column group of the parameter / throughput table: no data
            pass
        elif cross and not ("source" in value and "target" in value):
            raise SpecError(f"{path}: protocol {key!r} needs both `source` and `target` (or one `dataset`).")
        elif not cross and "dataset" not in value:
            raise SpecError(f"{path}: protocol {key!r} needs `source` + `target` or `dataset`.")
        protocols[key] = Protocol(
            key=key,
            label=str(value.get("label", key)),
            source=value.get("source"),
            target=value.get("target"),
            dataset=value.get("dataset"),
            categories=tuple(value.get("categories", ())),
            overrides=_strings(value.get("overrides"), f"{path}: protocols.{key}.overrides"),
        )
    methods = {}
    for key, value in raw["methods"].items():
        value = value or {}
        command = value.get("command", "fit")
        if command not in COMMANDS:
            raise SpecError(f"{path}: methods.{key}.command must be one of {COMMANDS}, got {command!r}.")
        configs = value.get("configs")
        if isinstance(configs, str):  # one config for every protocol (e.g. the benchmark)
            configs = dict.fromkeys(protocols, configs)
        if not isinstance(configs, dict):
            raise SpecError(f"{path}: methods.{key}.configs must map protocol → config file.")
        unknown = (set(configs) | set(value.get("paper", {}) or {})) - set(protocols)
        if unknown:
            raise SpecError(
                f"{path}: methods.{key} names unknown protocols {sorted(unknown)}; known: {list(protocols)}."
            )
        per_category = _per_category_protocols(value.get("per_category"), protocols, f"{path}: methods.{key}")
        if per_category and kind == "metrics":
            empty = [p for p in per_category if not protocols[p].categories]
            if empty:
                raise SpecError(
                    f"{path}: methods.{key} runs once per category (per_category), but protocols {empty} list "
                    "no `categories`; add them (e.g. categories: [nunozumi, tanizumi])."
                )
        methods[key] = MethodSpec(
            key=key,
            label=str(value.get("label", key)),
            configs={k: str(v) for k, v in configs.items()},
            command=command,
            overrides=_strings(value.get("overrides"), f"{path}: methods.{key}.overrides"),
            smoke_overrides=_strings(value.get("smoke_overrides"), f"{path}: methods.{key}.smoke_overrides"),
            per_category=per_category,
            paper={p: {m: float(v) for m, v in (vals or {}).items()} for p, vals in (value.get("paper") or {}).items()},
            note=str(value.get("note", "")),
            feature_cache=_cache_protocols(value.get("feature_cache", True), protocols, f"{path}: methods.{key}"),
        )
    return ExperimentSpec(
        path=path,
        name=str(raw["name"]),
        title=str(raw.get("title", raw["name"])),
        kind=kind,
        seeds=seeds,
        metrics=list(raw["metrics"]),
        protocols=protocols,
        methods=methods,
        smoke=dict(raw.get("smoke") or {}),
        decimals=int(raw.get("decimals", 1)),
        figure=raw.get("figure"),
        notes=list(raw.get("notes") or []),
        raw=raw,
    )
