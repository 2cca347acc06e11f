"""What every pcpt LightningCLI (``pcpt-pretrain fit``, ``pcpt-finetune fit``) shares.

- Runs go to ``runs/<name>/<UTC timestamp>`` unless ``--trainer.default_root_dir`` says otherwise, so a run
  never writes ``config.yaml`` or ``checkpoints/`` into the folder it was started from. The folder is chosen
  once per launch and handed to DDP worker processes through ``PCPT_RUN_DIR``.
- ``--ckpt_path`` is checked before anything runs: a missing file, a file that is not a Lightning
  checkpoint, a checkpoint of another method or with weights that do not fit the configured model are one
  error line naming the file (:class:`~datapipes.errors.UserError`), not a traceback after set-up.
- Lightning's configuration errors (``MisconfigurationException``) become one error line too.
- Notices that are not actionable for a pcpt user are silenced.
- A config that sets no ``trainer.logger`` (or ``logger: true``) logs with TensorBoard when the
  ``tensorboard`` package is installed and to CSV files otherwise (:func:`default_logger`), in
  ``<default_root_dir>/lightning_logs/version_N``; ``logger: false`` and a configured logger are used as they
  are, and the config (and its sha256 in the provenance) is not changed.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from datapipes.errors import UserError
from pretrain.artifact_files import state_mismatch
from pretrain.checkpoint import CKPT_META_KEY, ArtifactError, read_checkpoint_file

__all__ = ["RUN_DIR_ENV", "PcptLightningCLI", "check_resume_checkpoint", "default_logger", "run_lightning"]

#: environment variable that carries the default run folder to DDP worker processes.
RUN_DIR_ENV = "PCPT_RUN_DIR"
#: ``ckpt_path`` values Lightning resolves itself.
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def default_run_dir(name: str) -> str:
    """``runs/<name>/<UTC YYYYmmdd-HHMMSS>``, or the folder a parent process chose (``PCPT_RUN_DIR``)."""
    chosen = os.environ.get(RUN_DIR_ENV)
    if not chosen:
        chosen = str(Path("runs") / name / time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        os.environ[RUN_DIR_ENV] = chosen
    return chosen


def check_resume_checkpoint(
    path: str | Path, model: torch.nn.Module, *, method: str | None, ckpt: Mapping[str, Any]
) -> None:
    """Checks that a Lightning checkpoint can resume ``model``.

    Args:
        path: the checkpoint file (named in messages).
        model: the configured LightningModule.
        method: the model's pcpt method name, compared with the checkpoint's when both are known.
        ckpt: the loaded checkpoint.

    Raises:
        UserError: the checkpoint has no ``state_dict``, belongs to another method, or its weights do not
            fit the model (missing or unexpected keys, other shapes: the first few are named).
    """
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: not a Lightning checkpoint (no state_dict); --ckpt_path resumes a run")
    info = ckpt.get(CKPT_META_KEY)
    saved_method = info.get("method") if isinstance(info, Mapping) else None
    if method and saved_method and saved_method != method:
        raise UserError(f"{path}: a checkpoint of method {saved_method!r}, the config trains {method!r}")
    problems = state_mismatch(model.state_dict(), state)
    if problems:
        raise UserError(f"{path}: weights do not fit the configured model: {'; '.join(problems)}")


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


class PcptLightningCLI(LightningCLI):
    """LightningCLI with pcpt's run folder, checked ``--ckpt_path`` and one-line configuration errors.

    Subclasses set :attr:`run_name` (the ``runs/<name>`` folder) and may override :meth:`method_of`.
    """

    run_name: ClassVar[str] = "run"

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters while parsing: check the file first.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._resume_ckpt: Mapping[str, Any] | None = None
        if (
            ckpt_path
            and str(ckpt_path) not in _SPECIAL_CKPT_PATHS
            and not str(ckpt_path).startswith("registry")
        ):
            src = Path(ckpt_path)
            if not src.is_file():
                raise UserError(f"{src}: no such checkpoint file (--ckpt_path)")
            _, ckpt = read_checkpoint_file(src, mmap=True)
            if not isinstance(ckpt, Mapping):
                raise ArtifactError(f"{src}: not a Lightning checkpoint (--ckpt_path)")
            self._resume_ckpt = ckpt
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with :func:`default_logger` when the config sets no logger (None or ``true``)."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        logger = trainer_config.get("logger")
        if "logger" not in kwargs and (logger is None or logger is True):
            kwargs["logger"] = default_logger(trainer_config.get("default_root_dir") or ".")
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Puts runs under ``runs/<name>/<timestamp>`` when no ``default_root_dir`` is configured."""
        trainer = self._subconfig().get("trainer")
        if trainer is not None and not trainer.get("default_root_dir"):
            trainer["default_root_dir"] = default_run_dir(self.run_name)

    def method_of(self, model: Any) -> str | None:
        """The pcpt method name of ``model`` compared with a resumed checkpoint's (None: not compared)."""
        name = getattr(model, "method_name", None)
        return str(name) if name else None

    def check_resume(self) -> None:
        """Checks ``--ckpt_path`` against the instantiated model (call before fitting)."""
        ckpt = getattr(self, "_resume_ckpt", None)
        if ckpt is not None:
            path = self._subconfig().get("ckpt_path")
            check_resume_checkpoint(path, self.model, method=self.method_of(self.model), ckpt=ckpt)
            self._resume_ckpt = None  # release the memory map


def _quiet_lightning() -> None:
    """Silences notices a pcpt user cannot act on."""
    # pcpt passes the command line to LightningCLI explicitly (console scripts dispatch subcommands).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # the empty validation loader of a data module without a validation split
    warnings.filterwarnings("ignore", message="Total length of .* across ranks is zero")


def run_lightning(cli_class: type[PcptLightningCLI], argv: Sequence[str], **kwargs: Any) -> int:
    """Runs ``cli_class(args=argv, **kwargs)``; Lightning configuration errors become a UserError.

    Returns:
        0 (errors are raised).
    """
    _quiet_lightning()
    try:
        cli_class(args=list(argv), **kwargs)
    except MisconfigurationException as err:
        raise UserError(f"configuration error: {err}") from err
    return 0
