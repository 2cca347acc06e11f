"""``pcpt-pretrain fit|validate``: LightningCLI over every pre-training method and the shard DataModule.

The YAML's ``model.class_path`` picks the method (``pretrain.methods.point_mae.PointMAE``, ...). Typed
``__init__`` signatures are the config schema; ``--print_config`` shows everything that will run. Before
fitting, ``--ckpt_path`` and ``--export_dir`` are checked and the resolved config's sha256 and the data
manifest's sha256 are recorded for provenance; after fitting, rank 0 writes the encoder artifact to
``<log dir>/encoder`` (``--export_dir`` overrides it), whatever the number of devices.

Logging: a config that sets no ``trainer.logger`` (or ``logger: true``) logs with TensorBoard when the
``tensorboard`` package is installed and to CSV files otherwise (:func:`default_logger`), in
``<default_root_dir>/lightning_logs/version_N`` (Lightning's own default layout). ``logger: false`` and a
configured logger are used as they are; the config (and its sha256 in the provenance) is not changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datapipes.datamodule import PointCloudDataModule
from pretrain.checkpoint import check_artifact_destination
from pretrain.lightning_base import PcptLightningCLI, run_lightning
from pretrain.methods.base import PretrainModule

__all__ = ["CLI_KWARGS", "PretrainCLI", "default_logger", "run_lightning_cli"]


def default_logger(save_dir: str | Path) -> Any:
    """The logger of a run whose config names none: TensorBoard if installed, else CSV.

    ``TensorBoardLogger`` when the ``tensorboard`` package can be imported, else ``CSVLogger``, both under
    ``save_dir/lightning_logs/version_N`` (where Lightning's default logger writes), without Lightning's
    notice about the missing package.

    Args:
        save_dir: the run folder (``trainer.default_root_dir``).
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if importlib.util.find_spec("tensorboard") is not None:
        return TensorBoardLogger(save_dir=str(save_dir))
    return CSVLogger(save_dir=str(save_dir))


class PretrainCLI(PcptLightningCLI):
    """LightningCLI that records provenance and exports the encoder artifact after ``fit``."""

    run_name = "pretrain"

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="where to write the encoder artifact after fit (default: <log dir>/encoder)",
        )
        # The method's data contract follows the data module; one value also keeps a logger's merge of the
        # two modules' hyperparameters consistent.
        parser.link_arguments("data.num_points", "model.init_args.num_points")

    def _export_dir(self) -> Path:
        """The artifact folder; call on every rank (``trainer.log_dir`` is a collective under DDP)."""
        base = self.trainer.log_dir or self.trainer.default_root_dir
        export_dir = self._subconfig().get("export_dir")
        return Path(export_dir) if export_dir is not None else Path(base) / "encoder"

    def before_fit(self) -> None:
        model = self.model
        if not isinstance(model, PretrainModule):
            return
        self.check_resume()
        export_dir = self._subconfig().get("export_dir")
        if export_dir is not None:
            check_artifact_destination(export_dir)  # refuse a bad destination before training, not after
        dump = self.parser.dump(self.config, skip_none=False, skip_check=True)
        model.provenance_extra["config_sha256"] = hashlib.sha256(dump.encode()).hexdigest()
        manifest_sha256 = getattr(self.datamodule, "manifest_sha256", None)
        if isinstance(manifest_sha256, str):
            model.provenance_extra["data_manifest_sha256"] = manifest_sha256

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with :func:`default_logger` when the config sets no logger (None or ``true``)."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        logger = trainer_config.get("logger")
        if "logger" not in kwargs and (logger is None or logger is True):
            kwargs["logger"] = default_logger(trainer_config.get("default_root_dir") or ".")
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        model = self.model
        if not isinstance(model, PretrainModule):
            return
        export_dir = self._export_dir()  # every rank: log_dir broadcasts
        if not self.trainer.is_global_zero:
            return
        path = model.export_encoder(export_dir)
        print(f"pcpt-pretrain: artifact written to {path}")


#: how ``pcpt-pretrain`` builds its LightningCLI (also used to instantiate configs without running them).
CLI_KWARGS: dict[str, Any] = {
    "model_class": PretrainModule,
    "datamodule_class": PointCloudDataModule,
    "subclass_mode_model": True,
    "save_config_kwargs": {"overwrite": True},
    "auto_configure_optimizers": False,
}


def run_lightning_cli(argv: Sequence[str]) -> int:
    """Runs LightningCLI with ``argv`` (starting with the subcommand, e.g. ``fit``); returns 0."""
    return run_lightning(PretrainCLI, argv, **CLI_KWARGS)
