"""MuSc ``Trainer.test`` on a generated Gogan-layout set, run as a script by ``test_ddp.py`` (one process per rank).

Every rank writes ``scores_<rank>.json`` (path → image score and map sum of the batches it handed to the evaluator);
rank 0 also writes ``metrics.json`` (the evaluator's table). With ``--devices 1`` it is the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

torch.set_num_threads(1)

from lightning.pytorch import Trainer  # noqa: E402

from zsad.data import UnifiedDataset  # noqa: E402
from zsad.methods import MuSc  # noqa: E402
from zsad.metrics import ZSADEvaluator  # noqa: E402


def run(root: str, out: str, devices: int, batch_size: int = 4) -> MuSc:
    """Test MuSc (tiny random CLIP, float16 tokens as by default) and write the scores this process delivered."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    delivered: dict[str, list[float]] = {}
    original = MuSc.pop_deferred_predictions

    def recording(self: MuSc, final: bool = False) -> list:
        batches = original(self, final)
        for batch in batches:
            for path, score, anomaly_map in zip(batch.image_path, batch.pred_score, batch.anomaly_map, strict=True):
                delivered[str(path)] = [float(score), float(anomaly_map.double().sum())]
        return batches

    MuSc.pop_deferred_predictions = recording
    torch.manual_seed(0)
    model = MuSc(
        backbone="tiny",
        weights="random",
        image_size=98,
        evaluator=ZSADEvaluator(stages=("test",), output_dir=out),
    )
    datamodule = UnifiedDataset(dataset="gogan", root=root, eval_batch_size=batch_size, check_files=False)
    strategy = {"strategy": "ddp"} if devices > 1 else {}
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        **strategy,
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"scores_{rank}.json"), "w") as handle:
        json.dump(delivered, handle)
    MuSc.pop_deferred_predictions = original
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    run(args.root, args.out, args.devices)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # interpreter teardown of torch + anomalib takes seconds; nothing is left to do


if __name__ == "__main__":
    main()
