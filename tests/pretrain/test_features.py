"""The shared frozen-feature loop: eval mode, no gradients, batch-size independence, checks, progress."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datapipes.errors import UserError
from datapipes.progress import Progress
from pretrain.encoders import PointViTSpec, build_encoder
from pretrain.features import extract_features, map_clouds
from pretrain.ops import normalize_unit_sphere


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return build_encoder(PointViTSpec.named("tiny", drop_path=0.2))


def clouds(count: int = 7, points: int = 48) -> torch.Tensor:
    return torch.randn(count, points, 3, generator=torch.Generator().manual_seed(1))


def test_extract_features_eval_mode_batched_and_restored(encoder):
    xyz = clouds()
    encoder.train()
    a = extract_features(encoder, xyz.numpy(), batch_size=3)
    assert encoder.training  # restored
    b = extract_features(encoder, xyz, batch_size=7)
    encoder.eval()
    with torch.no_grad():
        want = encoder.pool(encoder.encode(xyz)).numpy()
    assert a.dtype == np.float32
    assert a.shape == (7, 64)
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not encoder.training  # left as it was (eval)
    assert extract_features(encoder, np.zeros((0, 48, 3))).shape == (0, 64)
    with pytest.raises(ValueError, match="xyz"):
        extract_features(encoder, np.zeros((2, 48)))
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(encoder, xyz, batch_size=0)


def test_map_clouds_no_grad_dtypes_and_normalization(encoder):
    xyz = clouds(5) * 4.0 + 2.0
    seen = []

    def step(points, generator):
        seen.append((torch.is_grad_enabled(), encoder.training, generator))
        return {"centred": points, "first": torch.zeros(points.shape[0], 2, dtype=torch.int32)}

    gen = torch.Generator().manual_seed(0)
    out = map_clouds(encoder, step, xyz.double().numpy(), batch_size=2, normalize=True, generator=gen)
    assert seen == [(False, False, gen)] * 3
    assert out["centred"].dtype == np.float32
    assert out["first"].dtype == np.int64
    assert out["first"].shape == (5, 2)
    np.testing.assert_allclose(out["centred"], normalize_unit_sphere(xyz).numpy(), atol=1e-6)
    assert map_clouds(encoder, step, np.zeros((0, 48, 3))) == {}


def test_non_finite_input_and_output_name_the_cloud(encoder):
    xyz = clouds(5).numpy()
    xyz[3, 7, 1] = np.inf
    with pytest.raises(UserError, match="cloud 3 has non-finite coordinates"):
        extract_features(encoder, xyz, batch_size=2)
    encoder.train()

    def nan_for_last(points, generator):
        values = points.sum(dim=(1, 2)).unsqueeze(1).clone()
        values[-1] = float("nan")
        return {"sums": values}

    with pytest.raises(
        UserError, match=r"cloud 2: the model produced non-finite sums \(coordinates too large"
    ):
        map_clouds(encoder, nan_for_last, clouds(5), batch_size=3)
    assert encoder.training  # restored after the error too


def test_progress_only_for_more_than_one_batch(encoder, capsys, monkeypatch):
    init = Progress.__init__

    def every_update(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "interval": 0.0})

    monkeypatch.setattr(Progress, "__init__", every_update)
    extract_features(encoder, clouds(4), batch_size=2, progress=True)
    assert "pcpt: features: 4/4 clouds (100%)" in capsys.readouterr().err
    extract_features(encoder, clouds(4), batch_size=4, progress=True)
    extract_features(encoder, clouds(4), batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
