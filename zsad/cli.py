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
    "demo": "zsad.demo:main",
    "experiment": "zsad.experiment:main",
}

DESCRIPTION = (
    "zsad: CLIP-based zero-shot anomaly detection on PyTorch Lightning.\n"
    "Lightning subcommands: fit, validate, test, predict (below).\n"
    "Extra commands: zsad benchmark (parameters and images/s), zsad export (learned parameters as safetensors), "
    "zsad demo (the embedded default end to end), zsad experiment (a paper's table from one spec). Each has --help."
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

    def instantiate_classes(self) -> None:
        """Check the files anomalib models download (timm weights, EfficientAD's teacher and Imagenette) first.

        Offline, a missing file then fails with one error naming it and its folder (:mod:`zsad.methods.assets`).
        """
        from zsad.methods.assets import ensure_model_assets

        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model = config.get("model") if hasattr(config, "get") else None
        class_path = getattr(model, "class_path", None)
        if class_path:
            init_args = getattr(model, "init_args", None)
            ensure_model_assets(class_path, vars(init_args) if init_args is not None else {}, self.subcommand == "fit")
        super().instantiate_classes()

    def after_fit(self) -> None:
        """Test on the target split right after training when ``--test_after_fit true``."""
        if self._get(self.config, "test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)  # the evaluator prints the table


def _import_plugins() -> None:
    # Importing registers zsad's classes as subclasses, so `--model LearnableVectors` and `--data CrossDataset`
    # resolve by short name (jsonargparse only knows imported subclasses).
    import zsad.data  # noqa: F401
    import zsad.methods  # noqa: F401


def _extra_command(name: str) -> Callable[[Sequence[str]], None]:
    module_name, func = EXTRA_COMMANDS[name].split(":")
    module = __import__(module_name, fromlist=[func])
    return getattr(module, func)


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> ZSADCLI:
    """Build (and by default run) the Lightning CLI; ``args`` replaces ``sys.argv[1:]`` (tests, notebooks)."""
    from anomalib.models import AnomalibModule

    _import_plugins()
    return ZSADCLI(
        model_class=AnomalibModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=111,
        parser_kwargs={"description": DESCRIPTION},
        args=list(args) if args is not None else None,
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
