"""Shared orchestration for pre-training methods.

:class:`PretrainModule` owns what every method needs and nothing method-specific: the encoder it trains
(built from its family's spec), the injected optimiser and learning-rate schedule (LightningCLI callables,
wired by ``pretrain.optim.configure_optimization``), per-step seeded random generators, the data contract,
the metadata that makes a Lightning checkpoint exportable (``checkpoint["pcpt"]``) and the artifact export.
A method subclasses it, names the module it exports (:attr:`exported_module`, ``"encoder"`` by default) and
implements ``training_step``; the maths lives in ``pretrain.ops``, ``pretrain.nn`` and ``pretrain.losses``.

``compile=True`` compiles the heavy pure-torch parts of a method in place (:attr:`compile_types`, the
transformer blocks by default) with ``nn.Module.compile``, which keeps the state-dict keys (no ``_orig_mod.``
prefix), so checkpoints and artifacts of compiled runs load into eager models. Grouping (FPS, kNN), masking
and the losses stay eager: they hold data-dependent loops and shapes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from pretrain.artifact_files import WEIGHTS_FILE
from pretrain.artifacts import kind_of, load_encoder, module_spec, save_module_artifact
from pretrain.checkpoint import CKPT_META_KEY, lightning_ckpt_meta
from pretrain.encoders import DataContract, EncoderSpec, PointEncoder, build_encoder, spec_from_dict
from pretrain.nn.perceiver import CrossAttentionLayer, SelfAttentionLayer
from pretrain.nn.transformer import Block, CrossAttentionBlock
from pretrain.optim import AdamW, configure_optimization
from pretrain.schedules import WarmupCosineLR
from pretrain.training import MicroBatchIndex, epochs_trained, seed_step_randomness, seeded_generator

__all__ = ["PretrainModule"]


class PretrainModule(pl.LightningModule):
    """Base LightningModule of every pcpt pre-training method.

    Args:
        encoder: spec of the encoder being pre-trained (any registered family the method supports), or None
            for methods that train no point encoder (the Point-BERT dVAE; they set :attr:`exported_module`).
        optimizer: parameter groups -> optimiser (default: AdamW, lr 1e-3, weight decay 0.05; no decay on
            1-D parameters, biases and tokens).
        lr_scheduler: optimiser -> schedule, stepped every optimiser step (default: linear warmup over 10
            epochs, then cosine to 1e-6, sized from the data); None keeps the learning rate constant.
        num_points: points per cloud; recorded in the artifact's data contract.
        normalization: cloud normalisation the data uses; recorded in the data contract.
        seed: base seed of the per-step random draws (masks, noise, dropout, drop-path).
        init_from: a ``point_encoder`` artifact to start from (the output of an earlier stage, e.g. Point-MAE
            before a contrastive stage): its spec replaces ``encoder`` and its weights are loaded strictly;
            the artifact's path, method and weights checksum go into the provenance.
        compile: compile the modules of :attr:`compile_types` in place with ``torch.compile`` when the model
            is configured (``configure_model``, or :meth:`compile_modules` outside a Trainer). State-dict
            keys do not change. In-graph random draws (dropout, drop-path) then come from inductor's own
            generator: reproducible, but not the eager draws.
        compile_mode: ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``, ...;
            None: torch's default).
        compile_dynamic: ``torch.compile``'s ``dynamic`` (None: recompile once with dynamic shapes when a
            shape changes; False: a graph per shape; True: dynamic from the start).
    """

    method_name: ClassVar[str] = "pretrain"
    #: attribute holding the module the method hands to the next stage (written as its artifact).
    exported_module: ClassVar[str] = "encoder"
    #: whether ``init_from`` makes sense: the method trains the point encoder it is given.
    accepts_init_from: ClassVar[bool] = True
    #: attributes of further modules written with it, as artifacts in subfolders ``<artifact>/<name>``
    #: (e.g. the image encoder of an image-point contrastive method).
    companion_modules: ClassVar[tuple[str, ...]] = ()
    #: module types that ``compile=True`` compiles in place (outermost instances only): pure-torch parts
    #: with static control flow. Methods override it (an empty tuple: nothing of the method compiles).
    compile_types: ClassVar[tuple[type[nn.Module], ...]] = (
        Block,
        CrossAttentionBlock,
        CrossAttentionLayer,
        SelfAttentionLayer,
    )

    def __init__(
        self,
        encoder: EncoderSpec | None,
        *,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        num_points: int = 1024,
        normalization: Literal["unit_sphere", "none"] = "unit_sphere",
        seed: int = 0,
        init_from: str | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_dynamic: bool | None = None,
    ) -> None:
        super().__init__()
        if encoder is not None and not isinstance(encoder, EncoderSpec):
            encoder = spec_from_dict(encoder)
        self.provenance_extra: dict[str, Any] = {}
        start: PointEncoder | None = None
        if init_from is not None:
            if not self.accepts_init_from:
                raise ValueError(
                    f"{type(self).__name__} does not train a point encoder: init_from is not used"
                )
            start, origin = _encoder_to_start_from(init_from)
            if encoder is not None and encoder != start.spec:
                rank_zero_info(f"init_from {init_from}: its encoder spec replaces the configured one")
            encoder = start.spec
            self.provenance_extra["init_from"] = origin
        self.encoder_spec: EncoderSpec | None = encoder
        if start is not None:
            self.encoder: PointEncoder = start
        elif encoder is not None:
            self.encoder = build_encoder(encoder)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.num_points, self.normalization, self.seed = num_points, normalization, seed
        self.fps_ordered_data = False
        self.loss_weights: dict[str, float] = {}  # methods with several loss terms: set_loss_weights
        self._micro_batch = MicroBatchIndex()
        self.compile_enabled, self.compile_mode, self.compile_dynamic = compile, compile_mode, compile_dynamic
        self._compiled: list[str] = []

    # ------------------------------------------------------------------------------------------ compile
    def configure_model(self) -> None:
        """Compiles the heavy parts when ``compile=True`` (Lightning calls it before training)."""
        if self.compile_enabled:
            self.compile_modules()

    def compile_targets(self) -> dict[str, nn.Module]:
        """The outermost submodules of a :attr:`compile_types` type, by qualified name."""
        targets: dict[str, nn.Module] = {}
        for name, module in self.named_modules():
            if not self.compile_types or not isinstance(module, self.compile_types):
                continue
            if any(name.startswith(f"{outer}.") for outer in targets):
                continue
            targets[name] = module
        return targets

    def compile_modules(self) -> list[str]:
        """Compiles every :meth:`compile_targets` module in place (``nn.Module.compile``); idempotent.

        The compiled call replaces the module's ``__call__`` only: parameters, buffers and state-dict keys
        stay those of the eager module.

        Returns:
            The qualified names of the compiled modules.
        """
        if self._compiled:
            return list(self._compiled)
        targets = self.compile_targets()
        if not targets:
            rank_zero_info(f"{type(self).__name__}: compile=True, but the method has no module to compile")
        for module in targets.values():
            module.compile(mode=self.compile_mode, dynamic=self.compile_dynamic)
        self._compiled = list(targets)
        rank_zero_info(f"{type(self).__name__}: compiled {len(targets)} module(s) with torch.compile")
        return list(self._compiled)

    # ----------------------------------------------------------------------------------------- randomness
    def step_generator(self, stream: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, rank, global step, micro-batch index, stream).

        Masks and other per-step draws come from it, so a run is reproducible and a resumed run continues
        with the same draws it would have made, and ranks draw different masks. ``stream`` separates
        independent draws of one step.
        """
        micro = self._micro_batch.index
        return seeded_generator(self.seed, self.global_rank, self.global_step, micro, stream)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seeds the default generators for this step (drop-path, dropout): see ``seed_step_randomness``."""
        micro = self._micro_batch.advance(self.global_step)
        seed_step_randomness(self.seed, "layers", self.global_rank, self.global_step, micro)

    # --------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        """The injected optimiser over the decay / no-decay groups and its per-step schedule."""
        return configure_optimization(self, self.optimizer, self.lr_scheduler)

    # ------------------------------------------------------------------------------------ data contract
    def setup(self, stage: str) -> None:
        """Reads the data contract (points, normalisation, FPS order) from the datamodule, if it has one."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        contract = getattr(datamodule, "data_contract", None)
        if isinstance(contract, Mapping):
            self.num_points = int(contract.get("num_points", self.num_points))
            self.normalization = contract.get("normalization", self.normalization)
            self.fps_ordered_data = bool(contract.get("fps_order", False))

    @property
    def data_contract(self) -> DataContract:
        """Preprocessing the exported module is trained with (stored in the artifact)."""
        return DataContract(
            num_points=self.num_points, normalization=self.normalization, fps_order=self.fps_ordered_data
        )

    # ------------------------------------------------------------------------------------------- export
    def exported(self) -> nn.Module:
        """The module this method hands to the next stage (``getattr(self, exported_module)``)."""
        module = getattr(self, self.exported_module, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{type(self).__name__} has no module {self.exported_module!r} to export")
        return module

    def companions(self) -> dict[str, nn.Module]:
        """The modules of :attr:`companion_modules` by name."""
        found = {name: getattr(self, name, None) for name in self.companion_modules}
        missing = [name for name, module in found.items() if not isinstance(module, nn.Module)]
        if missing:
            raise ValueError(f"{type(self).__name__} has no companion module(s) {missing} to export")
        return {name: module for name, module in found.items() if isinstance(module, nn.Module)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stores what ``pcpt-pretrain export`` needs to rebuild the exported modules from the checkpoint."""
        meta = lightning_ckpt_meta(
            method=self.method_name,
            module=self.exported(),
            prefix=f"{self.exported_module}.",
            data_contract=self.data_contract,
            config_sha256=self.provenance_extra.get("config_sha256"),
            data_manifest_sha256=self.provenance_extra.get("data_manifest_sha256"),
        )
        companions = self.companions()
        if companions:
            meta["companions"] = {
                name: {"kind": kind_of(module).name, "spec": module_spec(module), "prefix": f"{name}."}
                for name, module in companions.items()
            }
        checkpoint[CKPT_META_KEY] = meta

    def export_encoder(self, out_dir: str | Path, **provenance: Any) -> Path:
        """Writes the exported module as an artifact with the provenance of this run (companions inside it).

        Args:
            out_dir: artifact directory.
            **provenance: fields that override the collected ones (method, step, epoch, ...).
        """
        info = {
            "method": self.method_name,
            "step": int(self.global_step),
            "epoch": epochs_trained(self._trainer) if self._trainer is not None else 0,
            **{k: v for k, v in self.provenance_extra.items() if v is not None},
            **provenance,
        }
        out = save_module_artifact(out_dir, self.exported(), data=self.data_contract, provenance=info)
        for name, module in self.companions().items():
            save_module_artifact(out / name, module, data=self.data_contract, provenance=info)
        return out

    # -------------------------------------------------------------------------------------- loss terms
    def set_loss_weights(self, weights: Mapping[str, float]) -> None:
        """Stores the weights of named loss terms (see :meth:`total_loss`).

        Raises:
            ValueError: a negative weight, or all weights 0.
        """
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"loss weights must be >= 0 and not all 0, got {dict(weights)}")
        self.loss_weights = dict(weights)

    def total_loss(self, terms: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum of named loss terms with the weights of :meth:`set_loss_weights`."""
        return torch.stack([self.loss_weights[name] * value for name, value in terms.items()]).sum()

    def log_loss(self, stage: str, loss: Tensor, terms: Mapping[str, Tensor], batch_size: int) -> None:
        """Logs ``<stage>/loss`` (progress bar) and every term as ``<stage>/<name>``; synced in validation."""
        sync = stage == "val"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=sync)

    @staticmethod
    def batch_points(batch: Any) -> Tensor:
        """The (B, N, 3) points of a batch (a ``PointBatch`` or a bare tensor)."""
        points = getattr(batch, "points", batch)
        if not isinstance(points, Tensor) or points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"expected a batch with points (B, N, 3), got {type(batch).__name__}")
        return points


def _encoder_to_start_from(path: str) -> tuple[PointEncoder, dict[str, Any]]:
    """The encoder of a ``point_encoder`` artifact and where it came from (for the provenance)."""
    encoder, meta = load_encoder(path)
    weights = Path(path) / WEIGHTS_FILE
    origin = {
        "artifact": str(path),
        "method": (meta.get("provenance") or {}).get("method"),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    return encoder, origin
