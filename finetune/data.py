"""In-memory labelled data for finetuning, with a validation split held out from train (never test).

Clouds come from FPS-ordered shards: the first ``pool_points`` stored points of each cloud are loaded once,
so training can draw ``num_points`` of them at random (Point-MAE's "FPS to 1200, random 1024") and evaluation
can take the first ``num_points`` (= FPS to ``num_points``). Map-style datasets, so Lightning's distributed
sampler splits them evenly across ranks.

Loading checks every shard against the manifest (sample count, complete tar, finite point arrays) and stops
with an error naming the shard; ``verify=True`` also hashes every shard before loading. ``data_root`` may be a
URL (``https://...``, ``s3://...``): every remote shard is downloaded once and used only if its sha256 equals
the manifest's (see :mod:`datapipes.shards.remote`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from datapipes.errors import UserError
from datapipes.memory import load_split_arrays
from datapipes.shards import check_shard_hashes, read_manifest
from datapipes.types import PointBatch
from finetune.probes import stratified_split

__all__ = ["ArraysDataModule", "ClassificationDataModule", "LabelledArrays", "manifest_normalization"]

#: (xyz (S, N, 3) float32, labels (S,) int64, keys)
LabelledArrays = tuple[np.ndarray, np.ndarray, list[str]]


def manifest_normalization(manifest: Mapping[str, Any]) -> str | None:
    """The data's normalisation recorded in a shard manifest (``"unit_sphere"``, ``"none"``), or None.

    Read from ``normalization`` (top level or in ``source``), else the converters' ``source.normalize`` flag.
    """
    source = manifest.get("source")
    source = source if isinstance(source, Mapping) else {}
    value = manifest.get("normalization", source.get("normalization"))
    if value is None and isinstance(source.get("normalize"), bool):
        value = "unit_sphere" if source["normalize"] else "none"
    return None if value is None else str(value)


class _ArrayDataset(Dataset[tuple[np.ndarray, int, str]]):
    def __init__(self, xyz: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
        self.xyz, self.labels, self.keys = xyz, labels, keys

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, str]:
        return self.xyz[index], int(self.labels[index]), self.keys[index]


def _collate(items: list[tuple[np.ndarray, int, str]]) -> PointBatch:
    return PointBatch(
        points=torch.from_numpy(np.stack([it[0] for it in items])),
        label=torch.tensor([it[1] for it in items], dtype=torch.long),
        key=[it[2] for it in items],
    )


class _SplitsDataModule(pl.LightningDataModule):
    """Loaders over in-memory ``train`` / ``val`` / ``test`` sets (subclasses fill ``self._sets``).

    The training order is a permutation drawn from ``(shuffle_seed, epoch)`` (a ``DistributedSampler``, also
    with one process, whose epoch Lightning sets), never from the default generator: a run resumed at an
    epoch boundary sees the batches an uninterrupted run sees.
    """

    batch_size: int
    num_workers: int
    shuffle_seed: int = 0

    def __init__(self) -> None:
        super().__init__()
        self._sets: dict[str, _ArrayDataset] = {}

    def _loader(self, name: str, shuffle: bool) -> DataLoader[Any]:
        dataset = self._sets[name]
        sampler: DistributedSampler[int] | None = None
        per_rank = len(dataset)
        if shuffle:
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.shuffle_seed
            )
            per_rank = len(sampler)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=shuffle and per_rank % self.batch_size == 1,  # no single-sample BatchNorm batch
            num_workers=self.num_workers,
            collate_fn=_collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)


class ArraysDataModule(_SplitsDataModule):
    """Classification sets given as arrays (e.g. one few-shot episode's support and query clouds).

    Args:
        train: training clouds, labels and keys.
        test: test clouds, labels and keys.
        val: optional validation set.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train: LabelledArrays,
        test: LabelledArrays,
        *,
        val: LabelledArrays | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self._sets = {"train": _ArrayDataset(*train), "test": _ArrayDataset(*test)}
        if val is not None:
            self._sets["val"] = _ArrayDataset(*val)


class ClassificationDataModule(_SplitsDataModule):
    """Train / held-out val / test classification sets from a shard root.

    Args:
        data_root: shard folder written by ``pcpt-data`` (``manifest.json`` inside): a local path or a URL.
        num_points: points fed to the model at evaluation; at most the smallest stored cloud.
        pool_points: points loaded per cloud (training samples ``num_points`` of them); an upper bound,
            capped at the smallest stored cloud.
        batch_size: per-device batch size.
        val_fraction: fraction of each train class held out for model selection (ignored if ``val_split``).
        val_split: use this shard split for validation instead of a hold-out (it must not be the test split).
        train_split: shard split used for training.
        test_split: shard split used only by ``trainer.test``.
        split_seed: seed of the hold-out.
        num_workers: DataLoader worker processes.
        verify: in :meth:`setup`, hash every shard of the splits used and compare it with the manifest's
            sha256 before loading (with progress on stderr). Without it loading still checks each
            shard's structure, sample count and finite point arrays; the hashes also catch changed bytes that
            still decode.
    """

    def __init__(
        self,
        data_root: str,
        *,
        num_points: int = 1024,
        pool_points: int = 1200,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        val_split: str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        split_seed: int = 0,
        num_workers: int = 0,
        verify: bool = False,
    ) -> None:
        super().__init__()
        if val_split is not None and val_split == test_split:
            raise UserError(f"val_split {val_split!r} is the test split; select models on held-out data")
        self.data_root = data_root
        self.num_points, self.pool_points = num_points, max(pool_points, num_points)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.val_split = val_fraction, val_split
        self.train_split, self.test_split, self.split_seed = train_split, test_split, split_seed
        self.verify = verify
        self.manifest: dict[str, Any] = read_manifest(data_root)
        self.selection: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes listed in the manifest."""
        return len(self.manifest.get("classes", []))

    @property
    def normalization(self) -> str | None:
        """Normalisation recorded in the manifest, if any."""
        return manifest_normalization(self.manifest)

    def _load(self, split: str, num_points: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if split not in self.manifest.get("splits", {}):
            raise UserError(
                f"{self.data_root}: no split {split!r}; has {sorted(self.manifest.get('splits', {}))}"
            )
        xyz, labels, keys = load_split_arrays(self.data_root, split, num_points, cap_to_stored=True)  # a pool
        if xyz.shape[1] < self.num_points:
            raise UserError(
                f"{self.data_root}: num_points {self.num_points} requested, but split {split!r} stores "
                f"clouds of {xyz.shape[1]} points; ask for at most {xyz.shape[1]} (--data.num_points)"
            )
        return xyz, labels, keys

    def setup(self, stage: str | None = None) -> None:
        """Loads the train, validation and test sets (once).

        Raises:
            UserError: for a missing split or ``num_points`` above the smallest stored cloud.
            ShardFormatError: naming the shard for damaged data (or, with ``verify``, a sha256 mismatch).
        """
        if self._sets:
            return
        points = self.manifest.get("points")
        stored = points.get("min") if isinstance(points, Mapping) else None
        if isinstance(stored, int) and stored < self.num_points:
            raise UserError(
                f"{self.data_root}: num_points {self.num_points} requested, but the smallest stored cloud "
                f"has {stored} points; ask for at most {stored} (--data.num_points)"
            )
        if self.verify:
            splits = [self.train_split, *([self.val_split] if self.val_split else []), self.test_split]
            rank = self.trainer.global_rank if self.trainer is not None else 0
            check_shard_hashes(self.data_root, splits, manifest=self.manifest, progress=rank == 0)
        xyz, labels, keys = self._load(self.train_split, self.pool_points)
        if self.val_split is None:
            train_idx, val_idx = stratified_split(labels, self.val_fraction, self.split_seed)
            val_keys = [keys[i] for i in val_idx]
            self.selection = {
                "split": f"{self.train_split} hold-out",
                "fraction": self.val_fraction,
                "seed": self.split_seed,
                "num_val": len(val_keys),
                "val_keys_sha256": hashlib.sha256("\n".join(val_keys).encode()).hexdigest(),
            }
            self._sets["val"] = _ArrayDataset(xyz[val_idx], labels[val_idx], val_keys)
            self._sets["train"] = _ArrayDataset(
                xyz[train_idx], labels[train_idx], [keys[i] for i in train_idx]
            )
        else:
            vx, vy, vk = self._load(self.val_split, self.pool_points)
            self.selection = {"split": self.val_split, "num_val": len(vk)}
            self._sets["val"] = _ArrayDataset(vx, vy, vk)
            self._sets["train"] = _ArrayDataset(xyz, labels, keys)
        self._sets["test"] = _ArrayDataset(*self._load(self.test_split, self.pool_points))
