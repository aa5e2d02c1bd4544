"""Running an ONNX / OpenVINO export: as a plain function, or as a model in ``zsad predict --model <file>``.

:class:`ExportedModel` is an anomalib ``AnomalibModule`` whose forward is the exported graph, so every datamodule,
the predictions writer and calibration work on an export exactly as on the PyTorch model. Its pre-processor is the
CLIP one at the export's input size (from the metadata); the thresholds stored in the export are used for labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib import LearningType
from anomalib.data import InferenceBatch
from anomalib.models import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from zsad.deploy.graph import read_metadata


class GraphRunner:
    """Run an export with ONNX Runtime (``.onnx``) or OpenVINO (``.xml``) on float32 ``[B, 3, S, S]`` arrays.

    Args:
        path: The export.
        device: OpenVINO device (``CPU``, ``GPU``, ...); ONNX Runtime uses its CUDA provider when available and
            ``device`` is not ``CPU``.
        threads: Intra-op threads (0: the runtime's default).
    """

    def __init__(self, path: str | Path, device: str = "CPU", threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            msg = f"{self.path} does not exist; write an export with `zsad export --format onnx|openvino`."
            raise FileNotFoundError(msg)
        self.metadata = read_metadata(self.path)
        if self.path.suffix.lower() == ".xml":
            try:
                import openvino as ov
            except ImportError as err:
                raise ImportError("running an OpenVINO export needs: pip install 'zsad[deploy]'") from err
            config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
            config["INFERENCE_PRECISION_HINT"] = "f32"  # CPUs with bf16 would otherwise run the graph in bf16
            self._compiled = ov.Core().compile_model(str(self.path), device, config)
            self.backend = "openvino"
        else:
            try:
                import onnxruntime as ort
            except ImportError as err:
                raise ImportError("running an ONNX export needs: pip install 'zsad[deploy]'") from err
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            providers = ["CPUExecutionProvider"]
            if device.upper() != "CPU" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self._session = ort.InferenceSession(str(self.path), options, providers=providers)
            self.backend = "onnxruntime"

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pred_score [B], anomaly_map [B, S, S])`` of normalised float32 images ``[B, 3, S, S]``."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.backend == "openvino":
            result = self._compiled(images)
            return (
                np.asarray(result[self._compiled.output("pred_score")]),
                np.asarray(result[self._compiled.output("anomaly_map")]),
            )
        scores, maps = self._session.run(["pred_score", "anomaly_map"], {"image": images})
        return scores, maps


class ExportedModel(AnomalibModule):
    """An ONNX / OpenVINO export as an anomalib model (inference only: predict, test, validate).

    Args:
        path: ``.onnx`` or ``.xml`` file written by ``zsad export --format onnx|openvino``.
        device: Runtime device (see :class:`GraphRunner`).
        threads: Runtime intra-op threads (0: default).
        pre_processor: anomalib component flag (the CLIP pre-processor at the export's size).
        post_processor: anomalib component flag (off: raw scores, thresholds from the export).
        evaluator: anomalib component flag (``True`` gives zsad's evaluator for ``zsad test``).
        visualizer: anomalib component flag.
    """

    def __init__(
        self,
        path: str,
        device: str = "CPU",
        threads: int = 0,
        pre_processor: bool = True,
        post_processor: bool = False,
        evaluator: bool = True,
        visualizer: bool = False,
    ) -> None:
        runner = GraphRunner(path, device, threads)
        self._metadata = runner.metadata  # before super().__init__: configure_pre_processor reads the input size
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.runner = runner
        self.zsad_thresholds = runner.metadata["thresholds"]
        self.save_hyperparameters()

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # noqa: ARG002
        """Squash resize + normalisation exactly as the exported model was trained with."""
        size = int(self._metadata["image_size"])
        return PreProcessor(
            transform=Compose(
                [
                    Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                    Normalize(mean=self._metadata["mean"], std=self._metadata["std"]),
                ]
            ),
        )

    def configure_post_processor(self) -> None:
        """No post-processing (raw scores, as the PyTorch model)."""
        return

    def configure_evaluator(self):  # noqa: ANN201
        """The zsad evaluator, for ``zsad test --model <export>``."""
        from zsad.metrics import ZSADEvaluator

        return ZSADEvaluator()

    def configure_visualizer(self) -> None:
        """No anomalib visualizer."""
        return

    def configure_optimizers(self) -> None:
        """Nothing to train."""
        return

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No Trainer overrides."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """Inference only."""
        return LearningType.ZERO_SHOT

    def forward(self, batch: torch.Tensor) -> InferenceBatch:
        """Score normalised images with the exported graph."""
        scores, maps = self.runner(batch.detach().float().cpu().numpy())
        return InferenceBatch(
            pred_score=torch.from_numpy(scores).to(batch.device),
            anomaly_map=torch.from_numpy(maps).to(batch.device),
        )

    def _infer(self, batch: Any) -> Any:  # noqa: ANN401
        predictions = self.forward(batch.image)
        return batch.update(pred_score=predictions.pred_score, anomaly_map=predictions.anomaly_map)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Score the batch (``zsad predict --model <export>``)."""
        return self._infer(batch)

    def test_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Score the batch for the evaluator."""
        return self._infer(batch)

    def validation_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Score the batch for the evaluator."""
        return self._infer(batch)
