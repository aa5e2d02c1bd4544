"""``zsad experiment``: the grid runs cell by cell, resumes after a kill, skips finished cells, records failures,
shares frozen features across cells, aggregates exactly, and sweeps every cell."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zsad.experiment import main
from zsad.experiment.spec import METRIC_LABELS, load_spec
from zsad.experiment.table import write_table

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "experiments").glob("seed*.yaml"))
LV_CONFIG = ROOT / "configs" / "learnable_vectors" / "visa_to_mvtec.yaml"


def _grid_spec(tmp_path: Path) -> Path:
    """Learnable vectors on one cross protocol (two seeds), a broken method, and a method not built yet."""
    spec = {
        "name": "grid_test",
        "title": "grid test",
        "seeds": [1, 2],
        "metrics": ["pixel_auroc", "image_auroc"],
        "protocols": {"visa_to_mvtec": {"label": "MVTec AD", "source": "visa", "target": "mvtec"}},
        "smoke": {
            "datasets": {
                "mvtec": {"generator": "mvtec", "domain": "a", "categories": ["alpha"], "size": 48},
                "visa": {"generator": "mvtec", "domain": "b", "categories": ["gamma"], "size": 48},
            }
        },
        "methods": {
            "lv": {
                "label": "LV",
                "configs": {"visa_to_mvtec": str(LV_CONFIG)},
                "paper": {"visa_to_mvtec": {"pixel_auroc": 91.3}},
            },
            "broken": {
                "label": "Broken",
                "configs": {"visa_to_mvtec": str(LV_CONFIG)},
                "overrides": ["--model.init_args.no_such_argument=1"],
            },
            "missing": {
                "label": "Missing",
                "configs": {"visa_to_mvtec": str(tmp_path / "nope.yaml")},
                "paper": {"visa_to_mvtec": {"image_auroc": 80.0}},
            },
        },
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_grid_resumes_after_a_kill_skips_finished_cells_and_records_failures(tmp_path: Path) -> None:
    spec, out = _grid_spec(tmp_path), tmp_path / "out"
    first = out / "cells" / "lv" / "visa_to_mvtec" / "seed1"
    second = out / "cells" / "lv" / "visa_to_mvtec" / "seed2"
    # 1. A run killed (SIGKILL: nothing gets to clean up) once its first cell has finished.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zsad.cli",
            "experiment",
            "run",
            str(spec),
            "--smoke",
            "--seeds",
            "2",
            "--output",
            str(out),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        record = first / "cell.json"
        if record.is_file() and json.loads(record.read_text()).get("status") == "done":
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert (first / "results" / "metrics.json").is_file(), "the first cell should have finished before the kill"
    assert not (second / "results" / "metrics.json").is_file(), "killed too late: the second cell had finished"
    assert not (out / "table.md").exists()
    done_at = _mtime(first / "results" / "metrics.json")

    # 2. The re-run finishes the rest only; the broken cell fails without stopping the grid.
    result = main(["run", str(spec), "--smoke", "--seeds", "2", "--output", str(out)])
    assert _mtime(first / "results" / "metrics.json") == done_at, "a finished cell was run again"
    assert (second / "results" / "metrics.json").is_file()
    statuses = {r["id"]: r["status"] for r in result["records"]}
    assert statuses == {
        "lv/visa_to_mvtec/seed1": "done",
        "lv/visa_to_mvtec/seed2": "done",
        "broken/visa_to_mvtec/seed1": "failed",
        "broken/visa_to_mvtec/seed2": "failed",
    }
    assert "no_such_argument" in (out / "cells/broken/visa_to_mvtec/seed1/error.txt").read_text()

    # Frozen features shared across cells: one store for the encoder configuration, each source image once.
    stores = [p for p in (out / "feature_cache").iterdir() if p.is_dir()]
    assert len(stores) == 1
    assert len(list(stores[0].glob("*.safetensors"))) == 1 * (3 + 4)  # gamma: 3 good + 4 defect types x 1

    table = (out / "table.md").read_text()
    assert "SMOKE RUN" in table and "meaningless" in table
    assert "| method | MVTec AD P-AUROC | MVTec AD I-AUROC |" in table
    lv_row = next(line for line in table.splitlines() if line.startswith("| LV |"))
    assert lv_row.count("(n=2)") == 2 and "paper 91.3" in lv_row
    assert "| Missing — not available | n/a | n/a · paper 80.0 |" in table
    assert "FAILED cell `broken/visa_to_mvtec/seed1`" in table
    entries = json.loads((out / "table.json").read_text())["entries"]
    lv_auroc = next(e for e in entries if e["method"] == "lv" and e["metric"] == "pixel_auroc")
    seeds = [json.loads((d / "results" / "metrics.json").read_text()) for d in (first, second)]
    expected = [100 * next(r for r in rows if r["category"] == "mean")["pixel_auroc"] for rows in seeds]
    assert lv_auroc["values"] == pytest.approx(expected)

    # 3. Another re-run is a no-op for finished cells and rewrites the same table.
    before = {name: (out / name).read_bytes() for name in ("table.md", "table.csv", "table.json")}
    main(["run", str(spec), "--smoke", "--seeds", "2", "--output", str(out), "--only", "lv/*"])
    assert _mtime(first / "results" / "metrics.json") == done_at
    assert {name: (out / name).read_bytes() for name in before} == before

    # 4. `table DIR` rebuilds the same table from the cell directories alone.
    for name in before:
        (out / name).unlink()
    main(["table", str(out)])
    assert {name: (out / name).read_bytes() for name in before} == before


def _write_cell(out: Path, method: str, protocol: str, seed: int, rows: list[dict]) -> None:
    cell = out / "cells" / method / protocol / f"seed{seed}"
    (cell / "results").mkdir(parents=True)
    (cell / "results" / "metrics.json").write_text(json.dumps(rows))
    record = {
        "id": f"{method}/{protocol}/seed{seed}",
        "method": method,
        "protocol": protocol,
        "seed": seed,
        "status": "done",
    }
    (cell / "cell.json").write_text(json.dumps(record))


def test_aggregation_matches_hand_computed_means_sds_and_intervals(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "agg",
                "metrics": ["pixel_auroc", "image_auroc"],
                "seeds": [1, 2, 3],
                "figure": {"protocols": ["p"]},
                "protocols": {"p": {"dataset": "mvtec"}},
                "methods": {
                    "m": {"configs": {"p": "x.yaml"}, "paper": {"p": {"pixel_auroc": 80.0}}},
                    "one": {"configs": {"p": "x.yaml"}},
                },
            }
        )
    )
    out = tmp_path / "out"
    # Three seeds, two categories each (category means 0.80, 0.84, 0.90); image AUROC undefined (null) in one
    # category of seed 1, which the category mean leaves out; the stored `mean` row is ignored (recomputed).
    _write_cell(
        out,
        "m",
        "p",
        1,
        [
            {"category": "a", "pixel_auroc": 0.70, "image_auroc": None},
            {"category": "b", "pixel_auroc": 0.90, "image_auroc": 0.60},
            {"category": "mean", "pixel_auroc": 0.0, "image_auroc": 0.0},
        ],
    )
    _write_cell(
        out,
        "m",
        "p",
        2,
        [
            {"category": "a", "pixel_auroc": 0.80, "image_auroc": 0.70},
            {"category": "b", "pixel_auroc": 0.88, "image_auroc": 0.90},
        ],
    )
    _write_cell(
        out,
        "m",
        "p",
        3,
        [
            {"category": "a", "pixel_auroc": 0.85, "image_auroc": 0.75},
            {"category": "b", "pixel_auroc": 0.95, "image_auroc": 0.85},
        ],
    )
    _write_cell(out, "one", "p", 1, [{"category": "a", "pixel_auroc": 0.5, "image_auroc": 0.5}])
    write_table(load_spec(spec_path), out, smoke=False, unavailable={})
    entries = {(e["method"], e["metric"]): e for e in json.loads((out / "table.json").read_text())["entries"]}

    pixel = entries[("m", "pixel_auroc")]
    assert pixel["values"] == pytest.approx([80.0, 84.0, 90.0])
    mean = (80 + 84 + 90) / 3  # 84.666...
    sd = math.sqrt(((80 - mean) ** 2 + (84 - mean) ** 2 + (90 - mean) ** 2) / 2)  # 5.0332...
    half = 4.302652729749464 * sd / math.sqrt(3)  # t(0.975, 2 dof) from a printed t table
    assert pixel["n"] == 3 and pixel["mean"] == pytest.approx(mean) and pixel["std"] == pytest.approx(sd)
    assert pixel["ci_low"] == pytest.approx(mean - half) and pixel["ci_high"] == pytest.approx(mean + half)
    assert pixel["paper"] == 80.0 and pixel["diff"] == pytest.approx(mean - 80.0)
    image = entries[("m", "image_auroc")]
    assert image["values"] == pytest.approx([60.0, 80.0, 80.0])  # seed 1: category b only
    assert image["std"] == pytest.approx(math.sqrt(((60 - 220 / 3) ** 2 + 2 * (80 - 220 / 3) ** 2) / 2))
    single = entries[("one", "pixel_auroc")]
    assert single["n"] == 1 and single["mean"] == pytest.approx(50.0)
    assert single["std"] is None and single["ci_low"] is None and single["ci_high"] is None
    table = (out / "table.md").read_text()
    assert "84.7 ± 5.0 (n=3) · paper 80.0 (+4.7)" in table
    assert f"[{mean - half:.1f}, {mean + half:.1f}]" in table and "n = 1: no interval" in table
    assert "SMOKE" not in table
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure (seed 003's Figure 1 style)
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0] == "method,protocol,metric,n,mean,std,ci_low,ci_high,paper,diff,status"


def test_sweep_lists_every_cell_and_needs_no_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    spec_path = ROOT / "experiments" / "seed000_table1.yaml"
    result = main(["sweep", str(spec_path), "--output", str(tmp_path), "--seeds", "2", "--create"])
    sweep = yaml.safe_load(result["path"].read_text())
    spec = load_spec(spec_path)
    expected = [
        f"{m}/{p}/seed{s}"
        for m in spec.methods
        if not spec.availability(spec.methods[m])
        for p in spec.protocols
        for s in (111, 222)
    ]
    assert sweep["method"] == "grid" and sweep["parameters"]["only"]["values"] == expected
    assert "learnable_vectors/visa_to_mvtec/seed222" in expected
    assert sweep["command"][:5] == ["${env}", "zsad", "experiment", "run", str(spec_path)]
    assert sweep["command"][sweep["command"].index("--output") + 1] == str(tmp_path)
    assert sweep["command"][-1] == "${args}" and "--wandb" in sweep["command"]
    printed = capsys.readouterr().out
    assert "wandb agent" in printed and "zsad experiment table" in printed and "not registering" in printed


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_carry_every_papers_number(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    assert set(spec.metrics) <= set(METRIC_LABELS)
    for method in spec.methods.values():
        assert set(method.configs) == set(spec.protocols), method.key
        for protocol in spec.protocols:
            assert set(method.paper.get(protocol, {})) == set(spec.metrics), (method.key, protocol)
    # Every method of the shipped specs is on main: no row of the real tables is "not available".
    assert {m.key: spec.availability(m) for m in spec.methods.values()} == dict.fromkeys(spec.methods)


def test_smallest_shipped_spec_end_to_end(tmp_path: Path) -> None:
    """seed000_table2 (parameters and images/s through `zsad benchmark`) in full, smoke."""
    main(["run", str(ROOT / "experiments" / "seed000_table2.yaml"), "--smoke", "--output", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert "SMOKE RUN" in table
    assert (
        "| method | ViT-L/14@336, 518 px trainable | ViT-L/14@336, 518 px total | ViT-L/14@336, 518 px images/s |"
        in table
    )
    for label in ("APRIL-GAN", "AnomalyCLIP", "AdaCLIP", "Learnable vectors (proposed)"):
        assert any(line.startswith(f"| {label}") for line in table.splitlines()), label
    entries = json.loads((tmp_path / "table.json").read_text())["entries"]
    lv = {e["metric"]: e for e in entries if e["method"] == "learnable_vectors"}
    # The tiny CLIP (embed 16): five 2x16 vector pairs + 4 layer weights = 164 trainable parameters.
    assert lv["trainable_parameters"]["mean"] == 164 and lv["trainable_parameters"]["paper"] == 7.7e3
    assert lv["inference_images_per_s"]["mean"] > 0


def test_bad_spec_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmetrics: [pixel_auroc]\nprotocols: {p: {source: visa}}\nmethods: {}\n")
    with pytest.raises(SystemExit, match=r"bad.yaml: protocol 'p' needs both `source` and `target`"):
        main(["run", str(path)])
    path.write_text(
        "name: x\nmetrics: [pixel_auroc]\nprotocols: {p: {dataset: gogan}}\n"
        "methods: {pc: {configs: {p: x.yaml}, per_category: true}}\n"
    )
    with pytest.raises(SystemExit, match=r"methods.pc runs once per category .* list no `categories`"):
        main(["run", str(path)])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["run", str(tmp_path / "absent.yaml")])


def test_per_category_runs_merge_into_one_results_table(tmp_path: Path) -> None:
    """One-class models run once per category; the cell's metrics.json holds every category and their mean."""
    from zsad.experiment.runner import _merge_categories

    for category, values in (("alpha", (0.9, None)), ("beta", (0.7, 0.5))):
        folder = tmp_path / "categories" / category / "results"
        folder.mkdir(parents=True)
        rows = [
            {"category": category, "image_auroc": values[0], "pixel_aupro": values[1]},
            {"category": "mean", "image_auroc": values[0], "pixel_aupro": values[1]},
        ]
        (folder / "metrics.json").write_text(json.dumps(rows))
    _merge_categories(tmp_path, ["alpha", "beta"])
    rows = {r["category"]: r for r in json.loads((tmp_path / "results" / "metrics.json").read_text())}
    assert set(rows) == {"alpha", "beta", "mean"}
    assert rows["mean"]["image_auroc"] == pytest.approx(0.8)
    assert rows["mean"]["pixel_aupro"] == pytest.approx(0.5)  # undefined in alpha: left out, as the evaluator does
    assert rows["alpha"]["pixel_aupro"] is None


def test_musc_gogan_smoke_cell_runs_each_category_and_merges_them(tmp_path: Path) -> None:
    """MuSc (transductive, one Gogan category per run) as seed003_table2 runs it: ``per_category: [gogan]``."""
    spec = {
        "name": "musc_gogan",
        "seeds": [7],
        "metrics": ["image_auroc", "pixel_aupro"],
        "protocols": {"gogan": {"label": "Gogan", "dataset": "gogan", "categories": ["nunozumi", "tanizumi"]}},
        "smoke": {"image_size": 42, "datasets": {"gogan": {"generator": "gogan", "size": 32}}},
        "methods": {
            "musc": {
                "command": "test",
                "configs": {"gogan": str(ROOT / "configs" / "musc" / "gogan.yaml")},
                "per_category": ["gogan"],
            }
        },
    }
    path = tmp_path / "musc.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert load_spec(path).methods["musc"].runs_per_category("gogan")
    main(["run", str(path), "--smoke", "--output", str(tmp_path / "out")])
    cell = tmp_path / "out" / "cells" / "musc" / "gogan" / "seed7"
    assert json.loads((cell / "cell.json").read_text())["status"] == "done"
    rows = {r["category"]: r for r in json.loads((cell / "results" / "metrics.json").read_text())}
    assert set(rows) == {"nunozumi", "tanizumi", "mean"}
    # Native 32x32 masks (the config's resolution: native) were found for every defect, so AU-PRO exists.
    assert all(0.0 <= rows[c]["pixel_aupro"] <= 1.0 for c in ("nunozumi", "tanizumi"))
    spec["methods"]["musc"]["per_category"] = ["elsewhere"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SystemExit, match=r"musc.per_category must be true, false or a list of protocols"):
        main(["run", str(path), "--output", str(tmp_path / "never")])


def test_efficientad_smoke_gets_labelled_stand_ins_and_a_real_run_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--smoke: a random teacher where anomalib looks (XDG_CACHE_HOME) and noise images; never the real cache."""
    import torch
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    from zsad.experiment.runner import SMOKE_EFFICIENTAD_CHANNELS, cell_argv, make_smoke_efficientad_assets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    spec = load_spec(ROOT / "experiments" / "seed003_table2.yaml")
    cell = next(c for c in spec.cells(spec.select_seeds(1)) if c.id == "efficientad/gogan/seed111")
    smoke, real = cell_argv(spec, cell, smoke=True), cell_argv(spec, cell, smoke=False)
    assert "--model.init_args.imagenet_dir={output}/smoke_assets/imagenette" in smoke
    assert f"--model.init_args.teacher_out_channels={SMOKE_EFFICIENTAD_CHANNELS}" in smoke
    assert not any("smoke_assets" in a or "teacher_out_channels" in a for a in real)

    cache = make_smoke_efficientad_assets(tmp_path / "smoke_assets")
    assert os.environ["XDG_CACHE_HOME"] == str(tmp_path / "user_cache")  # restored
    assert not (tmp_path / "user_cache").exists()
    teacher = cache / "anomalib" / "pre_trained" / "efficientad_pretrained_weights" / "pretrained_teacher_small.pth"
    model = EfficientAdModel(teacher_out_channels=SMOKE_EFFICIENTAD_CHANNELS, model_size="small")
    model.teacher.load_state_dict(torch.load(teacher, weights_only=True))  # the shape anomalib will load
    assert len(list((tmp_path / "smoke_assets" / "imagenette" / "noise").glob("*.png"))) == 4
    assert (
        "NOT anomalib's released teacher and NOT Imagenette" in (tmp_path / "smoke_assets" / "README.txt").read_text()
    )
