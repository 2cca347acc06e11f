"""GeoMAE geometric targets, batched in torch: multi-scale centroids, occupancy, surface normals, curvature.

Two flavours share one eigen-analysis (:func:`scatter_normals`, :func:`normals_from_scatter`) and one sign
rule (:func:`orient_normals`):

* :func:`pillar_targets`, the scene-level targets of GeoMAE (CVPR 2023, ``extract_feat`` of
  ``MultiSubVoxelDynamicVoxelNetSSL``) for a pillarised LiDAR batch: the centroid of every pillar, the
  centroids and occupancy of its "low" and "med" sub-voxels, and a normal and curvature per pillar from the
  med sub-voxel centroids of its 3×3 bird's-eye-view neighbourhood.
* :func:`patch_targets`, the object-level analogue for Point-MAE style patches (FPS centres + kNN
  neighbourhoods).

Coordinates are (x, y, z) everywhere (the official code works in (z, y, x)); the dense sub-voxel slot order
keeps the official one, z major: ``slot = iz·ry·rx + iy·rx + ix``. Everything is computed in float64 and
returned in float32. The ops carry no gradient (targets) and use no randomness.

Eigen rules (shared): the 3×3 scatter matrix ``S = Σ wₖ (pₖ − o)(pₖ − o)ᵀ`` is a sum, not a mean. The official
code takes ``torch.svd(S)``; pcpt takes ``torch.linalg.eigh(S)`` of the symmetric ``S`` in float64, which is
the same decomposition for a positive semi-definite ``S`` (singular values = eigenvalues, right singular
vectors = eigenvectors up to sign). The normal is the unit eigenvector of the smallest eigenvalue; the
curvature is the 3-vector ``(λ + 1e-9) / Σ(λ + 1e-9)`` with the eigenvalues in **descending** order (the order
of SVD's singular values, as official), so its last component is the "surface variation" (≈ 0 on a plane, 1/3
for isotropic or empty neighbourhoods). Eigenvalues below zero (rounding of a PSD matrix) are clamped to 0.
When the smallest eigenvalue is degenerate (fewer than three independent directions, e.g. one or two points),
the normal is some unit vector of its eigenspace, finite but not meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PatchTargets",
    "PillarTargets",
    "bev_neighbors",
    "normals_from_scatter",
    "orient_normals",
    "patch_targets",
    "pillar_targets",
    "scatter_normals",
]

CURVATURE_EPS = 1e-9
"""Added to every eigenvalue before normalising the curvature (the official ``eps``, float64)."""

_BEV_OFFSETS = tuple((dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1))
"""The 9 (dx, dy) pillar offsets of a 3×3 BEV neighbourhood, x major; index 4 is the pillar itself."""


class PillarTargets(NamedTuple):
    """GeoMAE targets of every pillar (see :func:`pillar_targets`); float32 unless stated.

    Attributes:
        top_centroid: (P, 3) mean of the pillar's points, ``(c − min_corner) / size`` ∈ [0, 1]³; z over the
            pillar's full height ``z_max − z_min``. Zeros for a pillar without points.
        med_centroid: (P, Sm, 3) centroid of each med sub-voxel normalised to that sub-voxel; zeros where
        empty. med_occupancy: (P, Sm) bool, True where the med sub-voxel holds at least one point.
        low_centroid: (P, Sl, 3) as ``med_centroid`` for the low sub-voxels.
        low_occupancy: (P, Sl) bool.
        normal: (P, 3) unit normal from the med centroids of the 3×3 neighbourhood.
        curvature: (P, 3) eigenvalues on the simplex, descending (last ≈ 0 on a plane).
        normal_points: (P,) long, the occupied med slots that entered the scatter matrix.
    """

    top_centroid: Tensor
    med_centroid: Tensor
    med_occupancy: Tensor
    low_centroid: Tensor
    low_occupancy: Tensor
    normal: Tensor
    curvature: Tensor
    normal_points: Tensor


class PatchTargets(NamedTuple):
    """Object-level geometric targets of Point-MAE style patches (see :func:`patch_targets`); float32.

    Attributes:
        centroid: (B, G, 3) mean of the patch's points in its cell, in [0, 1]³.
        sub_centroid: (B, G, S, 3) centroid of each sub-cell normalised to that sub-cell; zeros where empty.
        sub_occupancy: (B, G, S) bool, True where the sub-cell holds at least one point.
        normal: (B, G, 3) unit normal of the patch.
        curvature: (B, G, 3) eigenvalues on the simplex, descending.
    """

    centroid: Tensor
    sub_centroid: Tensor
    sub_occupancy: Tensor
    normal: Tensor
    curvature: Tensor


def normals_from_scatter(scatter: Tensor) -> tuple[Tensor, Tensor]:
    """Normal and curvature of symmetric positive semi-definite 3×3 scatter matrices.

    ``torch.linalg.eigh`` in float64 (identical to the official ``torch.svd`` for PSD matrices, up to the sign
    of the vectors). The normal is the eigenvector of the smallest eigenvalue, L2-normalised, with the sign
    ``eigh`` returns; the curvature is ``(λ + 1e-9) / Σ(λ + 1e-9)`` over the eigenvalues in descending order
    (SVD order), negative rounding clamped to 0.

    Args:
        scatter: Scatter matrices; only the lower triangle is read (``eigh``).

    Returns:
        ``(normal, curvature)`` in float64.

    Shapes:
        scatter: (..., 3, 3) -> normal (..., 3), curvature (..., 3).

    Raises:
        ValueError: If the last two dimensions are not 3×3.
    """
    if scatter.dim() < 2 or scatter.shape[-2:] != (3, 3):
        raise ValueError(f"scatter must have shape (..., 3, 3), got {tuple(scatter.shape)}")
    eigenvalues, eigenvectors = torch.linalg.eigh(scatter.to(torch.float64))
    normal = eigenvectors[..., :, 0]  # ascending eigenvalues: column 0 is the smallest
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    values = eigenvalues.clamp_min(0.0).flip(-1) + CURVATURE_EPS
    return normal, values / values.sum(dim=-1, keepdim=True)


def scatter_normals(points: Tensor, valid: Tensor | None, origin: Tensor) -> tuple[Tensor, Tensor]:
    """Normal and curvature of point sets from their scatter matrix about ``origin``.

    ``S = Σₖ wₖ (pₖ − o)(pₖ − o)ᵀ`` (a sum; a point with weight 0 contributes nothing), then
    :func:`normals_from_scatter`. Computed in float64.

    Args:
        points: Point sets.
        valid: Bool mask or float weights of the points; None weighs every point 1.
        origin: Centre of each scatter matrix (GeoMAE: the pillar centroid; patches: their mean).

    Returns:
        ``(normal, curvature)`` in float64, as :func:`normals_from_scatter`.

    Shapes:
        points: (..., K, 3), valid: (..., K), origin: (..., 3) -> (..., 3), (..., 3).
    """
    if points.dim() < 2 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., K, 3), got {tuple(points.shape)}")
    centred = points.to(torch.float64) - origin.to(torch.float64).unsqueeze(-2)
    weighted = centred if valid is None else centred * valid.to(torch.float64).unsqueeze(-1)
    return normals_from_scatter(weighted.transpose(-1, -2) @ centred)


def orient_normals(
    normal: Tensor,
    position: Tensor,
    viewpoint: Tensor | Sequence[float],
    *,
    toward: bool = True,
) -> Tensor:
    """Flips normals to face toward (or away from) a viewpoint.

    With ``toward=True`` each normal is negated where ``normal · (viewpoint − position) < 0``, so that
    afterwards ``normal · (viewpoint − position) >= 0``; with ``toward=False`` where it is ``> 0``, so that it
    faces away. A normal orthogonal to the viewing direction is left as it is.

    Args:
        normal: Normals to orient.
        position: Where each normal sits.
        viewpoint: The sensor (or object centre), broadcast against ``position``.
        toward: Face the viewpoint (True) or away from it (False).

    Returns:
        The oriented normals, dtype and device of ``normal``.

    Shapes:
        normal: (..., 3), position: (..., 3), viewpoint: (3,) or broadcastable -> (..., 3).
    """
    view = torch.as_tensor(viewpoint, dtype=torch.float64, device=normal.device)
    dot = (normal.to(torch.float64) * (view - position.to(torch.float64))).sum(dim=-1, keepdim=True)
    flip = dot < 0 if toward else dot > 0
    return torch.where(flip, -normal, normal)


def bev_neighbors(coords: Tensor) -> Tensor:
    """Index of every pillar's 3×3 bird's-eye-view neighbours (same batch index, ix ± 1, iy ± 1).

    Pure torch and batched: linear keys of ``(batch, ix, iy)``, one sort, one ``searchsorted`` per offset.
    Offsets are ordered x major, ``(dx, dy) = (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), ...``, so column 4
    is the pillar itself. The submanifold 3×3 neighbourhood of spconv's ``get_indice_pairs`` (kernel [1, 3,
    3]) used by the official code.

    Args:
        coords: ``(batch, ix, iy)`` of every pillar, unique rows.

    Returns:
        Neighbour row indices into ``coords``, -1 where that cell has no pillar.

    Shapes:
        coords: (P, 3) long -> (P, 9) long.

    Raises:
        ValueError: If ``coords`` is not an integer (P, 3) tensor or has repeated rows.
    """
    if coords.dim() != 2 or coords.shape[1] != 3 or coords.is_floating_point() or coords.is_complex():
        raise ValueError(f"coords must be an integer (P, 3) tensor, got {coords.dtype} {tuple(coords.shape)}")
    coords = coords.long()
    num = coords.shape[0]
    if num == 0:
        return coords.new_empty(0, len(_BEV_OFFSETS))
    low = coords.amin(dim=0)
    extent = (
        coords.amax(dim=0) - low + 3
    )  # one free cell on each side of x and y: keys of offsets stay unique
    shifted = coords - low + torch.tensor([0, 1, 1], device=coords.device)
    keys = (shifted[:, 0] * extent[1] + shifted[:, 1]) * extent[2] + shifted[:, 2]
    sorted_keys, order = keys.sort()
    if num > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise ValueError("coords has repeated (batch, ix, iy) rows")
    offsets = torch.tensor([dx for dx, _ in _BEV_OFFSETS], device=coords.device) * extent[2] + torch.tensor(
        [dy for _, dy in _BEV_OFFSETS], device=coords.device
    )
    wanted = keys[:, None] + offsets[None, :]
    pos = torch.searchsorted(sorted_keys, wanted).clamp_max(num - 1)
    found = sorted_keys[pos] == wanted
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def pillar_targets(
    xyz: Tensor,
    point_pillar: Tensor,
    coords: Tensor,
    *,
    point_range: tuple[float, float, float, float, float, float],
    pillar_size: tuple[float, float],
    low_ratio: tuple[int, int, int] = (4, 4, 8),
    med_ratio: tuple[int, int, int] = (2, 2, 4),
    normal_sign: Literal["viewpoint", "none"] = "viewpoint",
    viewpoint: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> PillarTargets:
    """GeoMAE's per-pillar geometric targets (``extract_feat`` of the official pre-training detector).

    A pillar ``(b, ix, iy)`` spans x in ``[x_min + ix·sx, x_min + (ix+1)·sx)``, y likewise and z in
    ``[z_min, z_max]``. Its sub-voxels at a level with ratio ``(rx, ry, rz)`` have size
    ``(sx/rx, sy/ry, (z_max − z_min)/rz)``; a point's in-pillar sub-indices are
    ``floor((p − min_corner) / sub_size)`` clamped to ``[0, r − 1]`` (a point on the pillar's max boundary
    goes to the last sub-voxel) and its dense slot is ``iz·ry·rx + iy·rx + ix`` (official order, z major).
    Every centroid is the mean of the points in its (sub-)voxel, normalised as
    ``(c − voxel_min_corner) / voxel_size`` (``normalize_sub_voxel=True``), so it lies in [0, 1]³ for points
    inside their pillar (not clamped: a float32 point on a max face may give 1 + 1e-7).

    Normal and curvature (``cal_regular_voxel_nor_and_curv``): the metric (un-normalised) med centroids of all
    occupied med slots of the non-empty pillars in the 3×3 BEV neighbourhood (:func:`bev_neighbors`, the
    pillar included, same batch index), minus the pillar's own metric centroid, give the scatter matrix
    ``S = XᵀX`` (a sum; up to 9·Sm rows); see the module docstring for the eigen rules (``eigh`` in float64 =
    the official SVD for PSD ``S``; curvature descending). The scatter matrix is accumulated from per-pillar
    moments (count, sum and second moment of its med centroids in its own frame, shifted to the centre
    pillar's centroid), so memory stays O(P) instead of the official (P, 144, 3) gather; sub-voxel
    centroids are computed on the occupied slots only (one ``torch.unique`` of the point keys per level) and
    written once into the dense float32 outputs. Validation costs two host syncs (``coords`` unique,
    ``point_pillar`` in range).

    Sign of the normal: ``"viewpoint"`` (pcpt default) flips it to face the sensor,
    ``normal · (viewpoint − metric top centroid) >= 0``; ``"none"`` keeps the sign ``eigh`` returns, like the
    official code, which leaves the SVD sign arbitrary although the loss is MSE.

    Args:
        xyz: Metric points, already inside ``point_range``.
        point_pillar: Row of ``coords`` each point belongs to.
        coords: ``(batch, ix, iy)`` of every pillar, unique rows, any order. A pillar without points gets zero
            centroids and occupancy, contributes nothing to its neighbours and takes its normal about its
            min corner.
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``.
        pillar_size: ``(sx, sy)``; the pillar height is ``z_max − z_min``.
        low_ratio: Low sub-voxels per pillar along (x, y, z); GeoMAE: (4, 4, 8), 128 slots.
        med_ratio: Med sub-voxels per pillar along (x, y, z); GeoMAE: (2, 2, 4), 16 slots.
        normal_sign: ``"viewpoint"`` or ``"none"`` (official).
        viewpoint: Sensor position for ``normal_sign="viewpoint"``.

    Returns:
        :class:`PillarTargets`, float32 on the device of ``xyz``.

    Shapes:
        xyz: (M, 3), point_pillar: (M,) long, coords: (P, 3) long.
        returns: top_centroid (P, 3); med_centroid (P, Sm, 3), med_occupancy (P, Sm) with Sm =
        prod(med_ratio); low_centroid (P, Sl, 3), low_occupancy (P, Sl) with Sl = prod(low_ratio); normal,
        curvature (P, 3); normal_points (P,).

    Raises:
        ValueError: On malformed shapes, ratios or sizes, ``point_pillar`` outside ``[0, P)``, repeated
            ``coords`` rows or an unknown ``normal_sign``.
    """
    if xyz.dim() != 2 or xyz.shape[1] != 3 or not xyz.is_floating_point():
        raise ValueError(f"xyz must be a float (M, 3) tensor, got {xyz.dtype} {tuple(xyz.shape)}")
    if point_pillar.shape != xyz.shape[:1] or point_pillar.is_floating_point():
        raise ValueError(
            f"point_pillar must be an integer ({xyz.shape[0]},) tensor, got {tuple(point_pillar.shape)}"
        )
    if normal_sign not in ("viewpoint", "none"):
        raise ValueError(f"normal_sign must be 'viewpoint' or 'none', got {normal_sign!r}")
    if len(point_range) != 6 or len(pillar_size) != 2:
        raise ValueError("point_range needs 6 values and pillar_size 2")
    for name, ratio in (("low_ratio", low_ratio), ("med_ratio", med_ratio)):
        if len(ratio) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ratio):
            raise ValueError(f"{name} must be three positive ints, got {ratio!r}")
    height = point_range[5] - point_range[2]
    if min(pillar_size[0], pillar_size[1], height) <= 0:
        raise ValueError(f"pillar_size and the z extent must be positive, got {pillar_size} and {height}")
    neighbors = bev_neighbors(coords)  # validates coords
    num_pillars = coords.shape[0]
    pillar = point_pillar.long()
    if pillar.numel() and bool((pillar.min() < 0) | (pillar.max() >= num_pillars)):
        raise ValueError(f"point_pillar must index the {num_pillars} rows of coords")

    device = xyz.device
    f64 = torch.float64
    with torch.no_grad():
        size = torch.tensor([pillar_size[0], pillar_size[1], height], dtype=f64, device=device)
        origin = torch.tensor(point_range[:3], dtype=f64, device=device)
        corner = origin + size * torch.cat(
            [coords[:, 1:].to(f64), torch.zeros(num_pillars, 1, dtype=f64, device=device)], dim=1
        )
        local = xyz.to(f64) - corner[pillar]  # point in its pillar's frame, (M, 3)

        top_sum, top_count = _segment_sum(local, pillar, num_pillars)
        top_local = top_sum / top_count.clamp_min(1)[:, None]  # (P, 3), 0 for a pillar without points
        low_centroid, low_occupancy, _, _ = _sub_voxel_centroids(local, pillar, num_pillars, size, low_ratio)
        med_centroid, med_occupancy, med_pillar, med_local = _sub_voxel_centroids(
            local, pillar, num_pillars, size, med_ratio
        )

        # Moments of each pillar's occupied med centroids in its own frame: count n, sum s, second moment Q.
        n = torch.bincount(med_pillar, minlength=num_pillars).to(f64)  # (P,)
        s = local.new_zeros(num_pillars, 3).index_add_(0, med_pillar, med_local)  # (P, 3)
        outer = (med_local[:, :, None] * med_local[:, None, :]).reshape(-1, 9)
        q = local.new_zeros(num_pillars, 9).index_add_(0, med_pillar, outer).view(-1, 3, 3)  # (P, 3, 3)
        # Neighbour q at offset (dx, dy): c − o_p = m + d with d = (dx·sx, dy·sy, 0) − top_local_p, so
        # Σ (m + d)(m + d)ᵀ = Q_q + s_q dᵀ + d s_qᵀ + n_q d dᵀ.
        found = neighbors >= 0
        nbr = neighbors.clamp_min(0)
        weight = found.to(f64)
        offsets = torch.tensor(_BEV_OFFSETS, dtype=f64, device=device) * size[:2]  # (9, 2)
        shift = torch.cat([offsets, torch.zeros(len(_BEV_OFFSETS), 1, dtype=f64, device=device)], dim=1)
        d = shift[None] - top_local[:, None]  # (P, 9, 3)
        n_q, s_q, q_q = n[nbr] * weight, s[nbr] * weight[..., None], q[nbr] * weight[..., None, None]
        cross = s_q[..., :, None] * d[..., None, :]
        scatter = (
            q_q + cross + cross.transpose(-1, -2) + n_q[..., None, None] * d[..., :, None] * d[..., None, :]
        ).sum(dim=1)
        normal, curvature = normals_from_scatter(scatter)
        if normal_sign == "viewpoint":
            normal = orient_normals(normal, corner + top_local, viewpoint, toward=True)
        return PillarTargets(
            top_centroid=(top_local / size).float(),
            med_centroid=med_centroid,
            med_occupancy=med_occupancy,
            low_centroid=low_centroid,
            low_occupancy=low_occupancy,
            normal=normal.float(),
            curvature=curvature.float(),
            normal_points=n_q.sum(dim=1).round().long(),
        )


def patch_targets(
    neighborhoods: Tensor,
    centers: Tensor,
    *,
    sub: int = 4,
    normal_sign: Literal["outward", "none"] = "outward",
) -> PatchTargets:
    """Object-level analogue of GeoMAE's targets for Point-MAE style patches.

    A patch's cell is the axis-aligned cube centred at the patch centre with half-size
    ``r = max |coordinate|`` over the patch's (centre-relative) points, clamped to ``>= 1e-6``; a point maps
    to ``u = (p + r) / (2r)`` ∈ [0, 1]³. ``centroid`` is the mean of ``u``. The cell is split into ``sub``
    sub-cells per axis (indices ``floor(u·sub)`` clamped to ``[0, sub − 1]``, slot ``iz·sub² + iy·sub + ix``);
    each sub-centroid is normalised to its sub-cell, ``mean(u)·sub − index``. Normal and curvature come from
    the scatter matrix of the patch's points about their mean (:func:`scatter_normals`, same eigen rules as
    the pillars); ``"outward"`` flips the normal so that ``normal · (center + mean point) >= 0`` (away from an
    object centred at the origin, as after unit-sphere normalisation), ``"none"`` keeps the ``eigh`` sign.

    Args:
        neighborhoods: Centre-relative points of each patch (``PatchGroups.neighborhoods``).
        centers: Patch centres.
        sub: Sub-cells per axis.
        normal_sign: ``"outward"`` or ``"none"``.

    Returns:
        :class:`PatchTargets`, float32 on the device of ``neighborhoods``.

    Shapes:
        neighborhoods: (B, G, K, 3), centers: (B, G, 3).
        returns: centroid (B, G, 3), sub_centroid (B, G, sub³, 3), sub_occupancy (B, G, sub³),
        normal (B, G, 3), curvature (B, G, 3).

    Raises:
        ValueError: On malformed shapes, ``sub < 1`` or an unknown ``normal_sign``.
    """
    if neighborhoods.dim() != 4 or neighborhoods.shape[-1] != 3 or neighborhoods.shape[2] < 1:
        raise ValueError(
            f"neighborhoods must have shape (B, G, K, 3) with K >= 1, got {tuple(neighborhoods.shape)}"
        )
    if centers.shape != (*neighborhoods.shape[:2], 3):
        raise ValueError(
            f"centers must have shape {(*tuple(neighborhoods.shape[:2]), 3)}, got {tuple(centers.shape)}"
        )
    if isinstance(sub, bool) or not isinstance(sub, int) or sub < 1:
        raise ValueError(f"sub must be a positive int, got {sub!r}")
    if normal_sign not in ("outward", "none"):
        raise ValueError(f"normal_sign must be 'outward' or 'none', got {normal_sign!r}")

    batch, groups, _k, _ = neighborhoods.shape
    with torch.no_grad():
        points = neighborhoods.to(torch.float64)
        half = points.abs().amax(dim=(2, 3)).clamp_min(1e-6)[..., None, None]  # (B, G, 1, 1)
        u = (points + half) / (2 * half)  # (B, G, K, 3)
        slots = sub**3
        idx = (u * sub).floor().long().clamp(0, sub - 1)
        slot = (idx[..., 2] * sub + idx[..., 1]) * sub + idx[..., 0]  # (B, G, K)
        patch = torch.arange(batch * groups, device=u.device).view(batch, groups, 1)
        flat = (patch * slots + slot).reshape(-1)
        total, count = _segment_sum(u.reshape(-1, 3) * sub, flat, batch * groups * slots)
        occupancy = count > 0
        sub_idx = _slot_indices((sub, sub, sub), device=u.device).to(torch.float64)  # (S, 3)
        sub_centroid = total / count.clamp_min(1)[:, None] - sub_idx.repeat(batch * groups, 1)
        sub_centroid = torch.where(occupancy[:, None], sub_centroid, torch.zeros_like(sub_centroid))

        mean = points.mean(dim=2)  # (B, G, 3)
        normal, curvature = scatter_normals(points, None, mean)
        if normal_sign == "outward":
            normal = orient_normals(normal, centers.to(torch.float64) + mean, (0.0, 0.0, 0.0), toward=False)
        return PatchTargets(
            centroid=u.mean(dim=2).float(),
            sub_centroid=sub_centroid.view(batch, groups, slots, 3).float(),
            sub_occupancy=occupancy.view(batch, groups, slots),
            normal=normal.float(),
            curvature=curvature.float(),
        )


def _segment_sum(values: Tensor, index: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """Sum and count of the rows of ``values`` per ``index``: (num, C) in the values' dtype, (num,) long."""
    total = values.new_zeros(num, values.shape[1]).index_add_(0, index, values)
    return total, torch.bincount(index, minlength=num)


def _slot_indices(ratio: tuple[int, int, int], *, device: torch.device) -> Tensor:
    """``(ix, iy, iz)`` of every slot ``iz·ry·rx + iy·rx + ix``, (rx·ry·rz, 3) long."""
    rx, ry, rz = ratio
    slot = torch.arange(rx * ry * rz, device=device)
    return torch.stack([slot % rx, slot // rx % ry, slot // (rx * ry)], dim=1)


def _sub_voxel_centroids(
    local: Tensor, pillar: Tensor, num_pillars: int, size: Tensor, ratio: tuple[int, int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense per-pillar sub-voxel centroids of one level, computed on the occupied slots only.

    Returns the normalised centroids (P, S, 3) float32 (zero where empty), the occupancy (P, S) bool, and for
    the U occupied slots their pillar (U,) long and centroid in the pillar frame (U, 3) float64.
    """
    slots = ratio[0] * ratio[1] * ratio[2]
    r = torch.tensor(ratio, device=local.device)
    sub_size = size / r.to(size.dtype)
    idx = torch.div(local, sub_size, rounding_mode="floor").long()
    idx = torch.minimum(idx.clamp_min(0), r - 1)
    slot = (idx[:, 2] * ratio[1] + idx[:, 1]) * ratio[0] + idx[:, 0]
    keys, inverse = torch.unique(pillar * slots + slot, return_inverse=True)  # occupied (pillar, slot), U
    total, count = _segment_sum(local, inverse, keys.numel())
    mean = total / count[:, None]  # (U, 3), every count >= 1
    key_slot = keys % slots
    sub_min = _slot_indices(ratio, device=local.device).to(size.dtype)[key_slot] * sub_size
    centroid = local.new_zeros(num_pillars * slots, 3, dtype=torch.float32)
    centroid[keys] = ((mean - sub_min) / sub_size).float()
    occupancy = torch.zeros(num_pillars * slots, dtype=torch.bool, device=local.device)
    occupancy[keys] = True
    return centroid.view(num_pillars, slots, 3), occupancy.view(num_pillars, slots), keys // slots, mean
