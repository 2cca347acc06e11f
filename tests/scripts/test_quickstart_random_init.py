"""The random-init baseline artifact keeps the architecture of any encoder family and draws fresh weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_encoder, save_encoder
from pretrain.encoders import PointViTSpec, ViPFormerPointSpec, build_encoder
from pretrain.encoders.spec import DataContract
from tests.cli_helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
from quickstart import random_init_artifact


@pytest.mark.parametrize(
    "spec",
    [
        PointViTSpec(embed_dim=32, depth=1, num_heads=2, num_groups=8, group_size=8),
        ViPFormerPointSpec(embed_dim=32, num_latents=8, group_size=8, num_sa_layers=1, num_heads=2),
    ],
    ids=["point_vit", "vipformer_point"],
)
def test_random_init_keeps_family_spec_and_contract_with_new_weights(tmp_path: Path, spec: object) -> None:
    torch.manual_seed(3)
    trained = build_encoder(spec)  # type: ignore[arg-type]
    contract = DataContract(num_points=64)
    source = save_encoder(tmp_path / "trained", trained, data=contract, provenance={"method": "test"})
    out = random_init_artifact(source, tmp_path / "random", seed=0)
    loaded, meta = load_encoder(out)  # strict load
    source_meta = load_encoder(source)[1]
    assert meta["spec"] == source_meta["spec"]
    assert meta["kind"] == source_meta["kind"]
    assert meta["data_contract"] == source_meta["data_contract"]
    assert meta["provenance"]["method"] == "random-init"
    assert type(loaded) is type(trained)
    differs = [
        not torch.equal(a, b)
        for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True)
        if a.is_floating_point() and a.numel() > 1 and a.std() > 0
    ]
    assert differs
    assert all(differs)
    again = load_encoder(random_init_artifact(source, tmp_path / "random2", seed=0))[0]
    for a, b in zip(loaded.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the seed alone decides the weights
