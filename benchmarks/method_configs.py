"""Every pre-training method built from its shipped YAML config, and synthetic batches shaped like its data.

The GPU suite and the mixed-precision tests build models here so that they measure what
``pcpt-pretrain fit -c configs/pretrain/<config>`` trains: ``model.class_path`` and ``model.init_args`` of
the config (the optimiser and schedule are left out: the caller owns them), and batches with the config's
``data.num_points`` points per cloud (image views for ViPFormer, padded LiDAR-like scans with point channels
for scene-level GeoMAE).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from datapipes.types import PointBatch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


@dataclass(frozen=True)
class MethodConfigs:
    """The official and tiny configs of one method.

    Attributes:
        official: config file of the official size (under ``configs/pretrain``).
        tiny: config file of the CPU smoke size.
        tokenizer: for Point-BERT, the name of the method whose config gives the frozen dVAE tokenizer.
    """

    official: str
    tiny: str
    tokenizer: str | None = None


#: the methods of pcpt by name.
METHODS: dict[str, MethodConfigs] = {
    "point_mae": MethodConfigs("point_mae.yaml", "point_mae_tiny.yaml"),
    "point_bert_dvae": MethodConfigs("point_bert_dvae.yaml", "point_bert_dvae_tiny.yaml"),
    "point_bert": MethodConfigs("point_bert.yaml", "point_bert_tiny.yaml", tokenizer="point_bert_dvae"),
    "geomae": MethodConfigs("geomae.yaml", "geomae_tiny.yaml"),
    "geomae_scene": MethodConfigs("geomae_scene.yaml", "geomae_scene_tiny.yaml"),
    "vipformer": MethodConfigs("vipformer.yaml", "vipformer_tiny.yaml"),
}


def config_path(method: str, tiny: bool) -> Path:
    """``configs/pretrain/<config>`` of ``method`` at the official or the tiny size."""
    configs = METHODS[method]
    return CONFIGS / (configs.tiny if tiny else configs.official)


def read_config(method: str, tiny: bool) -> dict[str, Any]:
    """The parsed YAML config of ``method``."""
    with config_path(method, tiny).open() as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


def _class(path: str) -> type[Any]:
    module, _, name = path.rpartition(".")
    cls: type[Any] = getattr(importlib.import_module(module), name)
    return cls


def build_method(method: str, *, tiny: bool, workdir: Path, **overrides: Any) -> Any:
    """The LightningModule of ``method`` with its config's ``model.init_args`` (and ``overrides``).

    Args:
        method: a key of :data:`METHODS`.
        tiny: the tiny config instead of the official one.
        workdir: where Point-BERT's tokenizer artifact is written (a randomly initialised dVAE of the dVAE
            config's size: the step cost does not depend on its weights).
        **overrides: init arguments replacing the config's (e.g. ``compile=True``, ``lr_scheduler=None``).

    Returns:
        The module (on CPU, in training mode).
    """
    model = read_config(method, tiny)["model"]
    init = {k: v for k, v in model["init_args"].items() if k not in ("optimizer", "lr_scheduler")}
    tokenizer = METHODS[method].tokenizer
    if tokenizer is not None:
        from pretrain.artifacts import save_module_artifact
        from pretrain.dvae import DiscreteVAE, DVAESpec
        from pretrain.encoders import DataContract

        spec = DVAESpec.from_dict(read_config(tokenizer, tiny)["model"]["init_args"]["dvae"])
        init["dvae"] = str(
            save_module_artifact(
                workdir / f"{method}-tokenizer", DiscreteVAE(spec), data=DataContract(), provenance={}
            )
        )
    init.update(overrides)
    return _class(model["class_path"])(**init).train()


def data_settings(method: str, *, tiny: bool) -> dict[str, Any]:
    """The ``data`` section of ``method``'s config (points, batch size, workers, fields, augmentation)."""
    data: dict[str, Any] = read_config(method, tiny)["data"]
    return data


def synthetic_batch(
    method: str, module: Any, *, batch_size: int, num_points: int, generator: torch.Generator
) -> PointBatch:
    """A batch shaped like ``method``'s training data.

    Objects: (B, N, 3) clouds in the unit ball. ViPFormer adds one image view (B, 1, 3, S, S) at the image
    encoder's size S. Scene-level GeoMAE: padded LiDAR-like scans (B, N, 3) in the encoder's point range,
    denser near the sensor, with the point channels the encoder reads (B, N, C).
    """
    if method == "geomae_scene":
        return _scene_batch(module, batch_size, num_points, generator)
    points = torch.randn(batch_size, num_points, 3, generator=generator)
    radius = torch.rand(batch_size, num_points, 1, generator=generator) ** (1 / 3)
    points = points / points.norm(dim=-1, keepdim=True).clamp_min(1e-6) * radius
    images = None
    if method == "vipformer":
        size = module.image_encoder.spec.image_size
        images = torch.rand(batch_size, 1, 3, size, size, generator=generator)
    return PointBatch(points=points, images=images)


def _scene_batch(module: Any, batch_size: int, num_points: int, generator: torch.Generator) -> PointBatch:
    spec = module.encoder.spec
    x0, y0, z0, x1, y1, z1 = spec.point_range
    reach = min(x1, y1, -x0, -y0)
    radius = 2.0 + (reach - 2.0) * torch.rand(batch_size, num_points, generator=generator) ** 2
    angle = 2 * math.pi * torch.rand(batch_size, num_points, generator=generator)
    height = z0 + (z1 - z0) * torch.rand(batch_size, num_points, generator=generator) ** 3
    points = torch.stack([radius * angle.cos(), radius * angle.sin(), height], dim=-1)
    channels = tuple(spec.point_channels)
    feats = torch.rand(batch_size, num_points, len(channels), generator=generator) if channels else None
    return PointBatch(points=points, feats=feats, feat_names=channels)


def batch_to(batch: PointBatch, device: torch.device) -> PointBatch:
    """The batch with its tensors on ``device``."""
    fields: dict[str, Any] = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()
    }
    return PointBatch(**fields)
