"""A new method with a new encoder family, added through the public extension points only.

This is the walkthrough of docs/architecture.md as a test: a spec class and an encoder registered as a family,
a method subclassing ``PretrainModule`` with its own loss, trained two steps through ``pcpt-pretrain fit``,
exported at the end of ``fit`` and again from its Lightning checkpoint, and rebuilt from the artifact alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import Tensor, nn

from datapipes.synthetic import write_synthetic
from pretrain.checkpoint import load_encoder
from pretrain.cli import main as pretrain_main
from pretrain.encoders import (
    EncoderOutput,
    EncoderSpec,
    PatchTokenizer,
    PointEncoder,
    PointTokens,
    register_encoder_family,
)
from pretrain.methods.base import PretrainModule


@dataclass(frozen=True)
class ToySpec(EncoderSpec):
    """A per-token MLP over FPS + kNN patches: no attention at all."""

    arch: Literal["toy_mlp"] = "toy_mlp"
    embed_dim: int = 16
    num_groups: int = 8
    group_size: int = 8
    fps_start: int = 0
    fps_skip_near_origin: bool = False


class ToyEncoder(PointEncoder):
    spec: ToySpec

    def __init__(self, spec: ToySpec) -> None:
        super().__init__()
        self.spec = spec
        self.tokenizer = PatchTokenizer(spec.embed_dim, spec)
        self.pos_embed = nn.Linear(3, spec.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(spec.embed_dim, spec.embed_dim), nn.GELU())

    def tokenize(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PointTokens:
        return self.tokenizer.tokenize(xyz, generator=generator)

    def forward(
        self,
        tokens: Tensor,
        centers: Tensor,
        *,
        keep: Tensor | None = None,
        replace: Tensor | None = None,
        return_layers: Sequence[int] = (),
        contexts: Sequence[Any] | None = None,
    ) -> EncoderOutput:
        if keep is not None:
            tokens = tokens[keep].reshape(tokens.shape[0], -1, tokens.shape[-1])
            centers = centers[keep].reshape(centers.shape[0], -1, 3)
        return EncoderOutput(tokens=self.mlp(tokens + self.pos_embed(centers)), centers=centers)


register_encoder_family("toy_mlp", ToySpec, ToyEncoder)


class ToyCentreRegression(PretrainModule):
    """Predicts each patch centre's distance to the origin from its token (a stand-in for a real loss)."""

    method_name = "ToyCentreRegression"

    def __init__(self, encoder: ToySpec, *, head_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(encoder, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.head = nn.Linear(encoder.embed_dim, 1, bias=head_bias)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = self.batch_points(batch)
        out = self.encoder.encode(points, generator=self.step_generator())
        loss = (self.head(out.tokens).squeeze(-1) - out.centers.norm(dim=-1)).square().mean()
        self.log("train/loss", loss, batch_size=points.shape[0])
        return loss


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root, classes=2, per_class=8, test_per_class=2, points=64, shard_size=8)
    return root


def test_a_toy_method_with_a_toy_family_trains_exports_and_reloads(demo: Path, tmp_path: Path) -> None:
    args = [
        "fit",
        f"--model={__name__}.ToyCentreRegression",
        "--model.init_args.encoder.arch=toy_mlp",
        "--model.init_args.encoder.embed_dim=12",
        "--model.init_args.lr_scheduler.init_args.warmup_epochs=0",
        f"--data.data_root={demo}",
        "--data.num_points=64",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.val_split=null",
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert pretrain_main(args) == 0
    encoder, meta = load_encoder(tmp_path / "encoder")
    assert isinstance(encoder, ToyEncoder)
    assert meta["spec"] == {**ToySpec().to_dict(), "embed_dim": 12}
    assert meta["provenance"]["method"] == "ToyCentreRegression"
    assert meta["provenance"]["step"] == 2

    # the same weights through the checkpoint export path
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert pretrain_main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    again, _ = load_encoder(tmp_path / "exported")
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    # and the reloaded encoder works like any other
    pooled = encoder.eval().pool(encoder.encode(torch.rand(2, 64, 3)))
    assert pooled.shape == (2, 24)
