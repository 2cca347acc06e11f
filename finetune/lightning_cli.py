"""``pcpt-finetune fit``: LightningCLI for classification finetuning / linear probing of an encoder artifact.

``--model.pretrained ART`` loads the artifact strictly and checks its data contract against the data module.
The number of classes comes from the shards' manifest. After fitting, the test split is evaluated once, with
the checkpoint selected on the validation split (held out from train) when a ``ModelCheckpoint`` monitors
``val/acc``, else with the last epoch's weights; ``results.json`` in the log directory records the protocol,
the selection split, single-pass accuracy, the fixed-count voting accuracy separately and the trainable and
frozen parameter counts. ``--export_dir`` writes the finetuned encoder (with the weights the test used) as an
artifact, e.g. an Any2Point encoder for ``probe``, ``fewshot`` and ``embed``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.classification import PointClassifier
from finetune.data import ClassificationDataModule
from pretrain.artifacts import save_module_artifact
from pretrain.checkpoint import read_checkpoint_file
from pretrain.encoders import DataContract
from pretrain.lightning_base import PcptLightningCLI, run_lightning

__all__ = ["CLI_KWARGS", "FinetuneCLI", "run_lightning_cli"]


class FinetuneCLI(PcptLightningCLI):
    """LightningCLI with the data → model links and a final held-out-selected test evaluation."""

    run_name = "finetune"
    #: the checkpoint the test evaluated (its weights are in the model afterwards), if not the last epoch's
    _selected_checkpoint: str | None = None

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_points", "model.num_points")
        parser.link_arguments("data.pool_points", "model.pool_points")
        parser.add_argument("--skip_test", type=bool, default=False, help="do not evaluate the test split")
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="write the finetuned encoder (the selected checkpoint's) as an artifact there after fit",
        )

    def before_fit(self) -> None:
        model, data = self.model, self.datamodule
        if isinstance(model, PointClassifier) and isinstance(data, ClassificationDataModule):
            for warning in model.check_data(data.num_points, data.normalization, data_root=data.data_root):
                print(f"pcpt-finetune: warning: {warning}", file=sys.stderr)
        self.check_resume()

    def after_fit(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.get("skip_test"):
            self._test_selected()
        if config.get("export_dir"):
            self._export(str(config["export_dir"]))

    def _export(self, out_dir: str) -> None:
        """Writes the finetuned encoder as an artifact (rank 0).

        The weights are those the test used (the selected checkpoint's), or the last epoch's with
        ``--skip_test``.
        """
        model, data = self.model, self.datamodule
        if not self.trainer.is_global_zero:
            return
        if not (isinstance(model, PointClassifier) and isinstance(data, ClassificationDataModule)):
            return
        contract = DataContract(
            num_points=data.num_points,
            normalization="none" if data.normalization == "none" else "unit_sphere",
            fps_order=bool(data.manifest.get("fps_ordered", False)),
        )
        upstream = model.artifact_meta.get("provenance") or {}
        step, epoch, selected = self.trainer.global_step, self.trainer.current_epoch, "last epoch"
        if self._selected_checkpoint:  # the test loaded it: its own step and epoch, not the run's last
            src, ckpt = read_checkpoint_file(self._selected_checkpoint)
            step, epoch, selected = ckpt.get("global_step"), ckpt.get("epoch"), src.name
        provenance = {
            "method": f"finetune ({upstream.get('method', 'random-init')})",
            "step": step,
            "epoch": epoch,
            "checkpoint": selected,
            "parameters": model.parameter_counts(),
            "finetuned_from": model.hparams.get("pretrained"),
            "upstream": upstream,
        }
        out = save_module_artifact(out_dir, model.encoder, data=contract, provenance=provenance)
        print(f"pcpt-finetune: artifact written to {out}")

    def _test_selected(self) -> None:
        callback = self.trainer.checkpoint_callback
        checkpoint = callback if isinstance(callback, ModelCheckpoint) else None
        monitored = checkpoint is not None and checkpoint.monitor == "val/acc"
        ckpt_path = "best" if checkpoint is not None and monitored and checkpoint.best_model_path else None
        if ckpt_path == "best" and checkpoint is not None:
            self._selected_checkpoint = checkpoint.best_model_path
        metrics = self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False
        )
        if not self.trainer.is_global_zero:
            return
        model, data = self.model, self.datamodule
        if not (isinstance(model, PointClassifier) and isinstance(data, ClassificationDataModule)):
            return
        result = {
            "protocol": model.protocol,
            "model_selection": {
                **data.selection,
                "checkpoint": (
                    f"best val/acc ({float(checkpoint.best_model_score or 0):.4f}) at "
                    f"{Path(checkpoint.best_model_path).name}"
                    if ckpt_path == "best" and checkpoint is not None
                    else "last epoch"
                ),
            },
            "test_split": data.test_split,
            "metrics": {k: float(v) for k, v in (metrics[0] if metrics else {}).items()},
            "voting": (
                f"{model.vote_views} augmented views averaged once (no best-of-N)"
                if model.vote_views > 0
                else "none (single pass only)"
            ),
            "pretrained": model.hparams.get("pretrained"),
            "parameters": model.parameter_counts(),
            "artifact_provenance": model.artifact_meta.get("provenance"),
            "seed": model.seed,
        }
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["metrics"]))
        print(f"pcpt-finetune: results written to {out}")


#: how ``pcpt-finetune`` builds its LightningCLI (also used to instantiate configs without running them).
CLI_KWARGS: dict[str, Any] = {
    "model_class": PointClassifier,
    "datamodule_class": ClassificationDataModule,
    "save_config_kwargs": {"overwrite": True},
    "auto_configure_optimizers": False,
}


def run_lightning_cli(argv: Sequence[str]) -> int:
    """Runs the finetuning LightningCLI with ``argv`` (starting with the subcommand); returns 0."""
    return run_lightning(FinetuneCLI, argv, **CLI_KWARGS)
