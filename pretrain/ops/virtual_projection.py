"""Any2Point's 3D-to-any virtual projection: token centres → positions in a frozen 1D / 2D positional table.

Any2Point (Tang et al., ECCV 2024) gives each 3D token the positional embedding of a frozen source model
(CLIP text: a 77-entry 1D table; DINOv2 / ImageBind audio: a 2D patch table) by projecting the token centre
into 6 fixed virtual views, looking each projection up in the table and averaging over the views. The same
projections cut the tokens into per-view cells for the adapter's local attention (``cells_1d`` /
``cells_2d``). Everything is batched over ``(B, V, G)``, pure torch, no randomness.

Views (official ``mv_utils.py:PCViews.get_pos``): Euler angles ``(x, y, z)`` =
``(0, 0, π/2), (π/2, 0, π/2), (π, 0, π/2), (3π/2, 0, π/2), (0, −π/2, π/2), (0, π/2, π/2)``;
``R = Rx · Ry · Rz`` (``euler2mat``) and a point (row vector) goes to ``p · Rᵀ − (0, 0, t)``, ``t`` the
translation (``TRANS``, negative: −1.6 CLIP, −1.8 DINOv2 ScanObjectNN, −1.4 others), i.e. the view moves
the cloud by ``+|t|`` along its depth axis. :func:`view_rotations` returns the right-multiplied matrices
``Rᵀ`` (the official ``rot_mat``), so ``p · view_rotations()[v]`` is the rotated point.

1D (CLIP, official ``points2pos`` with ``size_x = 1`` then ``bilinear_interpolation_3d_to_1d``):

1. per cloud and view, centre the tokens on their mean, project on the unit direction ``d``
   (``--pos_cor``), min–max normalise over the tokens to ``n ∈ [0, 1]``;
2. raw position ``r = (n · L − 0.5) mod L`` ∈ [0, L) (:func:`raw_positions_1d`). The shift wraps the
   token with ``n = 0`` to ``L − 0.5``, next to the one with ``n = 1``;
3. second rescale ``p = r · (L − 1) / (max r − min r)`` (:func:`positions_1d`). The official code takes
   ``max`` / ``min`` over the **whole batch tensor** (all samples, views and tokens), so a sample's positions
   depend on its batch-mates; pcpt's default takes them per cloud and view (``batch_rescale=False``),
   ``batch_rescale=True`` reproduces the official tensor-wide extremes, ``span=L`` fixes the extent to the
   large-batch limit of the official one (batch-independent and closest to the official values). The
   official formula does not subtract ``min r``: positions lie in
   ``[(L − 1)·min r/(max r − min r), (L − 1)·max r/(max r − min r)]``, which ends above ``L − 1`` (the
   extreme tokens have ``r ≥ L − 0.5``); both extreme-based modes keep that (``span=L`` stays in
   ``[0, L − 1)``);
4. the table is read at ``p`` with the official floor/ceil blend (:func:`interpolate_table_1d`).

The per-view cells of the 1D adapter branch come from the raw positions ``r`` (step 2), not from ``p``:
``cell = floor(r / c)`` with ``c`` = ``--coef_1dgird`` (2), ``ceil(L / c)`` cells per view.

2D (DINOv2, ImageBind audio; canvas ``(H, W)``, official ``points2pos`` of those sub-projects): with
``u = x / (z + 1e-12)``, ``v = y / (z + 1e-12) · H / W`` the pixel is
``px = ((u + 1) · W / 2 − 0.5) mod W`` (column), ``py = ((v + 1) · H / 2 − 0.5) mod H`` (row). For the square
DINOv2 canvas (518 × 518) this is exactly the DINOv2 formula; for the non-square ImageBind canvas
(304 × 192) it is the ImageBind one (the DINOv2 code only handles square canvases consistently). The patch
table ``(Ht, Wt, D)`` (row-major ViT patch grid, CLS entry dropped) is sampled with ``grid_sample``
(bilinear, zero padding, ``align_corners=True``) at ``(2 px / (W − 1) − 1, 2 py / (H − 1) − 1)``: canvas
pixel 0 hits the centre of patch 0 and pixel ``W − 1`` the centre of the last patch. Cells:
``floor(px / c) + floor(py / c) · ceil(W / c)``, ``ceil(W / c) · ceil(H / c)`` cells per view.

Official layout bug of the 2D variants: the official encoders reshape the ``(B · V, D, G)`` output of
``grid_sample`` straight to ``(B, V, G, D)`` without transposing, which scrambles channels and tokens inside
each (sample, view) block (:func:`official_layout_2d`). :func:`sample_table_2d` returns the intended
layout; ``virtual_pos_embed_2d(..., official_layout=True)`` reproduces the official embedding.

One deliberate deviation everywhere: a float ``mod`` can round a tiny negative value to exactly ``L`` (or
``W``, ``H``); pcpt maps such a value to 0, the mathematical remainder, so positions stay in ``[0, L)`` and
cell indices in range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLIP_TEXT_LENGTH",
    "NUM_VIEWS",
    "VIEW_ANGLES",
    "cells_1d",
    "cells_2d",
    "interpolate_table_1d",
    "num_cells_1d",
    "num_cells_2d",
    "official_layout_2d",
    "pixels_2d",
    "positions_1d",
    "project_to_views",
    "raw_positions_1d",
    "rescale_positions_1d",
    "sample_table_2d",
    "view_rotations",
    "virtual_pos_embed_1d",
    "virtual_pos_embed_2d",
]

#: Euler angles (x, y, z) of the 6 official virtual views.
VIEW_ANGLES: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, math.pi / 2),
    (math.pi / 2, 0.0, math.pi / 2),
    (math.pi, 0.0, math.pi / 2),
    (3 * math.pi / 2, 0.0, math.pi / 2),
    (0.0, -math.pi / 2, math.pi / 2),
    (0.0, math.pi / 2, math.pi / 2),
)
NUM_VIEWS = len(VIEW_ANGLES)
#: length of the CLIP text positional table (``LENGTH`` in the official ``mv_utils.py``).
CLIP_TEXT_LENGTH = 77
#: the official epsilon added to the depth before the perspective division.
_DEPTH_EPS = 1e-12


def _euler_matrix(x: float, y: float, z: float) -> Tensor:
    """``Rx(x) @ Ry(y) @ Rz(z)`` in float64 (official ``euler2mat``)."""
    cx, sx, cy, sy, cz, sz = math.cos(x), math.sin(x), math.cos(y), math.sin(y), math.cos(z), math.sin(z)
    rz = torch.tensor([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]], dtype=torch.float64)
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]], dtype=torch.float64)
    return rx @ ry @ rz


def view_rotations(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The 6 view rotations as right-multiplied matrices: ``rotated = p @ M[v]`` for row vectors ``p``.

    ``M[v] = (Rx · Ry · Rz)ᵀ`` for the Euler angles :data:`VIEW_ANGLES` (the official ``rot_mat``). Built in
    float64 and cast (the official code builds them in float32: entries differ by ~1e-8, e.g. cos(π/2)).

    Returns:
        (6, 3, 3) tensor of ``dtype`` on ``device``.
    """
    mats = torch.stack([_euler_matrix(*angles).T for angles in VIEW_ANGLES])
    return mats.to(dtype=dtype, device=device)


def project_to_views(centers: Tensor, translation: float) -> Tensor:
    """Token centres seen from the 6 views: ``p @ M[v] − (0, 0, translation)``.

    Args:
        centers: (B, G, 3) token centres.
        translation: the official ``TRANS`` (negative, e.g. −1.6): subtracted from the depth coordinate.

    Returns:
        (B, V, G, 3) view coordinates, V = 6.
    """
    if centers.ndim != 3 or centers.shape[-1] != 3:
        raise ValueError(f"centers must be (B, G, 3), got {tuple(centers.shape)}")
    rot = view_rotations(dtype=centers.dtype, device=centers.device)
    views = torch.einsum("bgi,vij->bvgj", centers, rot)
    shift = centers.new_tensor([0.0, 0.0, float(translation)])
    return views - shift


def _check_views(views: Tensor) -> None:
    if views.ndim != 4 or views.shape[-1] != 3:
        raise ValueError(f"views must be (B, V, G, 3), got {tuple(views.shape)}")


def _wrap(values: Tensor, modulus: float) -> Tensor:
    """``values mod modulus`` in ``[0, modulus)``: a rounded-up remainder equal to ``modulus`` becomes 0."""
    out = torch.remainder(values, modulus)
    return torch.where(out >= modulus, torch.zeros_like(out), out)


def raw_positions_1d(views: Tensor, direction: Sequence[float], length: int = CLIP_TEXT_LENGTH) -> Tensor:
    """The official ``points2pos`` (``size_x = 1``): per cloud and view, positions in ``[0, length)``.

    ``r = (n · length − 0.5) mod length`` with ``n`` the min–max normalised projection of the mean-centred
    view coordinates on ``direction / |direction|`` (extremes over the G tokens of one cloud and view). A
    degenerate cloud whose tokens all project to the same value (official: NaN) gets ``n = 0``.

    Args:
        views: (B, V, G, 3) view coordinates (:func:`project_to_views`).
        direction: 3 numbers (``--pos_cor``, e.g. (−1, 0, 1)); normalised here.
        length: table length L (77 for CLIP text).

    Returns:
        (B, V, G) float positions in ``[0, length)``; the cells of :func:`cells_1d` are cut from these.
    """
    _check_views(views)
    if len(direction) != 3:
        raise ValueError(f"direction must have 3 components, got {direction!r}")
    unit = views.new_tensor([float(c) for c in direction])
    norm = unit.norm()
    if not bool(norm > 0):
        raise ValueError(f"direction must be non-zero, got {direction!r}")
    unit = unit / norm
    relative = views - views.mean(dim=2, keepdim=True)
    proj = relative @ unit  # (B, V, G)
    low = proj.amin(dim=2, keepdim=True)
    span = proj.amax(dim=2, keepdim=True) - low
    normalized = torch.where(span > 0, (proj - low) / torch.where(span > 0, span, 1.0), 0.0)
    return _wrap(normalized * length - 0.5, float(length))


def rescale_positions_1d(
    raw: Tensor, length: int = CLIP_TEXT_LENGTH, *, batch_rescale: bool = False, span: float | None = None
) -> Tensor:
    """The official second rescale ``p = r · (length − 1) / (max r − min r)`` (no ``min`` subtracted).

    Args:
        raw: (B, V, G) raw positions (:func:`raw_positions_1d`).
        length: table length L.
        batch_rescale: False (pcpt default): ``max`` / ``min`` over the G tokens of each cloud and view, so a
            sample's positions do not depend on its batch-mates. True: over the whole (B, V, G) tensor, as the
            official ``bilinear_interpolation_3d_to_1d`` (``x.max() - x.min()``), which makes a sample's
            positions depend on its batch-mates.
        span: a fixed ``max r − min r`` instead of either (batch-independent; excludes ``batch_rescale``).
            ``span = length`` is the large-batch limit of the official rescale (the batch-wide ``min r``
            tends to 0 and ``max r`` to L): for a batch of 32 clouds of 128 tokens it stays within ~0.02
            positions of the official values, whereas the per-cloud extremes move the positions of clouds
            whose smallest raw position is far from 0 (up to several positions for 128 tokens).

    Returns:
        (B, V, G) positions, mostly in ``[0, length − 1]``; with the extreme-based modes, as in the official
        code, the largest ones end above ``length − 1`` by the factor ``max r / (max r − min r)`` (the extreme
        tokens have ``r ≥ length − 0.5``); ``span=length`` keeps them in ``[0, length − 1)``. Where
        ``max r = min r`` (official: division by zero) the positions are 0.
    """
    if raw.ndim != 3:
        raise ValueError(f"raw positions must be (B, V, G), got {tuple(raw.shape)}")
    if span is not None:
        if batch_rescale:
            raise ValueError("pass either span or batch_rescale=True, not both")
        if not span > 0:
            raise ValueError(f"span must be > 0, got {span}")
        return raw * ((length - 1) / float(span))
    if batch_rescale:
        extent = raw.amax() - raw.amin()
    else:
        extent = raw.amax(dim=2, keepdim=True) - raw.amin(dim=2, keepdim=True)
    safe = torch.where(extent > 0, extent, torch.ones_like(extent))
    return torch.where(extent > 0, raw * ((length - 1) / safe), torch.zeros_like(raw))


def positions_1d(
    views: Tensor,
    direction: Sequence[float],
    length: int = CLIP_TEXT_LENGTH,
    *,
    batch_rescale: bool = False,
    span: float | None = None,
) -> Tensor:
    """Continuous 1D table positions: :func:`raw_positions_1d` then :func:`rescale_positions_1d`.

    Args:
        views: (B, V, G, 3) view coordinates (:func:`project_to_views`).
        direction: projection direction (``--pos_cor``), normalised here.
        length: table length L (77).
        batch_rescale: see :func:`rescale_positions_1d` (False: per cloud and view; True: official,
            whole-batch extremes).
        span: see :func:`rescale_positions_1d` (a fixed extent, e.g. ``length``).

    Returns:
        (B, V, G) float positions for :func:`interpolate_table_1d`.
    """
    raw = raw_positions_1d(views, direction, length)
    return rescale_positions_1d(raw, length, batch_rescale=batch_rescale, span=span)


def interpolate_table_1d(table: Tensor, positions: Tensor, *, official_weights: bool = True) -> Tensor:
    """Reads a (L, D) table at continuous positions by a floor/ceil blend with clamped indices.

    ``lo = clamp(floor(p), 0, L−1)``, ``hi = clamp(ceil(p), 0, L−1)``.

    Args:
        table: (L, D) positional table (frozen source-model embedding).
        positions: (...,) float positions, typically (B, V, G).
        official_weights: True (default, official ``bilinear_interpolation_3d_to_1d``): weights
            ``(hi − p)`` on ``table[lo]`` and ``(p − lo)`` on ``table[hi]``. They sum to ``hi − lo``, so a
            position that is an exact integer, or lies beyond ``L − 1`` (the extreme tokens of every view,
            see :func:`rescale_positions_1d`) or below 0, reads a **zero** vector, as in the official model.
            False: ordinary linear interpolation of ``clamp(p, 0, L − 1)`` (weights always sum to 1).

    Returns:
        (..., D) in the promoted dtype of ``table`` and ``positions``.
    """
    if table.ndim != 2:
        raise ValueError(f"table must be (L, D), got {tuple(table.shape)}")
    last = table.shape[0] - 1
    dtype = torch.promote_types(table.dtype, positions.dtype)
    table, pos = table.to(dtype), positions.to(dtype)
    if not official_weights:
        pos = pos.clamp(0, last)
        lo = pos.floor().clamp(0, last)
        hi = (lo + 1).clamp(max=last)
        w_hi = pos - lo
        w_lo = 1 - w_hi
    else:
        lo = pos.floor().clamp(0, last)
        hi = pos.ceil().clamp(0, last)
        w_lo, w_hi = hi - pos, pos - lo
    return w_lo.unsqueeze(-1) * table[lo.long()] + w_hi.unsqueeze(-1) * table[hi.long()]


def _check_canvas(canvas: Sequence[int]) -> tuple[int, int]:
    if len(canvas) != 2 or any(isinstance(c, bool) or int(c) != c or c < 2 for c in canvas):
        raise ValueError(f"canvas must be two ints >= 2 (height, width), got {canvas!r}")
    return int(canvas[0]), int(canvas[1])


def pixels_2d(views: Tensor, canvas: tuple[int, int]) -> Tensor:
    """Perspective projection of view coordinates into a ``(height, width)`` canvas (official ``points2pos``).

    ``u = x / (z + 1e-12)``, ``v = y / (z + 1e-12) · H / W``; ``px = ((u + 1) · W / 2 − 0.5) mod W``,
    ``py = ((v + 1) · H / 2 − 0.5) mod H`` (points off the canvas wrap around, as in the official code).

    Args:
        views: (B, V, G, 3) view coordinates (:func:`project_to_views`).
        canvas: ``(H, W)`` in pixels: (518, 518) DINOv2, (304, 192) ImageBind audio.

    Returns:
        (B, V, G, 2) float ``(px, py)``: column in ``[0, W)``, row in ``[0, H)``.
    """
    _check_views(views)
    height, width = _check_canvas(canvas)
    depth = views[..., 2] + _DEPTH_EPS
    u = views[..., 0] / depth
    v = views[..., 1] / depth * (height / width)
    px = _wrap((u + 1) * width / 2 - 0.5, float(width))
    py = _wrap((v + 1) * height / 2 - 0.5, float(height))
    return torch.stack([px, py], dim=-1)


def sample_table_2d(table: Tensor, pixels: Tensor, canvas: tuple[int, int]) -> Tensor:
    """Bilinear ``grid_sample`` of an (Ht, Wt, D) patch table at canvas pixels (zero padding, align_corners).

    The normalised grid is ``(2 px / (W − 1) − 1, 2 py / (H − 1) − 1)``, as the official
    ``bilinear_interpolation_3d_to_2d``: with ``align_corners=True`` pixel 0 samples the centre of the first
    patch column and pixel ``W − 1`` the centre of the last; ``px > W − 1`` blends towards zero.

    Args:
        table: (Ht, Wt, D) patch positional embeddings in row-major patch order (a ViT ``pos_embed[1:]``
            reshaped to ``(Ht, Wt, D)``).
        pixels: (B, V, G, 2) ``(px, py)`` from :func:`pixels_2d`.
        canvas: the ``(H, W)`` canvas the pixels live in.

    Returns:
        (B, V, G, D).
    """
    if table.ndim != 3:
        raise ValueError(f"table must be (Ht, Wt, D), got {tuple(table.shape)}")
    if pixels.shape[-1] != 2:
        raise ValueError(f"pixels must be (..., 2), got {tuple(pixels.shape)}")
    height, width = _check_canvas(canvas)
    dtype = torch.promote_types(table.dtype, pixels.dtype)
    grid = torch.stack(
        [2 * pixels[..., 0] / (width - 1) - 1, 2 * pixels[..., 1] / (height - 1) - 1], dim=-1
    ).to(dtype)
    image = table.to(dtype).permute(2, 0, 1).unsqueeze(0)  # (1, D, Ht, Wt)
    flat = grid.reshape(1, -1, 1, 2)
    out = F.grid_sample(image, flat, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, :, 0].T.reshape(*pixels.shape[:-1], table.shape[-1])


def virtual_pos_embed_1d(
    centers: Tensor,
    table: Tensor,
    *,
    direction: Sequence[float],
    translation: float,
    batch_rescale: bool = False,
    span: float | None = None,
    official_weights: bool = True,
) -> Tensor:
    """Any2Point's 1D positional embedding of tokens: the table read in each view, averaged over the 6 views.

    Args:
        centers: (B, G, 3) token centres.
        table: (L, D) frozen 1D table (CLIP text ``positional_embedding``, 77 × 768).
        direction: ``--pos_cor``.
        translation: ``TRANS`` (−1.6 for CLIP).
        batch_rescale: see :func:`rescale_positions_1d`.
        span: see :func:`rescale_positions_1d`.
        official_weights: see :func:`interpolate_table_1d`.

    Returns:
        (B, G, D).
    """
    views = project_to_views(centers, translation)
    pos = positions_1d(views, direction, table.shape[0], batch_rescale=batch_rescale, span=span)
    return interpolate_table_1d(table, pos, official_weights=official_weights).mean(dim=1)


def official_layout_2d(samples: Tensor) -> Tensor:
    """Rearranges per-view 2D samples the way the official 2D variants (DINOv2, ImageBind) lay them out.

    The official ``bilinear_interpolation_3d_to_2d`` returns the ``grid_sample`` output as
    ``(B · V, D, G)`` and the encoder then calls ``.reshape(B, -1, G, D)`` on it (a reshape, not a transpose).
    The result is a fixed scramble of each (sample, view) block:
    ``out[b, v, g, d] = samples[b, v, (g · D + d) mod G, (g · D + d) div G]``, so a token's "positional
    embedding" mixes the table samples of other tokens of the same cloud and view. It never mixes samples or
    views. pcpt's :func:`sample_table_2d` returns the intended layout; this function reproduces the official
    one (needed to reuse the released DINOv2 / ImageBind Any2Point checkpoints).

    Args:
        samples: (B, V, G, D) per-view table samples in the intended layout (:func:`sample_table_2d`).

    Returns:
        (B, V, G, D) in the official layout.
    """
    if samples.ndim != 4:
        raise ValueError(f"samples must be (B, V, G, D), got {tuple(samples.shape)}")
    return samples.transpose(2, 3).reshape(samples.shape)


def virtual_pos_embed_2d(
    centers: Tensor,
    table: Tensor,
    *,
    canvas: tuple[int, int],
    translation: float,
    official_layout: bool = False,
) -> Tensor:
    """Any2Point's 2D positional embedding of tokens: the patch table sampled in each view, view-averaged.

    Args:
        centers: (B, G, 3) token centres.
        table: (Ht, Wt, D) frozen patch table (DINOv2 37 × 37, ImageBind audio 19 × 12).
        canvas: ``(H, W)`` virtual canvas (518 × 518, 304 × 192).
        translation: ``TRANS`` (−1.8 DINOv2 ScanObjectNN, −1.4 others).
        official_layout: scramble the per-view samples as the official code does before averaging
            (:func:`official_layout_2d`); False (default) keeps each token's own sample.

    Returns:
        (B, G, D).
    """
    views = project_to_views(centers, translation)
    samples = sample_table_2d(table, pixels_2d(views, canvas), canvas)
    if official_layout:
        samples = official_layout_2d(samples)
    return samples.mean(dim=1)


def num_cells_1d(cell: float, length: int = CLIP_TEXT_LENGTH) -> int:
    """Cells per view of the 1D branch: ``ceil(length / cell)`` (official ``grid_shape``)."""
    if not cell > 0:
        raise ValueError(f"cell must be > 0, got {cell}")
    return math.ceil(length / cell)


def cells_1d(positions: Tensor, cell: float) -> Tensor:
    """The cell of each token in each view of the 1D branch: ``floor(r / cell)``.

    Args:
        positions: (B, V, G) **raw** positions in ``[0, L)`` (:func:`raw_positions_1d`), as the official
            code cuts cells from ``points2pos``'s output, before the second rescale.
        cell: cell size in table positions (``--coef_1dgird``, 2).

    Returns:
        (B, V, G) int64 in ``[0, ceil(L / cell))``.
    """
    if not cell > 0:
        raise ValueError(f"cell must be > 0, got {cell}")
    return torch.div(positions, cell).floor().long()


def num_cells_2d(cell: int, canvas: tuple[int, int]) -> int:
    """Cells per view of the 2D branch: ``ceil(W / cell) · ceil(H / cell)``."""
    height, width = _check_canvas(canvas)
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    return math.ceil(width / cell) * math.ceil(height / cell)


def cells_2d(pixels: Tensor, cell: int, canvas: tuple[int, int]) -> Tensor:
    """The cell of each token in each view of the 2D branch (official ``flat_grid_index`` without batch).

    ``floor(px / cell) + floor(py / cell) · ceil(W / cell)``.

    Args:
        pixels: (B, V, G, 2) ``(px, py)`` from :func:`pixels_2d`.
        cell: cell size in pixels (``--coef_2dgird``: 26 DINOv2, 16 ImageBind).
        canvas: ``(H, W)``.

    Returns:
        (B, V, G) int64 in ``[0, num_cells_2d(cell, canvas))``.
    """
    height, width = _check_canvas(canvas)
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    cols, rows = math.ceil(width / cell), math.ceil(height / cell)
    ix = torch.div(pixels[..., 0], cell).floor().long().clamp(0, cols - 1)
    iy = torch.div(pixels[..., 1], cell).floor().long().clamp(0, rows - 1)
    return ix + iy * cols
