"""Toy evaluation under CPU DDP (``strategy="ddp"``), run as a script by ``test_evaluator_ddp.py``.

DDP needs one process per rank, which cannot be pytest itself. Started plainly, Lightning's launcher re-executes this
file for rank 1 after rank 0 has imported everything; ``test_evaluator_ddp.py`` instead starts both ranks at once with
``LOCAL_RANK`` set (Lightning's documented external-launch mode, same DDP strategy), which halves the wall time of
the imports. Rank 0 writes ``metrics.json`` and ``logged.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

from metrics_toy import run_test  # noqa: E402

from zsad.metrics import ZSADEvaluator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()

    evaluator = ZSADEvaluator(stages=("test",), output_dir=args.out, report_pro_repo=True)
    logged = run_test(evaluator, args.out, n=args.n, batch_size=args.batch_size, strategy="ddp", devices=args.devices)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with open(os.path.join(args.out, "logged.json"), "w") as handle:
            json.dump(logged[0], handle)
    sys.stdout.flush()
    sys.stderr.flush()
    # Interpreter teardown of torch + anomalib + transformers takes seconds on a loaded box; nothing is left to do.
    os._exit(0)


if __name__ == "__main__":
    main()
