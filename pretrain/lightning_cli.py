"""``pcpt-pretrain fit|validate``: LightningCLI over every pre-training method and the shard DataModule.

The YAML's ``model.class_path`` picks the method (``pretrain.methods.point_mae.PointMAE``, ...). Typed
``__init__`` signatures are the config schema; ``--print_config`` shows everything that will run. Before
fitting, ``--ckpt_path`` and ``--export_dir`` are checked and the resolved config's sha256 and the data
manifest's sha256 are recorded for provenance; after fitting, rank 0 writes the encoder artifact to
``<log dir>/encoder`` (``--export_dir`` overrides it), whatever the number of devices.

Logging: see :func:`~pretrain.lightning_base.default_logger` (TensorBoard when installed, else CSV, for a
config that names no logger).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datapipes.datamodule import PointCloudDataModule
from pretrain.checkpoint import check_artifact_destination
from pretrain.lightning_base import PcptLightningCLI, default_logger, run_lightning
from pretrain.methods.base import PretrainModule

__all__ = ["CLI_KWARGS", "PretrainCLI", "default_logger", "run_lightning_cli"]


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
