"""Every W&B sweep in experiments/sweeps/ produces commands that `zsad fit` parses: each parameter value, formatted
by wandb's own agent code, lands at its config path in `--print_config`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from zsad.cli import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


def _probe_values(spec: dict) -> list:
    """Values of one sweep parameter worth parsing: every listed value, or the ends of a distribution."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    low, high = spec["min"], spec["max"]
    if spec.get("distribution", "").startswith("int") or (isinstance(low, int) and isinstance(high, int)):
        return [int(low), int(high)]
    if spec.get("distribution") in ("log_uniform", "inv_log_uniform"):  # min/max are exponents
        return [math.exp(low), math.exp(high)]
    return [float(low), float(high)]


def _trials(parameters: dict) -> list[dict]:
    """Enough combinations that every probe value of every parameter appears at least once."""
    probes = {name: _probe_values(spec) for name, spec in parameters.items()}
    width = max(len(v) for v in probes.values())
    return [{name: values[i % len(values)] for name, values in probes.items()} for i in range(width)]


def _argv(sweep: dict, trial: dict) -> list[str]:
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in trial.items()}})["args"]
    command = sweep.get("command", ["${env}", "${interpreter}", "${program}", "${args}"])
    argv: list[str] = []
    for token in command:
        if token in ("${env}", "${interpreter}"):
            continue
        if token == "${program}":
            argv.append(sweep["program"])
        elif token == "${args}":
            argv.extend(flags)
        else:
            argv.append(token)
    assert argv[0] == "zsad", f"the sweep must run the `zsad` CLI, runs {argv[0]!r}"
    return argv[1:]


def _config_of(sweep: dict) -> str:
    command = sweep["command"]
    return command[command.index("--config") + 1]


def _lookup(config: dict, dotted: str) -> object:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _same(printed: object, value: object) -> bool:
    if isinstance(value, float):
        return math.isclose(float(printed), value, rel_tol=1e-9)
    if isinstance(value, list | tuple):
        return list(printed) == list(value)
    return printed == value


@pytest.mark.parametrize("sweep_path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_value_parses_with_print_config(
    sweep_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # sweep commands use repository-relative config paths, as the agent runs them
    sweep = yaml.safe_load(sweep_path.read_text())
    config = _config_of(sweep)
    if not (ROOT / config).is_file():  # a method built on another branch: its sweep lights up after the merge
        pytest.skip(f"{sweep_path.name}: {config} does not exist on this branch yet")
    assert sweep["metric"]["name"] and sweep["metric"]["goal"] in ("minimize", "maximize")
    for trial in _trials(sweep["parameters"]):
        argv = _argv(sweep, trial)
        assert argv[0] == "fit", argv
        with pytest.raises(SystemExit) as info:
            main([*argv, "--print_config"])
        output = capsys.readouterr()
        assert info.value.code in (0, None), f"{sweep_path.name} {trial}: {output.err[-2000:]}"
        printed = yaml.safe_load(output.out)
        for name, value in trial.items():
            assert _same(_lookup(printed, name), value), f"{name}={value!r} printed as {_lookup(printed, name)!r}"


def test_learnable_vectors_sweep_covers_lr_epochs_and_layer_sets() -> None:
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / "learnable_vectors.yaml").read_text())
    assert set(sweep["parameters"]) == {"model.init_args.lr", "trainer.max_epochs", "model.init_args.layers"}
    assert "${args}" in sweep["command"] and "fit" in sweep["command"]
    assert sweep["metric"]["name"].startswith("val/")  # selection on held-out source data, never the target test
    layer_sets = sweep["parameters"]["model.init_args.layers"]["values"]
    assert all(set(s) <= {6, 12, 18, 24} for s in layer_sets) and len({tuple(s) for s in layer_sets}) == len(layer_sets)


@pytest.mark.parametrize("sweep_path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_selects_on_the_source_never_the_target(sweep_path: Path) -> None:
    sweep = yaml.safe_load(sweep_path.read_text())
    command = sweep["command"]
    config = yaml.safe_load((ROOT / _config_of(sweep)).read_text()) if (ROOT / _config_of(sweep)).is_file() else None
    assert "--data.init_args.val_split_mode=from_train" in command, "selection needs a held-out part of the source"
    assert sweep["metric"]["name"].startswith("val/"), sweep["metric"]["name"]
    if config is not None and "train" in config["data"]["init_args"]:  # cross-dataset: val/<source dataset>/...
        source = config["data"]["init_args"]["train"]["dataset"]
        target = config["data"]["init_args"]["test"]["dataset"]
        assert sweep["metric"]["name"].split("/")[1] == source != target


def test_a_sweep_for_every_trained_method() -> None:
    names = {p.stem for p in SWEEPS}
    assert {"learnable_vectors", "anomalyclip", "adaptclip", "clip_ada", "april_gan", "adaclip"} <= names
