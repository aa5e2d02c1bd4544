"""``zsad`` command line: LightningCLI ``fit | validate | test | predict`` plus ``benchmark``, ``export`` and ``demo``.

Examples:
    zsad fit --config configs/learnable_vectors/visa_to_mvtec.yaml
    zsad test --config configs/learnable_vectors/visa_to_mvtec.yaml --ckpt_path runs/.../last.ckpt
    zsad fit --config configs/learnable_vectors/demo.yaml --print_config
    zsad benchmark --config configs/learnable_vectors/visa_to_mvtec.yaml --weights random
    zsad export --config configs/learnable_vectors/demo.yaml --ckpt_path last.ckpt --output vectors.safetensors
    zsad demo

Models are any anomalib ``AnomalibModule`` (zsad's methods by short name, anomalib's by class path); datamodules any
``LightningDataModule`` (zsad's ``CrossDataset``, ``Gogan``, anomalib's ``MVTecAD``...).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

EXTRA_COMMANDS: dict[str, str] = {
    "benchmark": "zsad.benchmark:main",
    "export": "zsad.export:main",
    "calibrate": "zsad.deploy.calibrate:main",
    "demo": "zsad.demo:main",
    "experiment": "zsad.experiment:main",
    "convert-weights": "zsad.convert_weights:main",
}

DESCRIPTION = (
    "zsad: CLIP-based zero-shot anomaly detection on PyTorch Lightning.\n"
    "Lightning subcommands: fit, validate, test, predict (below).\n"
    "Extra commands: zsad benchmark (parameters and images/s), zsad export (learned parameters as safetensors), "
    "zsad demo (the embedded default end to end), zsad calibrate (decision thresholds into a checkpoint), "
    "zsad experiment (a paper's table from one spec), zsad convert-weights (open_clip/OpenAI files to HF). Each has "
    "--help. `zsad predict --ckpt_path <ckpt> --data zsad.data.Images --data.root <folder>` needs no config."
)


class ZSADCLI(LightningCLI):
    """LightningCLI with zsad's defaults.

    zsad's models and datamodules are importable by short name, the config is saved without clashing with a previous
    run, and ``--test_after_fit`` runs the source-train → target-test protocol in one invocation.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--test_after_fit``."""
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `test` on the datamodule's test split (the cross-dataset target) in the same run.",
        )
        from zsad.deploy.writer import PredictionWriter

        # predictions.csv / .jsonl (+ maps, overlays) for `zsad predict`; inert in the other subcommands.
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` safely and keep the configured model class.

        LightningCLI merges the checkpoint's hyper-parameters into the config, *replacing* a configured model class
        with the checkpoint's. When the user configured a model and the checkpoint was written by another class,
        refuse, naming both; with no model configured the checkpoint's class is used (``zsad predict --ckpt_path X``).
        An unreadable file fails naming the file and the fix instead of ``OSError``/``IndexError``.
        """
        from zsad.methods.checkpoint_io import CheckpointError, checkpoint_class_path, read_lightning_checkpoint

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            checkpoint = read_lightning_checkpoint(ckpt_path)
            theirs = checkpoint_class_path(checkpoint)
            model = self.config[subcommand].get("model")
            configured = model.get("class_path") if model is not None and hasattr(model, "get") else None
            if theirs and configured and not _same_class_path(theirs, configured):
                msg = (
                    f"--ckpt_path {ckpt_path!r} was written by {theirs}, but the configured model is {configured}. "
                    f"Use the checkpoint's own config, pass --model {theirs}, or give no model at all (the model is "
                    "then rebuilt from the checkpoint's hyper-parameters)."
                )
                raise CheckpointError(msg)
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Check the files anomalib models download (timm weights, EfficientAD's teacher and Imagenette) first.

        Offline, a missing file then fails with one error naming it and its folder (:mod:`zsad.methods.assets`).
        Afterwards a W&B logger is made unable to prompt or hang (offline without an API key).
        """
        from zsad.methods.assets import ensure_model_assets

        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model = config.get("model") if hasattr(config, "get") else None
        class_path = getattr(model, "class_path", None)
        if class_path:
            init_args = getattr(model, "init_args", None)
            ensure_model_assets(class_path, vars(init_args) if init_args is not None else {}, self.subcommand == "fit")
        super().instantiate_classes()
        from zsad.wandb_fallback import ensure_wandb_usable

        ensure_wandb_usable(self.trainer.loggers)

    def after_fit(self) -> None:
        """Test on the target split right after training when ``--test_after_fit true``."""
        if self._get(self.config, "test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)  # the evaluator prints the table


def _same_class_path(first: str, second: str) -> bool:
    """Whether two import paths name the same class (``zsad.methods.X`` re-exports the method modules' classes)."""
    import importlib

    def resolve(path: str) -> object:
        module_name, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError):
            return path

    return first == second or resolve(first) is resolve(second)


def _import_plugins() -> None:
    # Importing registers zsad's classes as subclasses, so `--model LearnableVectors` and `--data CrossDataset`
    # resolve by short name (jsonargparse only knows imported subclasses).
    import zsad.data  # noqa: F401
    import zsad.deploy  # noqa: F401  (ExportedModel: `zsad predict --model model.onnx`)
    import zsad.methods  # noqa: F401


def _extra_command(name: str) -> Callable[[Sequence[str]], None]:
    module_name, func = EXTRA_COMMANDS[name].split(":")
    module = __import__(module_name, fromlist=[func])
    return getattr(module, func)


def _option(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def resolve_model_args(args: Sequence[str]) -> list[str]:
    """The one place that picks the model when the command line names none (or names an exported graph).

    * ``--model <file.onnx | file.xml>`` → :class:`zsad.deploy.ExportedModel` running that export (ONNX Runtime /
      OpenVINO).
    * ``predict | test | validate --ckpt_path <ckpt>`` without ``--model`` or ``--config`` → the model class recorded
      in the checkpoint (its hyper-parameters are then restored by LightningCLI from the same checkpoint).
    """
    args = list(args)
    model = _option(args, "--model")
    if model is not None and model.lower().endswith((".onnx", ".xml")):
        args = [a for a in args if a != model and not a.startswith("--model=") and a != "--model"]
        return [*args, "--model=zsad.deploy.ExportedModel", f"--model.path={model}"]
    ckpt_path = _option(args, "--ckpt_path")
    configured = model is not None or any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    if args and args[0] in ("predict", "test", "validate") and ckpt_path and not configured:
        from zsad.methods.checkpoint_io import checkpoint_class_path, read_lightning_checkpoint

        class_path = checkpoint_class_path(read_lightning_checkpoint(ckpt_path))
        if not class_path:
            msg = f"{ckpt_path} does not record its model class; pass --model <class> or --config <run config.yaml>."
            raise SystemExit(msg)
        args.insert(1, f"--model={class_path}")
    return args


def build_cli(args: Sequence[str] | None = None, run: bool = True, cli_class: type[ZSADCLI] | None = None) -> ZSADCLI:
    """Build (and by default run) the Lightning CLI; ``args`` replaces ``sys.argv[1:]`` (tests, notebooks)."""
    from anomalib.models import AnomalibModule

    _import_plugins()
    if args is None:
        # Rewrite the process's own arguments rather than passing `args`: LightningCLI warns when both are set.
        sys.argv[1:] = resolve_model_args(sys.argv[1:])
    else:
        args = resolve_model_args(args)
    return (cli_class or ZSADCLI)(
        model_class=AnomalibModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=111,
        parser_kwargs={"description": DESCRIPTION},
        args=args,
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``zsad``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        _extra_command(args[0])(args[1:])
        return
    build_cli(None if argv is None else args)


if __name__ == "__main__":
    main()
