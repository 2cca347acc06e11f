from __future__ import annotations

import pytest
import torch

from pretrain.nn.dgcnn import DGCNN
from pretrain.nn.folding import FoldingDecoder, folding_grid
from tests.pretrain import dvae_reference as dref
from tests.pretrain.encoders.official_reference import randomize


def test_dgcnn_official_widths_and_key_layout() -> None:
    net = DGCNN(256, 8192)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["input_trans.weight"] == (128, 256, 1)
    assert shapes["layer1.0.weight"] == (256, 256, 1, 1)
    assert shapes["layer2.0.weight"] == (512, 512, 1, 1)
    assert shapes["layer3.0.weight"] == (512, 1024, 1, 1)
    assert shapes["layer4.0.weight"] == (1024, 1024, 1, 1)
    assert shapes["layer5.0.weight"] == (8192, 2304, 1)
    assert shapes["layer5.1.weight"] == (8192,)
    assert len(shapes) == 17  # input_trans w/b + 5 x (conv w, GN w/b)
    assert sorted(shapes) == sorted(dref.DGCNN(256, 8192).state_dict())


def test_dgcnn_matches_loop_reference(gen: torch.Generator) -> None:
    dims = (8, 8, 16, 16, 32)
    ours = randomize(DGCNN(6, 12, dims=dims))
    ref = dref.DGCNN(6, 12, dims)
    ref.load_state_dict(ours.state_dict())
    feats, centers = torch.randn(2, 10, 6, generator=gen), torch.rand(2, 10, 3, generator=gen)
    out = ours(feats, centers)
    assert out.shape == (2, 10, 12)
    torch.testing.assert_close(out, ref(feats, centers), atol=1e-5, rtol=1e-5)


def test_dgcnn_permutation_equivariant(gen: torch.Generator) -> None:
    net = randomize(DGCNN(4, 8, dims=(8, 8, 8)))
    feats, centers = torch.randn(1, 9, 4, generator=gen), torch.rand(1, 9, 3, generator=gen)
    perm = torch.randperm(9, generator=gen)
    torch.testing.assert_close(
        net(feats, centers)[:, perm], net(feats[:, perm], centers[:, perm]), atol=1e-5, rtol=1e-5
    )


def test_dgcnn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="GroupNorm"):
        DGCNN(4, 10)
    with pytest.raises(ValueError, match="dims"):
        DGCNN(4, 8, dims=(8,))
    with pytest.raises(ValueError, match="k=4"):
        DGCNN(4, 8, dims=(8, 8))(torch.zeros(1, 3, 4), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="must match"):
        DGCNN(4, 8, dims=(8, 8))(torch.zeros(1, 5, 4), torch.zeros(1, 6, 3))


def test_folding_grid_corners() -> None:
    grid = folding_grid()
    expected = torch.tensor([[-0.05, -0.05], [0.05, -0.05], [-0.05, 0.05], [0.05, 0.05]])
    torch.testing.assert_close(grid, expected)
    ref = dref.Decoder(4, 8).folding_seed[0].T
    torch.testing.assert_close(grid, ref)


def test_folding_decoder_shapes_layout_and_reference(gen: torch.Generator) -> None:
    dec = FoldingDecoder(256, 32)
    shapes = {k: tuple(v.shape) for k, v in dec.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes["mlp.4.weight"] == (24, 1024)
    assert shapes["final_conv.0.weight"] == (512, 261, 1)
    assert shapes["final_conv.6.weight"] == (3, 512, 1)
    assert sorted(dec.state_dict()) == sorted(dref.Decoder(256, 32).state_dict())
    assert "grid" not in dec.state_dict()

    ours = randomize(FoldingDecoder(8, 8, hidden_dim=16, fold_dim=16)).eval()
    ref = dref.Decoder(8, 8, 16, 16).eval()
    ref.load_state_dict(ours.state_dict())
    feats = torch.randn(2, 3, 8, generator=gen)
    coarse, fine = ours(feats)
    assert coarse.shape == (2, 3, 2, 3)
    assert fine.shape == (2, 3, 8, 3)
    ref_coarse, ref_fine = ref(feats)
    torch.testing.assert_close(coarse, ref_coarse)
    torch.testing.assert_close(fine, ref_fine, atol=1e-6, rtol=1e-5)


def test_folding_decoder_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        FoldingDecoder(8, 6)
    with pytest.raises(ValueError, match="features"):
        FoldingDecoder(8, 8)(torch.zeros(1, 2, 5))
