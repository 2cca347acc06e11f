"""``PointCloudDataModule``: pcpt shards as a LightningDataModule (streaming train, in-memory validation).

Training streams shards through :func:`datapipes.pipeline.make_train_loader` (resampled, exact
``batches_per_epoch`` on every rank) or, with ``streaming=False``, iterates an in-memory split with a
seeded ``DistributedSampler``. Validation is always map-style and in memory, so Lightning's distributed
sampler splits it evenly. Data randomness depends on ``(seed, rank, worker, epoch)`` and the epoch is read
from the trainer at the start of every epoch, so a run resumed from a checkpoint at an epoch boundary
continues with the data it would have seen.

Damaged data stops training with an error naming the shard: every reader checks each shard's sample count
against the manifest, that the tar is complete and that point arrays are finite. ``verify=True`` also hashes
every shard against the manifest's sha256 before training starts.

``data_root`` may be a URL (``https://host/data/demo``, ``s3://bucket/demo``; see
:mod:`datapipes.shards.remote`): every shard is then downloaded when it is read and used only if its sha256
equals the manifest's, so remote data is always hash-checked, with or without ``verify``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cached_property, partial
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from datapipes.collate import collate
from datapipes.epochs import Capped, EpochLoader
from datapipes.errors import UserError
from datapipes.memory import InMemoryPointDataset
from datapipes.pipeline import make_train_loader
from datapipes.shards import (
    MANIFEST_NAME,
    check_shard_hashes,
    manifest_sha256,
    read_manifest,
    shard_locations,
)
from datapipes.streams import resolve_rank
from datapipes.transforms import Compose, NormalizeUnitSphere, TakePoints, Transform, build_augment
from datapipes.types import BatchFields, PointBatch

__all__ = ["PointCloudDataModule"]

AugmentPreset = Literal["none", "scale_translate", "rotate_jitter"]


class PointCloudDataModule(pl.LightningDataModule):
    """Batches of :class:`~datapipes.types.PointBatch` from a pcpt shard folder.

    Args:
        data_root: shard folder (``manifest.json`` inside), e.g. written by ``pcpt-data synth``: a local
            path or a URL (``https://...``, ``s3://...``).
        train_split: split used for training.
        val_split: split used for validation (``None``: no validation).
        num_points: points per cloud in every batch; at most the smallest stored cloud (``points.min`` in the
            manifest), clouds are never padded with repeated points. With ``fields.ragged`` an upper bound:
            smaller clouds keep all their points and batches are padded (see :class:`BatchFields`).
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes.
        batches_per_epoch: training batches per epoch on every rank; default: train samples //
            (batch_size × world_size). With ``streaming=False`` it caps the pass over the split.
        augment: a preset (``"none"``, ``"scale_translate"`` = Point-MAE's ScaleAndTranslate,
            ``"rotate_jitter"``) or a list of transform configs like ``[{"name": "rotate", "axis": "y"}]``.
        streaming: stream training data from shards (``False``: load the training split into memory).
        seed: base seed of every data random stream.
        point_sampling: how training takes ``num_points``: ``"random"`` (without replacement) or
            ``"first"`` (the FPS subsample of FPS-ordered shards). Validation always takes the FPS subsample.
        fps_pool: with ``"random"`` on FPS-ordered shards, draw from the first ``fps_pool`` points (1200 for
            1024 reproduces Point-MAE fine-tuning); an upper bound, capped at the stored cloud size.
        normalize: centre and scale every selected cloud into the unit sphere (before augmentation).
        fields: what batches hold besides points, labels and keys (normals, feature channels, image views,
            point views, ragged clouds), e.g. ``fields: {normals: true, point_views: 2}`` in YAML.
        normals: shorthand kept for existing configs: ``fields.normals``.
        point_features: shorthand kept for existing configs: ``fields.point_features``.
        images: shorthand kept for existing configs: one image view (``fields.image_views = 1``).
        shuffle_buffer: per-worker shuffle buffer of the streaming pipeline.
        val_batch_size: validation batch size (default ``batch_size``).
        verify: in :meth:`setup`, hash every shard of the train and validation splits and compare it with the
            manifest's sha256 (reads the whole dataset once, with progress on stderr). Without it
            the readers still check each shard's structure, sample count and finite point arrays as they
            read; the hashes also catch changed bytes that still decode.
    """

    def __init__(
        self,
        data_root: str,
        train_split: str = "train",
        val_split: str | None = "test",
        num_points: int = 1024,
        batch_size: int = 32,
        num_workers: int = 2,
        batches_per_epoch: int | None = None,
        augment: AugmentPreset | list[dict[str, Any]] = "scale_translate",
        streaming: bool = True,
        seed: int = 0,
        point_sampling: Literal["random", "first"] = "random",
        fps_pool: int | None = None,
        normalize: bool = True,
        fields: BatchFields | dict[str, Any] | None = None,
        normals: bool = False,
        point_features: list[str] | None = None,
        images: bool = False,
        shuffle_buffer: int = 1000,
        val_batch_size: int | None = None,
        verify: bool = False,
    ) -> None:
        super().__init__()
        if num_points < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"need num_points >= 1, batch_size >= 1, num_workers >= 0; got {num_points}, {batch_size}, "
                f"{num_workers}"
            )
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        if fps_pool is not None and fps_pool < num_points:
            raise ValueError(f"fps_pool must be >= num_points ({num_points}), got {fps_pool}")
        self.data_root = str(data_root)
        self.train_split, self.val_split = train_split, val_split
        self.num_points, self.batch_size, self.num_workers = num_points, batch_size, num_workers
        self.batches_per_epoch = batches_per_epoch
        self.augment = build_augment(augment)
        self.streaming, self.seed = streaming, seed
        self.point_sampling, self.fps_pool, self.normalize = point_sampling, fps_pool, normalize
        self.fields = _merge_fields(fields, normals=normals, point_features=point_features, images=images)
        self.shuffle_buffer = shuffle_buffer
        self.val_batch_size = val_batch_size or batch_size
        self.verify = verify
        self._verified = False
        self._val_set: InMemoryPointDataset | None = None
        self._resume_position: dict[str, int] | None = None
        self._train_loader: EpochLoader | None = None
        self.save_hyperparameters(ignore=["fields"])
        self.save_hyperparameters({"fields": self.fields.to_dict()})  # plain data: checkpoints load safely

    # ------------------------------------------------------------------------------------------ metadata
    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The shard folder's manifest (read once)."""
        return read_manifest(self.data_root)

    @property
    def num_classes(self) -> int:
        """Number of classes listed in the manifest."""
        return len(self.manifest.get("classes", []))

    @property
    def manifest_sha256(self) -> str:
        """sha256 of ``manifest.json`` (identifies the exact data)."""
        return manifest_sha256(self.data_root)

    @property
    def data_contract(self) -> dict[str, Any]:
        """Preprocessing an encoder trained on these batches expects: points, normalisation, FPS order."""
        return {
            "num_points": self.num_points,
            "normalization": "unit_sphere" if self.normalize else "none",
            "fps_order": bool(self.manifest.get("fps_ordered", False)),
        }

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return resolve_rank()

    def _trainer_epoch(self) -> int | None:
        trainer = self.trainer
        return None if trainer is None else int(trainer.current_epoch)

    def _trainer_progress(self) -> tuple[int, int] | None:
        """(epoch, batches of it trained) as a checkpoint saved now records them (for mid-epoch resume)."""
        trainer = self.trainer
        if trainer is None:
            return None
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        return int(trainer.current_epoch), int(getattr(current, "processed", current.completed))

    def _split_samples(self, split: str) -> int:
        splits = self.manifest["splits"]
        if split not in splits:
            raise UserError(f"{self.data_root}: no split {split!r} in {MANIFEST_NAME} (has {sorted(splits)})")
        return int(splits[split]["samples"])

    # ------------------------------------------------------------------------------------------ transforms
    def train_transform(self) -> Transform:
        """Point selection, optional normalisation, then the augmentation."""
        fps = bool(self.manifest.get("fps_ordered", False))
        if self.streaming and self.point_sampling == "first" and not fps:
            raise UserError(
                f"{self.data_root}: point_sampling='first' needs FPS-ordered shards (manifest says "
                "fps_ordered=false); use point_sampling='random'"
            )
        pool = self.fps_pool if fps else None
        take = TakePoints(self.num_points, mode=self.point_sampling, pool=pool, keep_fewer=self.fields.ragged)
        steps: list[Transform] = [take]
        if self.normalize:
            steps.append(NormalizeUnitSphere())
        return Compose((*steps, *self.augment.transforms))

    @property
    def _collate(self) -> Callable[[list[Any]], PointBatch]:
        return partial(collate, ragged=self.fields.ragged)

    def eval_transform(self) -> Transform:
        """Evaluation: the FPS subsample (taken at load time), optionally normalised, no augmentation."""
        return Compose((NormalizeUnitSphere(),) if self.normalize else ())

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, stage: str | None = None) -> None:
        """Checks the manifest, the requested splits and ``num_points``; with ``verify``, every shard's hash.

        Raises:
            UserError: for a missing split or ``num_points`` above the smallest stored cloud.
            ShardFormatError: with ``verify``, naming the first shard whose sha256 differs from the manifest.
        """
        self._split_samples(self.train_split)
        if self.val_split is not None:
            self._split_samples(self.val_split)
        points = self.manifest.get("points")
        stored = points.get("min") if isinstance(points, dict) else None
        if isinstance(stored, int) and stored < self.num_points and not self.fields.ragged:
            raise UserError(
                f"{self.data_root}: num_points {self.num_points} requested, but the smallest stored cloud "
                f"has {stored} points; ask for at most {stored} (--data.num_points)"
            )
        if self.verify and not self._verified:
            splits = [self.train_split] + ([self.val_split] if self.val_split is not None else [])
            rank, _ = self._rank()
            check_shard_hashes(self.data_root, splits, manifest=self.manifest, progress=rank == 0)
            self._verified = True

    def default_batches_per_epoch(self) -> int:
        """``batches_per_epoch`` or train samples // (batch_size × world_size)."""
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        _, world_size = self._rank()
        samples = self._split_samples(self.train_split)
        batches = samples // (self.batch_size * world_size)
        if batches < 1:
            raise UserError(
                f"{self.data_root}: split {self.train_split!r} has {samples} samples, fewer than one global "
                f"batch ({self.batch_size} x {world_size} ranks); lower batch_size or set batches_per_epoch"
            )
        return batches

    def train_batches_per_epoch(self) -> int:
        """Training batches per epoch on this rank (what :meth:`train_dataloader` yields), without loading."""
        if self.streaming:
            return self.default_batches_per_epoch()
        _, world_size = self._rank()
        per_rank = self._split_samples(self.train_split) // world_size  # DistributedSampler, drop_last
        batches = per_rank // self.batch_size
        return batches if self.batches_per_epoch is None else min(batches, self.batches_per_epoch)

    def train_dataloader(self) -> EpochLoader:
        """Training batches; exactly :meth:`default_batches_per_epoch` per rank and epoch when streaming."""
        loader = self._build_train_loader()
        if self._resume_position is not None:  # Lightning restores the datamodule before it builds the loader
            loader.load_state_dict(self._resume_position)
            self._resume_position = None
        self._train_loader = loader
        return loader

    def _build_train_loader(self) -> EpochLoader:
        rank, world_size = self._rank()
        if self.streaming:
            return make_train_loader(
                shard_locations(self.data_root, self.train_split, self.manifest),
                transform=self.train_transform(),
                batch_size=self.batch_size,
                batches_per_epoch=self.default_batches_per_epoch(),
                num_workers=self.num_workers,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
                shuffle_buffer=self.shuffle_buffer,
                fields=self.fields,
                epoch_source=self._trainer_epoch,
                progress_source=self._trainer_progress,
            )
        fps = bool(self.manifest.get("fps_ordered", False))
        preload = self.num_points if self.point_sampling == "first" else (self.fps_pool if fps else None)
        dataset = InMemoryPointDataset(
            self.data_root,
            self.train_split,
            num_points=preload,
            transform=self.train_transform(),
            seed=self.seed,
            fields=self.fields,
            cap_to_stored=preload != self.num_points,  # an FPS pool is an upper bound
        )
        sampler: DistributedSampler[int] = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=self._collate,
        )
        length = len(loader) if self.batches_per_epoch is None else min(len(loader), self.batches_per_epoch)
        if length < 1:
            raise UserError(
                f"{self.data_root}: split {self.train_split!r} has {len(dataset)} samples, fewer than one "
                f"global batch ({self.batch_size} x {world_size} ranks)"
            )

        def on_epoch(epoch: int) -> None:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)

        return EpochLoader(
            Capped(loader, length),
            length=length,
            on_epoch=on_epoch,
            epoch_source=self._trainer_epoch,
            progress_source=self._trainer_progress,
        )

    def _eval_loader(self) -> DataLoader[Any] | list[Any]:
        if self.val_split is None:
            return []
        if self._val_set is None:
            self._val_set = InMemoryPointDataset(
                self.data_root,
                self.val_split,
                num_points=self.num_points,
                transform=self.eval_transform(),
                seed=self.seed,
                fields=self.fields,
            )
        return DataLoader(
            self._val_set,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate,
        )

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        """Validation batches of ``val_split`` (FPS subsample, no augmentation); ``[]`` without one."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader[Any] | list[Any]:
        """Same as :meth:`val_dataloader`."""
        return self._eval_loader()

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the data identity and where training stands in the data.

        ``train_position`` (epoch, batches of it trained) duplicates what the training loader's own state
        holds: Lightning restores the datamodule's state on every resume, but the loader's only when it
        recognises a mid-epoch restart, which it misses after an earlier resume at an epoch end.
        """
        state: dict[str, Any] = {
            "seed": self.seed,
            "manifest_sha256": self.manifest_sha256,
            "data_root": self.data_root,
        }
        if self._train_loader is not None:
            state["train_position"] = self._train_loader.state_dict()
        elif self._resume_position is not None:  # restored, no loader built yet: keep it for the next run
            state["train_position"] = dict(self._resume_position)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the training position for the next loader; warns on data or a seed that differ."""
        position = state_dict.get("train_position")
        self._resume_position = dict(position) if position is not None else None
        if state_dict.get("manifest_sha256") not in (None, self.manifest_sha256):
            rank_zero_warn(
                f"resuming on different data: {self.data_root}/{MANIFEST_NAME} changed since the checkpoint"
            )
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(f"resuming with data seed {self.seed}, the checkpoint used {state_dict['seed']}")


def _merge_fields(
    fields: BatchFields | dict[str, Any] | None,
    *,
    normals: bool,
    point_features: list[str] | None,
    images: bool,
) -> BatchFields:
    """``fields`` with the shorthand keys of older configs merged in (which must agree with it)."""
    merged = BatchFields.coerce(fields)
    features = tuple(point_features or ())
    if features and merged.point_features not in ((), features):
        raise ValueError(
            f"point_features {list(features)} contradicts fields.point_features {list(merged.point_features)}"
        )
    return replace(
        merged,
        normals=merged.normals or normals,
        point_features=features or merged.point_features,
        image_views=max(merged.image_views, int(images)),
    )
