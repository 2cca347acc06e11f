"""Point-PN tokenizer (Any2Point): shapes, LGA pieces and the whole forward against slow loop references."""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar

import pytest
import torch
from torch import Tensor, nn

from pretrain.nn import PointPN
from pretrain.nn.point_pn import normalize_offsets, official_key_to_pcpt, trig_pos_encoding

NEAR_ORIGIN_SQNORM = 1e-3  # pointnet2_ops skips FPS candidates with x² + y² + z² <= 1e-3


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _randomize(module: ModuleT, seed: int = 0) -> ModuleT:
    """Non-trivial parameters and BatchNorm statistics, so a wrong layer or a wrong mapping shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.1))
            if p.ndim == 1 and name.endswith("weight"):
                p.add_(1.0)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


# ------------------------------------------------------------------------------------------------------------
# Slow references: python loops, one sample / group / element at a time.
# ------------------------------------------------------------------------------------------------------------


def _loop_fps(points: list[list[float]], num_samples: int, *, skip_near_origin: bool) -> list[int]:
    """Textbook FPS: start at 0, running min distance, first maximum; optional pointnet2_ops origin skip."""
    n = len(points)
    excluded = [skip_near_origin and sum(c * c for c in p) <= NEAR_ORIGIN_SQNORM for p in points]
    min_d = [math.inf] * n
    chosen = [0]
    for _ in range(num_samples - 1):
        last = points[chosen[-1]]
        best, best_i = -1.0, 0
        for i in range(n):
            if excluded[i]:
                continue
            d = sum((a - b) ** 2 for a, b in zip(points[i], last))
            min_d[i] = min(min_d[i], d)
            if min_d[i] > best:
                best, best_i = min_d[i], i
        chosen.append(best_i)
    return chosen


def _loop_knn(points: list[list[float]], center: list[float], k: int) -> list[int]:
    dists = [(sum((a - b) ** 2 for a, b in zip(p, center)), i) for i, p in enumerate(points)]
    return [i for _, i in sorted(dists)[:k]]


def _loop_pose(offset: list[float], dim: int, alpha: float, beta: float) -> list[float]:
    feat_dim = dim // 6
    out: list[float] = []
    for x in offset:
        args = [beta * x / alpha ** (j / feat_dim) for j in range(feat_dim)]
        out += [math.sin(a) for a in args] + [math.cos(a) for a in args]
    return out + [0.0] * (dim - 6 * feat_dim)


def _loop_normalize_group(offsets: list[list[float]], mode: str, std: float) -> list[list[float]]:
    if mode == "scan":
        max_abs = [max(abs(o[axis]) for o in offsets) for axis in range(3)]
        return [[o[a] / max_abs[a] if max_abs[a] > 0 else 0.0 for a in range(3)] for o in offsets]
    return [[c / (std + 1e-5) for c in o] for o in offsets]


def _loop_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


class _RefBlock(nn.Module):
    """Official ``Linear2Layer`` layout (names ``net1``/``net2``)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net1 = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU())
        self.net2 = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.BatchNorm2d(channels))


class _RefLGA(nn.Module):
    def __init__(self, channels: int, hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.linear2 = nn.Sequential(*[_RefBlock(channels, hidden) for _ in range(num_blocks)])


class _RefLinear1(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(3, in_dim, 1, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU())


class _RefEncP(nn.Module):
    def __init__(self, in_dim: int, widths: list[int], hidden: list[int], blocks: list[int]) -> None:
        super().__init__()
        self.raw_point_embed = _RefLinear1(in_dim)
        self.LGA_list = nn.ModuleList(_RefLGA(w, h, b) for w, h, b in zip(widths, hidden, blocks))


class RefPointPN(nn.Module):
    """Slow Point-PN with the official parameter names; per sample, per group, per element. Eval mode only."""

    def __init__(
        self,
        *,
        in_dim: int,
        widths: list[int],
        hidden: list[int],
        blocks: list[int],
        k: int,
        normalize: str,
        alpha: float,
        beta: float,
        out_dim: int,
    ) -> None:
        super().__init__()
        self.EncP = _RefEncP(in_dim, widths, hidden, blocks)
        self.proj = nn.Linear(widths[-1], out_dim) if widths[-1] != out_dim else None
        self.k, self.normalize, self.alpha, self.beta = k, normalize, alpha, beta

    def _stage(
        self, lga: _RefLGA, points: list[list[float]], feats: Tensor
    ) -> tuple[list[list[float]], Tensor]:
        centers = _loop_fps(points, len(points) // 2, skip_near_origin=True)
        groups = [_loop_knn(points, points[c], self.k) for c in centers]
        offsets = [
            [[a - b for a, b in zip(points[j], points[c])] for j in g] for c, g in zip(centers, groups)
        ]
        std = (
            _loop_std([v for group in offsets for o in group for v in o]) if self.normalize == "mn40" else 0.0
        )
        pooled = []
        for c, group, offs in zip(centers, groups, offsets):
            normed = _loop_normalize_group(offs, self.normalize, std)
            dim = 2 * feats.shape[1]
            rows = []
            for j, off in zip(group, normed):
                pos = torch.tensor(_loop_pose(off, dim, self.alpha, self.beta), dtype=feats.dtype)
                rows.append(torch.cat([feats[j], feats[c]]) + pos)
            x = torch.stack(rows, dim=1)[None, :, None, :]  # (1, 2C, 1, K): one group
            for block in lga.linear2:
                assert isinstance(block, _RefBlock)
                x = torch.relu(block.net2(block.net1(x)) + x)
            pooled.append(x[0, :, 0, :].max(dim=1).values)
        return [points[c] for c in centers], torch.stack(pooled)

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        assert not self.training
        centers_out, tokens_out = [], []
        for cloud in xyz:
            points = cloud.tolist()
            feats = self.EncP.raw_point_embed.net(cloud.t()[None])[0].t()  # (N, C)
            for lga in self.EncP.LGA_list:
                assert isinstance(lga, _RefLGA)
                points, feats = self._stage(lga, points, feats)
            if self.proj is not None:
                feats = self.proj(feats)
            centers_out.append(torch.tensor(points, dtype=xyz.dtype))
            tokens_out.append(feats)
        return torch.stack(centers_out), torch.stack(tokens_out)


def _reference_for(model: PointPN) -> RefPointPN:
    """A loop reference with the official names, loaded with ``model``'s weights via the key mapping."""
    hidden = [s.blocks[0].net1[0].out_channels for s in model.stages]  # type: ignore[index,union-attr]
    blocks = [len(s.blocks) for s in model.stages]  # type: ignore[arg-type]
    ref = RefPointPN(
        in_dim=model.in_dim,
        widths=list(model.stage_widths),
        hidden=hidden,
        blocks=blocks,
        k=model.k,
        normalize=model.normalize,
        alpha=model.alpha,
        beta=model.beta,
        out_dim=model.out_dim,
    )
    ours = model.state_dict()
    mapped = {
        key: ours[key if key.startswith("proj.") else official_key_to_pcpt(key)] for key in ref.state_dict()
    }
    assert len(mapped) == len(ours)  # the mapping is a bijection onto our state dict
    ref.load_state_dict(mapped)
    return ref.eval()


def _cloud(gen: torch.Generator, batch: int, num_points: int) -> Tensor:
    """Shells of radii in [0.5, 1] plus two points inside pointnet2_ops' near-origin radius (not index 0).

    Plain FPS picks a point near the middle of such a cloud early; pointnet2_ops' FPS never does, so a
    wrong FPS mode shows up in the outputs.
    """
    radius = 0.5 + 0.5 * torch.rand(batch, num_points, 1, generator=gen)
    xyz = torch.nn.functional.normalize(torch.randn(batch, num_points, 3, generator=gen), dim=-1) * radius
    xyz[:, 3] = torch.randn(batch, 3, generator=gen) * 0.01
    xyz[:, num_points // 2] = torch.randn(batch, 3, generator=gen) * 0.01
    return xyz


# ------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------


def test_official_size_shapes_params_and_names(gen: torch.Generator) -> None:
    model = PointPN().eval()
    assert (model.in_dim, model.stage_widths, model.k, model.proj) == (96, (192, 384, 768), 81, None)
    assert all(stage.skip_near_origin and stage.normalize == "scan" for stage in model.stages)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["raw_embed.0.weight"] == (96, 3, 1)
    assert "raw_embed.0.bias" not in shapes  # official Conv1d has bias=False
    assert shapes["stages.0.blocks.1.net1.0.weight"] == (96, 192, 1, 1)  # stage 0 has 2 blocks
    assert "stages.1.blocks.1.net1.0.weight" not in shapes  # later stages have 1
    assert shapes["stages.1.blocks.0.net1.0.weight"] == (192, 384, 1, 1)
    assert shapes["stages.2.blocks.0.net1.0.weight"] == (32, 768, 1, 1)  # third stage: bottleneck 32
    assert shapes["stages.2.blocks.0.net2.0.weight"] == (768, 32, 1, 1)
    assert sum(p.numel() for p in model.parameters()) == 276_672
    xyz = torch.randn(1, 1024, 3, generator=gen)
    with torch.no_grad():
        centers, tokens = model(xyz)
    assert centers.shape == (1, 128, 3)
    assert tokens.shape == (1, 128, 768)
    assert torch.isfinite(tokens).all()
    # centres are input points (exactly) and the first one is point 0, the FPS start
    assert (centers[:, :, None] == xyz[:, None]).all(dim=-1).any(dim=-1).all()
    assert torch.equal(centers[:, 0], xyz[:, 0])


@pytest.mark.parametrize(
    ("kwargs", "in_dim", "widths", "has_proj"),
    [
        ({"out_dim": 32, "num_stages": 2, "k": 8}, 8, (16, 32), False),
        ({"out_dim": 64, "num_stages": 2, "k": 8}, 16, (32, 64), False),
        ({"out_dim": 24, "num_stages": 2, "k": 8, "in_dim": 4}, 4, (8, 16), True),
    ],
)
def test_tiny_shapes(
    gen: torch.Generator, kwargs: dict[str, Any], in_dim: int, widths: tuple[int, ...], has_proj: bool
) -> None:
    model = PointPN(**kwargs)
    assert model.in_dim == in_dim
    assert model.stage_widths == widths
    assert (model.proj is not None) == has_proj
    xyz = torch.randn(3, 64, 3, generator=gen)
    centers, tokens = model(xyz)
    assert centers.shape == (3, 16, 3)
    assert tokens.shape == (3, 16, kwargs["out_dim"])
    centers2, tokens2 = model(xyz)  # deterministic (FPS starts at 0, nothing random)
    assert torch.equal(centers, centers2)
    assert torch.equal(tokens, tokens2)


def test_trig_pos_encoding_matches_loop(gen: torch.Generator) -> None:
    xyz = torch.rand(2, 3, 4, 3, generator=gen, dtype=torch.float64) * 2 - 1
    for dim, alpha, beta in [(12, 1000.0, 100.0), (16, 1000.0, 100.0), (30, 50.0, 3.0)]:
        got = trig_pos_encoding(xyz, dim, alpha, beta)
        assert got.shape == (2, 3, 4, dim)
        want = torch.tensor(
            [_loop_pose(p, dim, alpha, beta) for p in xyz.reshape(-1, 3).tolist()], dtype=torch.float64
        ).reshape(2, 3, 4, dim)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    assert (trig_pos_encoding(xyz, 16)[..., 12:] == 0).all()  # 16 = 6 * 2 + 4 zero channels
    with pytest.raises(ValueError, match="dim"):
        trig_pos_encoding(xyz, 5)


@pytest.mark.parametrize("mode", ["scan", "mn40"])
def test_normalize_offsets_matches_loop(gen: torch.Generator, mode: Literal["scan", "mn40"]) -> None:
    offsets = torch.randn(3, 4, 5, 3, generator=gen, dtype=torch.float64)
    offsets[1] *= 7.0  # clouds of different scales
    offsets[0, 2, :, 1] = 0.0  # a group whose y offsets are all 0 (degenerate axis)
    got = normalize_offsets(offsets, mode)
    assert torch.isfinite(got).all()
    want = []
    for cloud in offsets.tolist():
        std = _loop_std([v for group in cloud for o in group for v in o])
        want.append([_loop_normalize_group(group, mode, std) for group in cloud])
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-12)
    if mode == "scan":
        assert (got.abs().amax(dim=2) <= 1.0).all()
        assert (got[0, 2, :, 1] == 0).all()
    else:
        batch = normalize_offsets(offsets, mode, batch_std=True)
        torch.testing.assert_close(batch, offsets / (offsets.std() + 1e-5))
        assert not torch.allclose(batch, got)  # the official whole-batch std mixes samples
        torch.testing.assert_close(normalize_offsets(offsets[:1], mode, batch_std=True), got[:1])


@pytest.mark.parametrize("skip_near_origin", [True, False])
def test_stage_grouping_matches_loop_fps_knn(gen: torch.Generator, skip_near_origin: bool) -> None:
    # A shell of radii in [0.8, 1.2] plus the origin: plain FPS soon picks the origin, pointnet2_ops' FPS
    # never does (radii vary so that no two distances to the origin tie).
    radius = 0.8 + 0.4 * torch.rand(1, 47, 1, generator=gen)
    shell = torch.nn.functional.normalize(torch.randn(1, 47, 3, generator=gen), dim=-1) * radius
    xyz = torch.cat([shell[:, :5], torch.zeros(1, 1, 3), shell[:, 5:]], dim=1)  # origin at index 5
    model = PointPN(32, num_stages=2, k=5, skip_near_origin=skip_near_origin).eval()
    points, feats = xyz, model.embed_points(xyz)
    for i, stage in enumerate(model.stages):
        out = stage(points, feats)
        plist = points[0].tolist()
        want_centers = _loop_fps(plist, len(plist) // 2, skip_near_origin=skip_near_origin)
        assert out.center_idx[0].tolist() == want_centers
        want_nbrs = [_loop_knn(plist, plist[c], 5) for c in want_centers]
        assert out.neighbor_idx[0].tolist() == want_nbrs
        torch.testing.assert_close(out.centers[0], points[0, want_centers])
        if i == 0:
            assert (5 in want_centers) != skip_near_origin
        points, feats = out.centers, out.features


@pytest.mark.parametrize(
    "kwargs",
    [
        {"out_dim": 32, "num_stages": 2, "k": 6},
        {"out_dim": 32, "num_stages": 2, "k": 6, "normalize": "mn40"},
        {"out_dim": 32, "num_stages": 3, "k": 5, "in_dim": 4},  # stage 2 bottleneck 32 > C/2, + proj
        {"out_dim": 24, "num_stages": 2, "k": 4, "alpha": 30.0, "beta": 7.0, "blocks_per_stage": (1, 2)},
    ],
)
def test_forward_matches_loop_reference(gen: torch.Generator, kwargs: dict[str, Any]) -> None:
    model = _randomize(PointPN(**kwargs)).eval()
    ref = _reference_for(model)
    xyz = _cloud(gen, 2, 64)
    centers, tokens = model(xyz)
    ref_centers, ref_tokens = ref(xyz)
    assert tokens.abs().amax() > 0.1  # a non-trivial comparison
    torch.testing.assert_close(centers, ref_centers, atol=1e-6, rtol=0)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-4, rtol=1e-4)
    # same gradients too (a detached path in the batched forward shows up here)
    cotangent = torch.randn(tokens.shape, generator=gen)
    (tokens * cotangent).sum().backward()
    (ref_tokens * cotangent).sum().backward()
    ours = dict(model.named_parameters())
    for key, p in ref.named_parameters():
        mine = ours[key if key.startswith("proj.") else official_key_to_pcpt(key)].grad
        assert mine is not None, key
        assert p.grad is not None, key
        torch.testing.assert_close(mine, p.grad, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("normalize", ["scan", "mn40"])
def test_permuting_points_except_first_keeps_output(gen: torch.Generator, normalize: str) -> None:
    model = _randomize(PointPN(32, num_stages=3, k=6, in_dim=4, normalize=normalize)).eval()  # type: ignore[arg-type]
    xyz = _cloud(gen, 2, 96)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(95, generator=gen)])
    assert not torch.equal(perm, torch.arange(96))
    with torch.no_grad():
        centers, tokens = model(xyz)
        p_centers, p_tokens = model(xyz[:, perm])
    torch.testing.assert_close(p_centers, centers, atol=0, rtol=0)
    torch.testing.assert_close(p_tokens, tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{"out_dim": 32, "num_stages": 3, "k": 5}, {"out_dim": 20, "in_dim": 4}])
def test_gradients_reach_all_parameters(gen: torch.Generator, kwargs: dict[str, Any]) -> None:
    model = _randomize(PointPN(**{"num_stages": 2, "k": 6, **kwargs}))
    xyz = _cloud(gen, 3, 64)
    # Eval mode: BatchNorm is a fixed affine map, so every parameter (including the conv biases in front of
    # a BatchNorm) has a genuine, non-zero gradient.
    centers, tokens = model.eval()(xyz)
    (tokens * torch.randn(tokens.shape, generator=gen)).sum().backward()
    assert not centers.requires_grad  # centres come from the input coordinates only
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().amax() > 1e-4, name
    # Train mode (batch statistics): every parameter is still reached; a conv bias followed by a
    # BatchNorm is cancelled by the batch mean (as in the official model), so only its finiteness is checked.
    model.zero_grad(set_to_none=True)
    _, tokens = model.train()(xyz)
    (tokens * torch.randn(tokens.shape, generator=gen)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if not (name.endswith(".0.bias") and ".blocks." in name):
            assert p.grad.abs().amax() > 1e-4, name


@pytest.mark.parametrize(
    ("normalize", "batch_std", "independent"),
    [("scan", False, True), ("mn40", False, True), ("mn40", True, False)],
)
def test_eval_output_independent_of_batch_mates(
    gen: torch.Generator, normalize: str, batch_std: bool, independent: bool
) -> None:
    model = PointPN(32, num_stages=2, k=6, normalize=normalize, mn40_batch_std=batch_std)  # type: ignore[arg-type]
    _randomize(model).eval()
    xyz = _cloud(gen, 3, 64)
    xyz[0] *= 3.0  # batch-mates of very different scale
    with torch.no_grad():
        centers, tokens = model(xyz)
        alone_centers, alone_tokens = model(xyz[1:2])
    torch.testing.assert_close(centers[1:2], alone_centers, atol=0, rtol=0)
    assert torch.allclose(tokens[1:2], alone_tokens, atol=1e-5, rtol=1e-5) == independent


def test_official_key_mapping() -> None:
    assert official_key_to_pcpt("EncP.raw_point_embed.net.1.running_var") == "raw_embed.1.running_var"
    assert (
        official_key_to_pcpt("EncP.LGA_list.2.linear2.0.net1.0.weight") == "stages.2.blocks.0.net1.0.weight"
    )
    ref = _reference_for(PointPN())  # every official key of the official size maps onto a PointPN key
    assert len(ref.state_dict()) == len(PointPN().state_dict())
    with pytest.raises(ValueError, match="not a Point_PN_scan"):
        official_key_to_pcpt("encoder.patch_embed.EncP.raw_point_embed.net.0.weight")


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="in_dim explicitly"):
        PointPN(100, num_stages=3)
    with pytest.raises(ValueError, match="in_dim must be >= 3"):
        PointPN(8, num_stages=2)
    with pytest.raises(ValueError, match="normalize"):
        PointPN(normalize="unit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entries"):
        PointPN(32, num_stages=2, blocks_per_stage=(1,))
    with pytest.raises(ValueError, match="needs N >= 12"):
        PointPN(32, num_stages=2, k=6)(torch.zeros(1, 11, 3))
    with pytest.raises(ValueError, match="float"):
        PointPN(32, num_stages=2, k=6)(torch.zeros(1, 64, 2))
