"""``zsad experiment``: a paper's table from one command, on one machine (``run``) or many (``sweep`` + ``table``).

Examples:
    zsad experiment run experiments/seed000_table1.yaml --smoke --output runs/exp/table1_smoke
    zsad experiment run experiments/seed003_table2.yaml --only 'anomalyclip/*' --seeds 3
    zsad experiment sweep experiments/seed000_table1.yaml --output runs/exp/table1 --wandb zsad
    zsad experiment table runs/exp/table1        # rebuild table.{md,csv,json,png} from the cell directories
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zsad.atomic import atomic_write_text
from zsad.experiment.spec import ExperimentSpec, SpecError, load_spec

__all__ = ["ExperimentSpec", "SpecError", "load_spec", "main"]

STATE_FILE = "experiment.json"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line arguments of ``zsad experiment``."""
    parser = argparse.ArgumentParser(prog="zsad experiment", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="Run the grid's cells in sequence (resumable), then write the table.")
    sweep = sub.add_parser("sweep", help="Write (and with --create, register) a W&B grid sweep over the cells.")
    for p in (run, sweep):
        p.add_argument("spec", help="Experiment spec (experiments/seed*.yaml).")
        p.add_argument("--output", default=None, help="Output folder (default runs/experiments/<name>[_smoke]).")
        p.add_argument(
            "--smoke",
            action="store_true",
            help="Tiny random CLIP, generated data, one epoch: the plumbing in minutes; numbers meaningless.",
        )
        p.add_argument(
            "--seeds",
            type=int,
            default=None,
            help="Number of seeds (the spec's first N, continued consecutively; default: all listed, 1 with --smoke).",
        )
        p.add_argument(
            "--wandb",
            default=None,
            metavar="PROJECT",
            help="Log every cell to this W&B project (group = experiment name) and the table as a W&B Table.",
        )
    run.add_argument(
        "--only",
        default=None,
        metavar="PATTERN",
        help="Run only cells whose id (<method>/<protocol>/seed<N>) matches these comma-separated globs.",
    )
    run.add_argument(
        "--isolate",
        action="store_true",
        help="Run each cell in its own `python -m zsad.cli` process (crash/OOM isolation; GPU grids).",
    )
    sweep.add_argument(
        "--create",
        action="store_true",
        help="Also register the sweep with the W&B server (needs network and an API key).",
    )
    table = sub.add_parser("table", help="Rebuild table.{md,csv,json,png} from the cell directories under DIR.")
    table.add_argument("directory", help="An experiment output folder (cells/ copied together from any machines).")
    table.add_argument("--spec", default=None, help="Spec file (default: the copy the run saved in DIR).")
    table.add_argument("--wandb", default=None, metavar="PROJECT", help="Also log the table to this W&B project.")
    return parser.parse_args(list(argv))


def _output(spec: ExperimentSpec, args: argparse.Namespace) -> Path:
    return Path(args.output or f"runs/experiments/{spec.name}{'_smoke' if args.smoke else ''}").resolve()


def _seeds(spec: ExperimentSpec, args: argparse.Namespace) -> list[int]:
    return spec.select_seeds(args.seeds if args.seeds is not None else (1 if args.smoke else None))


def _unavailable(spec: ExperimentSpec) -> dict[str, str]:
    return {m.key: reason for m in spec.methods.values() if (reason := spec.availability(m))}


def _save_state(spec: ExperimentSpec, output: Path, smoke: bool, unavailable: dict[str, str]) -> None:
    """The spec's copy and what the table needs to be rebuilt anywhere (``zsad experiment table DIR``)."""
    atomic_write_text(output / "experiment.yaml", spec.path.read_text())
    state = {"name": spec.name, "spec": str(spec.path), "smoke": smoke, "unavailable": unavailable}
    atomic_write_text(output / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """``zsad experiment run``: the cells in sequence, then the table."""
    from zsad.experiment.runner import run_cells
    from zsad.experiment.table import write_table

    spec = load_spec(args.spec)
    output = _output(spec, args)
    unavailable = _unavailable(spec)
    for key, reason in unavailable.items():
        print(f"zsad experiment: {spec.methods[key].label}: not available ({reason}); kept as a row.")  # noqa: T201
    cells = spec.cells(_seeds(spec, args), args.only)
    if args.only and not cells:
        raise SystemExit(
            f"zsad experiment: --only {args.only!r} matches no cell of {spec.path}; cell ids: "
            f"{', '.join(spec.all_cell_ids(_seeds(spec, args))) or 'none'}."
        )
    output.mkdir(parents=True, exist_ok=True)
    _save_state(spec, output, args.smoke, unavailable)
    print(
        f"zsad experiment: {len(cells)} cells of {spec.name} -> {output}/cells"  # noqa: T201
        + (" (SMOKE: tiny random CLIP, generated data, 1 epoch)" if args.smoke else ""),
        flush=True,
    )
    records = run_cells(spec, cells, output, smoke=args.smoke, isolate=args.isolate, wandb_project=args.wandb)
    written = write_table(spec, output, args.smoke, unavailable, args.wandb)
    failed = [r["id"] for r in records if r.get("status") == "failed"]
    print(f"zsad experiment: table -> {', '.join(str(p) for p in written.values())}")  # noqa: T201
    if failed:
        print(f"zsad experiment: {len(failed)} failed cells (re-run to retry): {', '.join(failed)}")  # noqa: T201
    return {"records": records, "written": written, "failed": failed}


def sweep_command(args: argparse.Namespace) -> dict[str, Any]:
    """``zsad experiment sweep``: a W&B grid sweep whose trials each run one cell with ``run --only <cell id>``."""
    import yaml

    spec = load_spec(args.spec)
    output = _output(spec, args)
    seeds = _seeds(spec, args)
    ids = spec.all_cell_ids(seeds)
    if not ids:
        raise SystemExit(f"zsad experiment sweep: {spec.path} has no available method, so no cell to sweep.")
    # The output as given (relative to the repository root where the agents run), not this machine's absolute path.
    agent_output = args.output or f"runs/experiments/{spec.name}{'_smoke' if args.smoke else ''}"
    command = [
        "${env}",
        "zsad",
        "experiment",
        "run",
        str(args.spec),
        "--output",
        agent_output,
        "--seeds",
        str(len(seeds)),
    ]
    if args.smoke:
        command.append("--smoke")
    project = args.wandb or "zsad"
    command += ["--wandb", project, "${args}"]
    config = {
        "name": spec.name,
        "program": "zsad",
        "method": "grid",  # every cell exactly once; the agents pull them from the W&B server
        "parameters": {"only": {"values": ids}},
        "command": command,
    }
    output.mkdir(parents=True, exist_ok=True)
    path = output / "sweep.yaml"
    header = (
        f"# W&B grid sweep over the {len(ids)} cells of {spec.name} (written by zsad experiment sweep).\n"
        "# Each trial runs `zsad experiment run <spec> --only=<cell id>` into the same output layout.\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    _save_state(spec, output, args.smoke, _unavailable(spec))
    print(f"zsad experiment sweep: {len(ids)} cells -> {path}")  # noqa: T201
    sweep_id = None
    if args.create:
        import os

        if os.environ.get("WANDB_MODE", "").lower() in ("disabled", "offline", "dryrun"):
            print(f"  WANDB_MODE={os.environ['WANDB_MODE']}: not registering the sweep (sweeps need the W&B server).")  # noqa: T201
        else:
            import wandb

            sweep_id = wandb.sweep(config, project=project)
    print(  # noqa: T201
        "To run it on any number of GPU machines (each with this repository, the weights and the datasets):\n"
        + (
            f"  wandb agent <entity>/{project}/{sweep_id}\n"
            if sweep_id
            else f"  wandb sweep --project {project} {path}      # prints the sweep id\n"
            f"  wandb agent <entity>/{project}/<sweep id>     # on each machine\n"
        )
        + f"Then copy every machine's {output}/cells/ into one folder and run: zsad experiment table <folder>"
    )
    return {"path": path, "cells": ids, "sweep_id": sweep_id}


def table_command(args: argparse.Namespace) -> dict[str, Path]:
    """``zsad experiment table DIR``: rebuild the table from whatever cell directories DIR holds."""
    from zsad.experiment.table import write_table

    directory = Path(args.directory)
    state_path = directory / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    spec_path = args.spec or (directory / "experiment.yaml")
    if not Path(spec_path).is_file():
        raise SystemExit(f"zsad experiment table: {spec_path} not found; pass --spec experiments/<spec>.yaml.")
    spec = load_spec(spec_path)
    if args.spec is None and state.get("spec") and Path(state["spec"]).is_file():
        spec.path = Path(state["spec"])  # configs resolve against the original spec's repository
    unavailable = state.get("unavailable") or _unavailable(spec)
    written = write_table(spec, directory, bool(state.get("smoke", False)), unavailable, args.wandb)
    print(f"zsad experiment table: {', '.join(str(p) for p in written.values())}")  # noqa: T201
    return written


def main(argv: Sequence[str] | None = None) -> Any:  # noqa: ANN401
    """Entry point of ``zsad experiment``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"run": run_command, "sweep": sweep_command, "table": table_command}[args.action](args)
    except SpecError as err:
        raise SystemExit(f"zsad experiment: {err}") from None
