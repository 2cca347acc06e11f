from __future__ import annotations

import math

import pytest
import torch

from pretrain.ops.voxel_cluster import (
    gather_segments,
    same_cell_mask,
    segment_counts,
    segment_reduce,
    segment_reduce_broadcast,
    voxel_cluster,
)


def _slow_voxel_ids(points: torch.Tensor, size: float, origin: str = "min") -> list[list[int]]:
    """Dict of voxel keys per sample, numbered in sorted key order (Python floats, float64 arithmetic)."""
    out = []
    for cloud in points.tolist():
        start = [min(p[i] for p in cloud) for i in range(3)] if origin == "min" else [0.0, 0.0, 0.0]
        keys = [tuple(math.floor((p[i] - start[i]) / size) for i in range(3)) for p in cloud]
        numbering = {key: i for i, key in enumerate(sorted(set(keys)))}
        out.append([numbering[key] for key in keys])
    return out


def _clouds(gen: torch.Generator) -> torch.Tensor:
    """Clouds with exact duplicates and points on voxel boundaries (multiples of 0.25 on a 0.25 grid)."""
    pts = (torch.rand(4, 20, 3, generator=gen, dtype=torch.float64) - 0.5) * 2
    pts[:, 10:15] = torch.randint(-4, 4, (4, 5, 3), generator=gen).double() * 0.25  # on boundaries
    pts[:, 15:18] = pts[:, 2:3]  # exact duplicates of point 2
    pts[3] = pts[3, :1]  # a cloud collapsed to a single point: one voxel
    return pts


@pytest.mark.parametrize("origin", ["min", "zero"])
@pytest.mark.parametrize("size", [0.25, 0.7])
def test_voxel_cluster_matches_dict_reference(gen: torch.Generator, size: float, origin: str) -> None:
    pts = _clouds(gen)
    ids = voxel_cluster(pts, size, origin=origin)  # type: ignore[arg-type]
    assert ids.dtype == torch.long
    assert ids.shape == (4, 20)
    assert ids.tolist() == _slow_voxel_ids(pts, size, origin)
    for b in range(4):  # dense per sample: 0 .. K_b - 1 all used
        assert sorted(set(ids[b].tolist())) == list(range(int(ids[b].max()) + 1))
    assert ids[3].tolist() == [0] * 20
    for b in range(4):  # duplicates share a voxel
        assert ids[b, 2] == ids[b, 15] == ids[b, 16] == ids[b, 17]


def test_voxel_cluster_is_per_sample_and_translation_invariant(gen: torch.Generator) -> None:
    pts = _clouds(gen)
    ids = voxel_cluster(pts, 0.3)
    for b in range(4):
        torch.testing.assert_close(voxel_cluster(pts[b : b + 1], 0.3), ids[b : b + 1], rtol=0, atol=0)
    shifted = pts + torch.tensor([0.125, -3.0, 7.5], dtype=torch.float64)  # exact in binary
    torch.testing.assert_close(voxel_cluster(shifted, 0.3), ids, rtol=0, atol=0)


def test_voxel_cluster_validation() -> None:
    with pytest.raises(ValueError, match=r"\(B, G, 3\)"):
        voxel_cluster(torch.zeros(5, 3), 0.1)
    with pytest.raises(ValueError, match="voxel_size"):
        voxel_cluster(torch.zeros(1, 5, 3), 0.0)
    assert voxel_cluster(torch.zeros(2, 0, 3), 0.1).shape == (2, 0)


def _slow_reduce(features: torch.Tensor, ids: torch.Tensor, reduce: str, segments: int) -> torch.Tensor:
    batch, _, channels = features.shape
    out = torch.zeros(batch, segments, channels, dtype=features.dtype)
    for b in range(batch):
        members: dict[int, list[int]] = {}
        for g, s in enumerate(ids[b].tolist()):
            members.setdefault(s, []).append(g)
        for s, rows in members.items():
            for c in range(channels):
                vals = [float(features[b, g, c]) for g in rows]
                mx, mean = max(vals), sum(vals) / len(vals)
                out[b, s, c] = {"max": mx, "mean": mean, "maxmean": mx + mean}[reduce]
    return out


@pytest.mark.parametrize("reduce", ["max", "mean", "maxmean"])
def test_segment_reduce_matches_loop(gen: torch.Generator, reduce: str) -> None:
    ids = torch.randint(0, 5, (3, 11), generator=gen)
    ids[1] = 2  # one segment holds the whole sample
    features = torch.randint(-3, 3, (3, 11, 4), generator=gen).double()  # many ties
    features[0] = torch.randn(11, 4, generator=gen, dtype=torch.float64) - 10  # all negative: max is not 0
    out = segment_reduce(features, ids, reduce, num_segments=7)  # type: ignore[arg-type]
    assert out.shape == (3, 7, 4)
    torch.testing.assert_close(out, _slow_reduce(features, ids, reduce, 7))
    assert out[:, 5:].abs().max() == 0  # empty segments are 0
    # default S = ids.max() + 1 over the batch
    assert segment_reduce(features, ids, reduce).shape[1] == int(ids.max()) + 1  # type: ignore[arg-type]

    broadcast = segment_reduce_broadcast(features, ids, reduce)  # type: ignore[arg-type]
    ref = _slow_reduce(features, ids, reduce, 7)
    for b in range(3):
        for g in range(11):
            torch.testing.assert_close(broadcast[b, g], ref[b, int(ids[b, g])])


def test_segment_reduce_with_voxel_ids(gen: torch.Generator) -> None:
    pts = _clouds(gen)
    ids = voxel_cluster(pts, 0.5)
    features = torch.randn(4, 20, 3, generator=gen, dtype=torch.float64)
    ref = _slow_reduce(features, ids, "maxmean", int(ids.max()) + 1)
    torch.testing.assert_close(segment_reduce(features, ids, "maxmean"), ref)
    # a cluster's broadcast value is shared by its members only
    out = segment_reduce_broadcast(features, ids, "mean")
    torch.testing.assert_close(out[3], features[3].mean(0).expand(20, 3))


def test_segment_counts_and_gather(gen: torch.Generator) -> None:
    ids = torch.randint(0, 4, (2, 9), generator=gen)
    counts = segment_counts(ids, 6)
    assert counts.shape == (2, 6)
    for b in range(2):
        for s in range(6):
            assert counts[b, s] == (ids[b] == s).sum()
    values = torch.randn(2, 6, 3, generator=gen)
    out = gather_segments(values, ids)
    for b in range(2):
        for g in range(9):
            torch.testing.assert_close(out[b, g], values[b, ids[b, g]])


def test_segment_reduce_gradient_of_mean(gen: torch.Generator) -> None:
    ids = torch.tensor([[0, 0, 1, 0]])
    features = torch.randn(1, 4, 2, generator=gen, requires_grad=True)
    segment_reduce(features, ids, "mean").sum().backward()
    assert features.grad is not None
    torch.testing.assert_close(features.grad[0, :, 0], torch.tensor([1 / 3, 1 / 3, 1.0, 1 / 3]))


def test_segment_reduce_validation() -> None:
    with pytest.raises(ValueError, match="int64"):
        segment_reduce(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.int32), "max")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        segment_reduce(torch.zeros(1, 3, 2), torch.tensor([[0, 1, 2]]), "max", num_segments=2)
    with pytest.raises(ValueError, match="reduce"):
        segment_reduce(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.long), "sum")  # type: ignore[arg-type]


def test_same_cell_mask_matches_loop(gen: torch.Generator) -> None:
    cells = torch.randint(0, 3, (4, 7), generator=gen)
    mask = same_cell_mask(cells)
    assert mask.dtype == torch.bool
    assert mask.shape == (4, 7, 7)
    for n in range(4):
        for i in range(7):
            for j in range(7):
                assert bool(mask[n, i, j]) == (int(cells[n, i]) == int(cells[n, j]))
    assert mask.diagonal(dim1=1, dim2=2).all()
