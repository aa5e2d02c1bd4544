"""Using a trained model on new images: predictions files, calibrated thresholds, ONNX / OpenVINO exports.

* :class:`PredictionWriter` — ``predictions.csv`` / ``predictions.jsonl`` (+ regions, maps, overlays) of
  ``zsad predict`` on any datamodule;
* :mod:`zsad.deploy.calibrate` — ``zsad calibrate``: image and pixel thresholds at a target FPR (normal images) or
  at F1-max (labelled images), stored in a new checkpoint;
* :mod:`zsad.deploy.graph` — ``zsad export --format onnx|openvino``: the whole inference graph;
* :class:`ExportedModel` — ``zsad predict --model model.onnx``: an export as an anomalib model.

This package sits above ``zsad.methods`` (it rebuilds and exports them); methods never import it.
"""

from zsad.deploy.graph import EXPORTABLE, export_graph, load_model, read_metadata
from zsad.deploy.runtime import ExportedModel, GraphRunner
from zsad.deploy.thresholds import Thresholds, threshold_at_fpr
from zsad.deploy.writer import PredictionWriter, connected_regions, read_predictions

__all__ = [
    "EXPORTABLE",
    "ExportedModel",
    "GraphRunner",
    "PredictionWriter",
    "Thresholds",
    "connected_regions",
    "export_graph",
    "load_model",
    "read_metadata",
    "read_predictions",
    "threshold_at_fpr",
]
