from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.ops.virtual_projection import (
    VIEW_ANGLES,
    cells_1d,
    cells_2d,
    interpolate_table_1d,
    num_cells_1d,
    num_cells_2d,
    official_layout_2d,
    pixels_2d,
    positions_1d,
    project_to_views,
    raw_positions_1d,
    rescale_positions_1d,
    sample_table_2d,
    view_rotations,
    virtual_pos_embed_1d,
    virtual_pos_embed_2d,
)

DIRECTION = (-1.0, 0.0, 1.0)


def _centers(gen: torch.Generator, batch: int = 3, groups: int = 12) -> torch.Tensor:
    return (torch.rand(batch, groups, 3, generator=gen, dtype=torch.float64) - 0.5) * 1.6


# ---------------------------------------------------------------- slow references: Python loops over points


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _slow_rotation(x: float, y: float, z: float) -> list[list[float]]:
    """The official euler2mat (Rx @ Ry @ Rz), transposed as the official ``rot_mat``."""
    rz = [[math.cos(z), -math.sin(z), 0.0], [math.sin(z), math.cos(z), 0.0], [0.0, 0.0, 1.0]]
    ry = [[math.cos(y), 0.0, math.sin(y)], [0.0, 1.0, 0.0], [-math.sin(y), 0.0, math.cos(y)]]
    rx = [[1.0, 0.0, 0.0], [0.0, math.cos(x), -math.sin(x)], [0.0, math.sin(x), math.cos(x)]]
    r = _matmul(_matmul(rx, ry), rz)
    return [[r[j][i] for j in range(3)] for i in range(3)]


def _slow_views(centers: torch.Tensor, translation: float) -> list[list[list[list[float]]]]:
    """[b][v][g] -> [x, y, z]: p (row) times rot_mat, minus (0, 0, translation)."""
    out = []
    for b in range(centers.shape[0]):
        per_view = []
        for angles in VIEW_ANGLES:
            rot = _slow_rotation(*angles)
            pts = []
            for g in range(centers.shape[1]):
                p = [float(c) for c in centers[b, g]]
                q = [sum(p[i] * rot[i][j] for i in range(3)) for j in range(3)]
                q[2] -= translation
                pts.append(q)
            per_view.append(pts)
        out.append(per_view)
    return out


def _slow_raw_1d(views: list, direction: tuple[float, ...], length: int) -> list[list[list[float]]]:
    norm = math.sqrt(sum(c * c for c in direction))
    d = [c / norm for c in direction]
    out = []
    for per_view in views:
        rows = []
        for pts in per_view:
            mean = [sum(p[i] for p in pts) / len(pts) for i in range(3)]
            proj = [sum((p[i] - mean[i]) * d[i] for i in range(3)) for p in pts]
            lo, hi = min(proj), max(proj)
            rows.append([((x - lo) / (hi - lo) * length - 0.5) % length for x in proj])
        out.append(rows)
    return out


def _slow_rescale(raw: list, length: int, batch: bool) -> list[list[list[float]]]:
    flat = [x for per_view in raw for row in per_view for x in row]
    out = []
    for per_view in raw:
        rows = []
        for row in per_view:
            lo, hi = (min(flat), max(flat)) if batch else (min(row), max(row))
            rows.append([x * (length - 1) / (hi - lo) for x in row])
        out.append(rows)
    return out


def _slow_interp_1d(table: torch.Tensor, p: float, official: bool) -> torch.Tensor:
    last = table.shape[0] - 1
    if official:
        lo, hi = min(max(math.floor(p), 0), last), min(max(math.ceil(p), 0), last)
        return (hi - p) * table[lo] + (p - lo) * table[hi]
    p = min(max(p, 0.0), float(last))
    lo = math.floor(p)
    hi = min(lo + 1, last)
    return (1 - (p - lo)) * table[lo] + (p - lo) * table[hi]


def _slow_pixel(q: list[float], canvas: tuple[int, int]) -> tuple[float, float]:
    h, w = canvas
    u = q[0] / (q[2] + 1e-12)
    v = q[1] / (q[2] + 1e-12) * h / w
    return ((u + 1) * w / 2 - 0.5) % w, ((v + 1) * h / 2 - 0.5) % h


def _slow_bilinear(table: torch.Tensor, px: float, py: float, canvas: tuple[int, int]) -> torch.Tensor:
    """align_corners=True, zero padding, written out: corner weights of the four neighbouring patches."""
    h, w = canvas
    th, tw, d = table.shape
    cx, cy = px / (w - 1) * (tw - 1), py / (h - 1) * (th - 1)
    x0, y0 = math.floor(cx), math.floor(cy)
    out = torch.zeros(d, dtype=table.dtype)
    for xi, wx in ((x0, 1 - (cx - x0)), (x0 + 1, cx - x0)):
        for yi, wy in ((y0, 1 - (cy - y0)), (y0 + 1, cy - y0)):
            if 0 <= xi < tw and 0 <= yi < th:
                out += wx * wy * table[yi, xi]
    return out


# ---------------------------------------------------------------- tests


def test_view_rotations_match_official_euler_matrices() -> None:
    rot = view_rotations(dtype=torch.float64)
    assert rot.shape == (6, 3, 3)
    for v, angles in enumerate(VIEW_ANGLES):
        torch.testing.assert_close(rot[v], torch.tensor(_slow_rotation(*angles), dtype=torch.float64))
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(6, 3, 3))
    assert view_rotations().dtype == torch.float32


def test_project_to_views_matches_loop(gen: torch.Generator) -> None:
    centers = _centers(gen)
    views = project_to_views(centers, -1.6)
    assert views.shape == (3, 6, 12, 3)
    torch.testing.assert_close(views, torch.tensor(_slow_views(centers, -1.6), dtype=torch.float64))
    # TRANS < 0 moves the cloud away from the camera along the depth axis
    torch.testing.assert_close(views[..., 2], project_to_views(centers, 0.0)[..., 2] + 1.6)


@pytest.mark.parametrize("direction", [DIRECTION, (1.0, -1.0, 0.0)])
def test_raw_positions_match_official_points2pos(gen: torch.Generator, direction: tuple[float, ...]) -> None:
    centers = _centers(gen)
    views = project_to_views(centers, -1.6)
    raw = raw_positions_1d(views, direction, 77)
    ref = torch.tensor(_slow_raw_1d(_slow_views(centers, -1.6), direction, 77), dtype=torch.float64)
    torch.testing.assert_close(raw, ref)
    assert raw.min() >= 0
    assert raw.max() < 77
    # the extreme tokens along the direction (n = 0 and n = 1) both land on L - 0.5
    assert torch.isclose(raw, torch.tensor(76.5, dtype=torch.float64)).sum(dim=2).min() >= 2


@pytest.mark.parametrize("batch_rescale", [False, True])
def test_positions_match_loop_in_both_rescale_modes(gen: torch.Generator, batch_rescale: bool) -> None:
    centers = _centers(gen, groups=9)
    pos = positions_1d(project_to_views(centers, -1.6), DIRECTION, 77, batch_rescale=batch_rescale)
    raw = _slow_raw_1d(_slow_views(centers, -1.6), DIRECTION, 77)
    ref = torch.tensor(_slow_rescale(raw, 77, batch_rescale), dtype=torch.float64)
    torch.testing.assert_close(pos, ref)


def test_fixed_span_rescale(gen: torch.Generator) -> None:
    raw = raw_positions_1d(project_to_views(_centers(gen), -1.6), DIRECTION)
    torch.testing.assert_close(rescale_positions_1d(raw, 77, span=77.0), raw * 76 / 77)
    assert rescale_positions_1d(raw, 77, span=77.0).max() < 76
    with pytest.raises(ValueError, match="either span"):
        rescale_positions_1d(raw, 77, batch_rescale=True, span=77.0)


def test_default_positions_do_not_depend_on_batch_mates(gen: torch.Generator) -> None:
    """Fails if the default rescale were the official batch-wide one."""
    target = _centers(gen, batch=1, groups=12)
    batch = torch.cat([target, _centers(gen, batch=7, groups=12)])  # mates move the batch-wide extremes
    alone_views, batch_views = project_to_views(target, -1.6), project_to_views(batch, -1.6)

    default_alone = positions_1d(alone_views, DIRECTION)
    torch.testing.assert_close(positions_1d(batch_views, DIRECTION)[:1], default_alone, rtol=0, atol=0)
    torch.testing.assert_close(
        positions_1d(batch_views, DIRECTION, span=77.0)[:1], positions_1d(alone_views, DIRECTION, span=77.0)
    )
    official_alone = positions_1d(alone_views, DIRECTION, batch_rescale=True)
    official_in_batch = positions_1d(batch_views, DIRECTION, batch_rescale=True)[:1]
    assert (official_in_batch - official_alone).abs().max() > 1e-3


def test_degenerate_cloud_gives_finite_positions() -> None:
    views = project_to_views(torch.ones(2, 5, 3), -1.6)
    assert torch.isfinite(raw_positions_1d(views, DIRECTION)).all()
    assert torch.isfinite(positions_1d(views, DIRECTION)).all()
    with pytest.raises(ValueError, match="non-zero"):
        raw_positions_1d(views, (0.0, 0.0, 0.0))


@pytest.mark.parametrize("official", [True, False])
def test_interpolate_table_1d_matches_loop(gen: torch.Generator, official: bool) -> None:
    table = torch.randn(77, 5, generator=gen, dtype=torch.float64)
    pos = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64) * 78 - 0.5
    pos[0, 0, :3] = torch.tensor([0.0, 30.0, 76.0], dtype=torch.float64)  # exact integers
    pos[1, 2, 3] = 76.4  # beyond the table's last entry
    out = interpolate_table_1d(table, pos, official_weights=official)
    assert out.shape == (2, 3, 4, 5)
    ref = torch.stack([_slow_interp_1d(table, float(p), official) for p in pos.reshape(-1)]).view(2, 3, 4, 5)
    torch.testing.assert_close(out, ref)
    if official:  # the official floor/ceil weights vanish at integers and beyond L - 1
        assert out[0, 0, :3].abs().max() == 0
        assert out[1, 2, 3].abs().max() == 0
    else:
        torch.testing.assert_close(out[0, 0, 1], table[30])
        torch.testing.assert_close(out[1, 2, 3], table[76])


@pytest.mark.parametrize("canvas", [(518, 518), (304, 192)])
def test_pixels_2d_match_loop(gen: torch.Generator, canvas: tuple[int, int]) -> None:
    centers = _centers(gen)
    pixels = pixels_2d(project_to_views(centers, -1.8), canvas)
    assert pixels.shape == (3, 6, 12, 2)
    ref = [
        [[_slow_pixel(q, canvas) for q in pts] for pts in per_view] for per_view in _slow_views(centers, -1.8)
    ]
    torch.testing.assert_close(pixels, torch.tensor(ref, dtype=torch.float64))
    assert pixels[..., 0].max() < canvas[1]
    assert pixels[..., 1].max() < canvas[0]
    assert pixels.min() >= 0


def test_square_canvas_matches_dinov2_formula(gen: torch.Generator) -> None:
    """DINOv2: coord_x = x / z · W / H, _x = (coord_x + 1) · H / 2 − 0.5 mod H; _y likewise with W."""
    views = project_to_views(_centers(gen), -1.8)
    size = 518.0
    z = views[..., 2] + 1e-12
    px = ((views[..., 0] / z * (size / size) + 1) * size / 2 - 0.5) % size
    py = ((views[..., 1] / z + 1) * size / 2 - 0.5) % size
    torch.testing.assert_close(pixels_2d(views, (518, 518)), torch.stack([px, py], dim=-1))


@pytest.mark.parametrize(("canvas", "grid"), [((518, 518), (37, 37)), ((304, 192), (19, 12))])
def test_sample_table_2d_matches_explicit_bilinear(
    gen: torch.Generator, canvas: tuple[int, int], grid: tuple[int, int]
) -> None:
    table = torch.randn(*grid, 4, generator=gen, dtype=torch.float64)
    pixels = torch.rand(2, 6, 5, 2, generator=gen, dtype=torch.float64)
    pixels[..., 0] *= canvas[1]
    pixels[..., 1] *= canvas[0]
    pixels[0, 0, 0] = torch.tensor([0.0, 0.0])  # centre of the first patch
    pixels[0, 0, 1] = torch.tensor([canvas[1] - 1.0, canvas[0] - 1.0])  # centre of the last patch
    pixels[0, 0, 2] = torch.tensor([canvas[1] - 0.3, canvas[0] - 0.6])  # beyond it: blends with zero padding
    out = sample_table_2d(table, pixels, canvas)
    assert out.shape == (2, 6, 5, 4)
    ref = torch.stack(
        [_slow_bilinear(table, float(px), float(py), canvas) for px, py in pixels.reshape(-1, 2)]
    ).view(2, 6, 5, 4)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out[0, 0, 0], table[0, 0])
    torch.testing.assert_close(out[0, 0, 1], table[-1, -1])


def test_official_layout_2d_reproduces_the_official_reshape(gen: torch.Generator) -> None:
    """Official: grid_sample on (B·V, D, Ht, Wt) with a (B·V, G, 1, 2) grid, squeeze, reshape(B, -1, G, D)."""
    batch, views, groups, dim = 2, 6, 5, 3
    canvas, table = (518, 518), torch.randn(37, 37, dim, generator=gen, dtype=torch.float64)
    pixels = torch.rand(batch, views, groups, 2, generator=gen, dtype=torch.float64) * 518
    samples = sample_table_2d(table, pixels, canvas)

    image = table.permute(2, 0, 1).unsqueeze(0).repeat(batch * views, 1, 1, 1)
    grid = (2 * pixels / 517 - 1).reshape(batch * views, groups, 1, 2)
    official = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True).squeeze()
    official = official.reshape(batch, -1, groups, dim)  # (B·V, D, G) memory read as (B, V, G, D)
    torch.testing.assert_close(official_layout_2d(samples), official)
    for b, v, g, d in ((0, 0, 0, 1), (1, 3, 4, 2), (0, 5, 2, 0)):
        flat = g * dim + d
        assert official_layout_2d(samples)[b, v, g, d] == samples[b, v, flat % groups, flat // groups]

    centers = _centers(gen, groups=groups)
    proj = pixels_2d(project_to_views(centers, -1.8), canvas)
    torch.testing.assert_close(
        virtual_pos_embed_2d(centers, table, canvas=canvas, translation=-1.8, official_layout=True),
        official_layout_2d(sample_table_2d(table, proj, canvas)).mean(1),
    )


def test_cells_match_loop(gen: torch.Generator) -> None:
    centers = _centers(gen)
    views = project_to_views(centers, -1.6)
    raw = raw_positions_1d(views, DIRECTION)
    cells = cells_1d(raw, 2.0)
    assert cells.dtype == torch.long
    torch.testing.assert_close(
        cells, torch.tensor([[[math.floor(float(r) / 2) for r in row] for row in v] for v in raw])
    )
    assert num_cells_1d(2.0) == 39
    assert cells.max() < 39
    assert num_cells_1d(7.0) == 11

    for canvas, cell in (((518, 518), 26), ((304, 192), 16)):
        pixels = pixels_2d(views, canvas)
        cells2 = cells_2d(pixels, cell, canvas)
        cols = math.ceil(canvas[1] / cell)
        ref = [
            [
                [math.floor(float(p[0]) / cell) + math.floor(float(p[1]) / cell) * cols for p in row]
                for row in v
            ]
            for v in pixels
        ]
        torch.testing.assert_close(cells2, torch.tensor(ref))
        assert cells2.max() < num_cells_2d(cell, canvas)
    assert num_cells_2d(26, (518, 518)) == 400
    assert num_cells_2d(16, (304, 192)) == 12 * 19


def test_virtual_pos_embed_is_view_mean_of_the_loop_pipeline(gen: torch.Generator) -> None:
    centers = _centers(gen, groups=6)
    table1 = torch.randn(77, 3, generator=gen, dtype=torch.float64)
    raw = _slow_raw_1d(_slow_views(centers, -1.6), DIRECTION, 77)
    pos = _slow_rescale(raw, 77, batch=False)
    ref1 = torch.stack(
        [
            torch.stack(
                [
                    torch.stack([_slow_interp_1d(table1, pos[b][v][g], True) for v in range(6)]).mean(0)
                    for g in range(6)
                ]
            )
            for b in range(3)
        ]
    )
    out1 = virtual_pos_embed_1d(centers, table1, direction=DIRECTION, translation=-1.6)
    torch.testing.assert_close(out1, ref1)

    canvas = (518, 518)
    table2 = torch.randn(37, 37, 3, generator=gen, dtype=torch.float64)
    views = _slow_views(centers, -1.8)
    ref2 = torch.stack(
        [
            torch.stack(
                [
                    torch.stack(
                        [
                            _slow_bilinear(table2, *_slow_pixel(views[b][v][g], canvas), canvas)
                            for v in range(6)
                        ]
                    ).mean(0)
                    for g in range(6)
                ]
            )
            for b in range(3)
        ]
    )
    torch.testing.assert_close(virtual_pos_embed_2d(centers, table2, canvas=canvas, translation=-1.8), ref2)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match=r"\(B, G, 3\)"):
        project_to_views(torch.zeros(4, 3), -1.6)
    with pytest.raises(ValueError, match=r"\(B, V, G, 3\)"):
        positions_1d(torch.zeros(2, 6, 3), DIRECTION)
    with pytest.raises(ValueError, match="canvas"):
        pixels_2d(torch.zeros(1, 6, 2, 3), (518,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(L, D\)"):
        interpolate_table_1d(torch.zeros(77), torch.zeros(3))
    with pytest.raises(ValueError, match="cell"):
        cells_1d(torch.zeros(1, 6, 2), 0.0)
