"""Mesh and point-set geometry for the converters: reading meshes, surface sampling, normals and curvature.

Meshes are read with open3d (``.ply``, ``.obj``, ``.stl``) or with :func:`read_off`, a strict OFF reader that
also accepts the ModelNet header quirk ``OFF1234 5678 0`` (counts on the header line), which open3d rejects.
Surface sampling uses an explicit :class:`numpy.random.Generator`, so a converter that seeds it from the
sample key gets the same points on every worker and engine. open3d is imported lazily, inside the functions
that need it.

Every reader raises :class:`MeshError` (a ``ValueError``) whose message names the file and the problem;
converters turn it into a rejection.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

MESH_SUFFIXES = (".off", ".ply", ".obj", ".stl")
"""File suffixes :func:`read_mesh` understands."""

Orientation = Literal["consistent", "outward", "viewpoint", "none"]


class MeshError(ValueError):
    """A mesh or point file that cannot be used; the message names the file and the problem."""


def _open3d() -> Any:
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    return o3d


def _parse_counts(line: str, path: Path) -> tuple[int, int]:
    tokens = line.split()
    if len(tokens) < 2:
        raise MeshError(f"{path}: OFF counts line {line!r} needs 'vertices faces [edges]'")
    try:
        nv, nf = int(tokens[0]), int(tokens[1])
    except ValueError:
        raise MeshError(f"{path}: OFF counts line {line!r} is not integers") from None
    if nv < 0 or nf < 0:
        raise MeshError(f"{path}: OFF counts line {line!r} has negative counts")
    return nv, nf


def _parse_vertices(lines: Sequence[str], path: Path) -> np.ndarray:
    try:
        flat = np.array(" ".join(lines).split(), dtype=np.float64)
        if flat.size == 3 * len(lines):
            return flat.reshape(-1, 3)
        rows = [ln.split() for ln in lines]
        if any(len(r) < 3 for r in rows):
            raise MeshError(f"{path}: an OFF vertex line has fewer than 3 coordinates")
        return np.array([r[:3] for r in rows], dtype=np.float64).reshape(-1, 3)
    except ValueError as err:
        if isinstance(err, MeshError):
            raise
        raise MeshError(f"{path}: OFF vertex coordinates are not numbers ({err})") from None


def _parse_faces(lines: Sequence[str], path: Path) -> np.ndarray:
    try:
        flat = np.array(" ".join(lines).split(), dtype=np.int64)
        if flat.size == 4 * len(lines):
            table = flat.reshape(-1, 4)
            if np.all(table[:, 0] == 3):
                return table[:, 1:].copy()
        triangles: list[list[int]] = []
        for ln in lines:
            tokens = [int(t) for t in ln.split()]
            if not tokens or tokens[0] < 3 or len(tokens) < 1 + tokens[0]:
                raise MeshError(f"{path}: malformed OFF face line {ln!r}")
            poly = tokens[1 : 1 + tokens[0]]
            triangles.extend([poly[0], poly[i], poly[i + 1]] for i in range(1, len(poly) - 1))
        return np.array(triangles, dtype=np.int64).reshape(-1, 3)
    except (ValueError, OverflowError) as err:
        if isinstance(err, MeshError):
            raise
        raise MeshError(f"{path}: OFF face indices are not integers in range ({err})") from None


def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads an ASCII OFF mesh, including ModelNet's ``OFF1234 5678 0`` header quirk.

    Polygons with more than three corners are fan-triangulated; ``#`` comments and blank lines are ignored;
    extra columns after the coordinates (colours) are ignored.

    Plain files (no comments, every face with the same number of corners, nothing but numbers) are parsed
    in bulk with NumPy (:func:`_read_off_fast`); any other file, and every malformed one, goes through the
    line-by-line reader (:func:`_read_off_reference`), so results and error messages do not depend on the
    path taken.

    Args:
        path: the ``.off`` file.

    Returns:
        ``(vertices, faces)``: float64 ``(V, 3)`` and int64 ``(F, 3)`` vertex indices.

    Raises:
        MeshError: empty, binary, truncated or malformed file, or face indices out of range.
    """
    path = Path(path)
    data = path.read_bytes()
    fast = _read_off_fast(data)
    return fast if fast is not None else _read_off_reference(path, data)


_OFF_NUMBER_BYTES = b"0123456789eE+-. \t\n"
_OFF_INDEX_BYTES = b"0123456789+- \t\n"


def _read_off_fast(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    r"""Bulk NumPy parse of a plain, well-formed OFF file; ``None`` for anything else.

    Handles files whose first line starts with ``OFF`` (counts on that line or the next one) and whose body
    holds only numbers, spaces, tabs and line ends (``\r\n`` too): no comments, no ``nan``/``inf``,
    blank lines allowed. The vertex block must hold exactly three numbers per vertex in all and the faces
    the same corner count each, with exactly that many indices per line and all in range. Whatever does not
    fit (extra columns, mixed polygons, comments, every error) returns ``None`` and is left to
    :func:`_read_off_reference`, which then gives the result or the error message; when this returns, its
    arrays equal the reference reader's.
    """
    if not data.startswith(b"OFF"):
        return None
    end = data.find(b"\n")
    if end < 0:
        return None
    header, body = data[:end], data[end + 1 :]
    if b"#" in header:
        return None
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n")
        if b"\r" in body:  # a lone carriage return is a line break for the reference reader
            return None
    try:
        rest = header.decode("ascii")[3:].strip()
    except UnicodeDecodeError:
        return None
    if not rest:  # the counts are on the next line
        end = body.find(b"\n")
        counts_line, body = (body, b"") if end < 0 else (body[:end], body[end + 1 :])
        if b"#" in counts_line:
            return None
        try:
            rest = counts_line.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        if not rest:
            return None
    try:
        nv, nf = _parse_counts(rest, Path())
    except MeshError:
        return None
    if body.translate(None, _OFF_NUMBER_BYTES):
        return None
    raw = np.frombuffer(body, dtype=np.uint8)
    breaks = np.flatnonzero(raw == ord("\n"))
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(raw)]))
    filled = raw > ord(" ")  # the body holds only number characters, spaces, tabs and line ends
    first = np.flatnonzero(filled[1:] & ~filled[:-1]) + 1  # where tokens start (after the first byte)
    token_starts = np.concatenate(([0], first)) if filled.size and filled[0] else first
    tokens = np.searchsorted(token_starts, ends) - np.searchsorted(token_starts, starts)  # per line
    lines = np.flatnonzero(tokens)  # the non-blank lines
    if len(lines) < nv + nf:
        return None
    if nv:
        block = body[starts[lines[0]] : ends[lines[nv - 1]]].decode("ascii").split()
        if len(block) != 3 * nv:
            return None
        try:
            vertices = np.array(block, dtype=np.float64).reshape(-1, 3)
        except ValueError:
            return None
    else:
        vertices = np.zeros((0, 3), dtype=np.float64)
    if not nf:
        return vertices, np.zeros((0, 3), dtype=np.int64)
    face_lines = lines[nv : nv + nf]
    block_bytes = body[starts[face_lines[0]] : ends[face_lines[-1]]]
    if block_bytes.translate(None, _OFF_INDEX_BYTES):
        return None
    try:
        flat = np.fromstring(block_bytes.decode("ascii"), dtype=np.int64, sep=" ")  # type: ignore[call-overload]
    except ValueError:  # a token that is not an integer
        return None
    corners = int(flat[0]) if flat.size else 0
    width = corners + 1
    if corners < 3 or flat.size != width * nf or np.any(tokens[face_lines] != width):
        return None
    table = flat.reshape(nf, width)
    if np.any(table[:, 0] != corners):
        return None
    poly = table[:, 1:]
    if poly.min() < 0 or poly.max() >= nv:  # also what an out-of-range (clamped) token becomes
        return None
    if corners == 3:
        return vertices, poly.copy()
    fans = np.empty((nf, corners - 2, 3), dtype=np.int64)
    fans[:, :, 0] = poly[:, :1]
    fans[:, :, 1] = poly[:, 1:-1]
    fans[:, :, 2] = poly[:, 2:]
    return vertices, fans.reshape(-1, 3)


def _read_off_reference(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The line-by-line OFF reader (see :func:`read_off`): every file, every error message.

    Args:
        path: the file (named in error messages).
        data: its bytes.

    Returns:
        ``(vertices, faces)`` as :func:`read_off`.

    Raises:
        MeshError: empty, binary, truncated or malformed file, or face indices out of range.
    """
    if not data:
        raise MeshError(f"{path}: empty file (0 bytes)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MeshError(f"{path}: not an ASCII OFF file (binary or garbage bytes)") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("OFF"):
        raise MeshError(f"{path}: missing 'OFF' header")
    rest = lines[0][3:].strip()
    if rest.upper().startswith("BINARY"):
        raise MeshError(f"{path}: binary OFF is not supported")
    if rest:  # ModelNet quirk: 'OFF1234 5678 0'
        counts, body = rest, lines[1:]
    elif len(lines) > 1:
        counts, body = lines[1], lines[2:]
    else:
        raise MeshError(f"{path}: truncated OFF file: no counts line")
    nv, nf = _parse_counts(counts, path)
    if len(body) < nv + nf:
        raise MeshError(
            f"{path}: truncated OFF file: header promises {nv} vertices and {nf} faces, "
            f"found {len(body)} data lines"
        )
    vertices = _parse_vertices(body[:nv], path)
    faces = _parse_faces(body[nv : nv + nf], path) if nf else np.zeros((0, 3), dtype=np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= nv):
        raise MeshError(f"{path}: face index out of range [0, {nv})")
    return vertices, faces


def _check_magic(path: Path, data_head: bytes) -> None:
    suffix = path.suffix.lower()
    if suffix == ".ply" and not data_head.startswith(b"ply"):
        raise MeshError(f"{path}: not a PLY file (missing 'ply' magic)")


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a triangle mesh from ``.off`` (:func:`read_off`), ``.ply``, ``.obj`` or ``.stl`` (open3d).

    A file with vertices but no faces (a point-cloud ``.ply``) returns an empty ``(0, 3)`` face array; the
    caller decides whether the vertices are usable as a point set.

    Args:
        path: the mesh file.

    Returns:
        ``(vertices, faces)``: float64 ``(V, 3)`` and int64 ``(F, 3)``.

    Raises:
        MeshError: unknown suffix, missing, empty or unreadable file, or no vertices.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshError(f"{path}: unsupported mesh suffix {suffix!r}; expected one of {MESH_SUFFIXES}")
    if not path.is_file():
        raise MeshError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MeshError(f"{path}: empty file (0 bytes)")
    if suffix == ".off":
        return read_off(path)
    with path.open("rb") as fh:
        _check_magic(path, fh.read(16))
    o3d = _open3d()
    mesh = o3d.io.read_triangle_mesh(str(path))
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.triangles, dtype=np.int64).reshape(-1, 3)
    if len(vertices) == 0:
        if suffix == ".ply":  # a point-cloud PLY without faces is read as a point cloud
            pcd = o3d.io.read_point_cloud(str(path))
            vertices = np.asarray(pcd.points, dtype=np.float64).reshape(-1, 3)
        if len(vertices) == 0:
            raise MeshError(f"{path}: open3d read no vertices (unreadable or empty {suffix} file)")
    return vertices, faces


def sample_surface(
    vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``n`` points uniformly on a triangle mesh surface, with the normal of the face each lies on.

    A triangle is picked with probability proportional to its area, then a uniform point inside it
    (``sqrt`` barycentric trick). Zero-area triangles are never picked.

    Args:
        vertices: ``(V, 3)`` coordinates.
        faces: ``(F, 3)`` vertex indices.
        n: number of points, ``>= 1``.
        rng: the only source of randomness.

    Returns:
        ``(xyz, normal)``: float32 ``(n, 3)`` points and unit face normals (winding order of the file).

    Raises:
        ValueError: ``n < 1``, no faces, non-finite vertices, or zero or overflowing total area.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise ValueError("mesh has no faces")
    if not np.isfinite(vertices).all():
        raise ValueError("mesh has non-finite vertex coordinates (NaN/inf)")
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    cumulative = np.cumsum(double_area)
    total = float(cumulative[-1])
    if not total > 0.0:
        raise ValueError("degenerate mesh: zero surface area")
    if not np.isfinite(total):
        raise ValueError("mesh surface area overflows float64 (vertex coordinates too large)")
    picked = np.searchsorted(cumulative, rng.random(n) * total, side="right")
    picked = np.minimum(picked, len(faces) - 1)
    u, v = rng.random(n), rng.random(n)
    su = np.sqrt(u)
    w0, w1, w2 = 1.0 - su, su * (1.0 - v), su * v
    t = tri[picked]
    xyz = w0[:, None] * t[:, 0] + w1[:, None] * t[:, 1] + w2[:, None] * t[:, 2]
    normal = cross[picked] / double_area[picked, None]
    return xyz.astype(np.float32), normal.astype(np.float32)


def estimate_normals_curvature(
    xyz: np.ndarray,
    *,
    k: int = 16,
    orient: Orientation = "consistent",
    viewpoint: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Estimates unit normals and curvature (surface variation) from each point's ``k`` nearest neighbours.

    The normal is the eigenvector of the smallest eigenvalue of the neighbourhood covariance (the point itself
    included) and the curvature is ``λ_min / (λ_0 + λ_1 + λ_2)`` in ``[0, 1/3]`` (0 on a plane). The
    consistent orientation is hand-written on numpy/scipy (:mod:`datapipes.normals`) because open3d's
    ``orient_normals_consistent_tangent_plane`` (its MST propagation) took about 85 % of the time of an
    8192-point cloud; its scipy kNN query then also gives the covariances. The other orientations use
    open3d's kNN covariances, which are faster when no neighbour graph is needed. Both give the same
    covariances (up to the order of equidistant neighbours).

    Orientation:
        ``consistent``: propagated along a minimum spanning tree of the kNN graph weighted by
        ``1 - |n_i . n_j|`` (the tangent-plane rule of open3d's ``orient_normals_consistent_tangent_plane``)
        so that neighbours agree; each connected component of the graph is then flipped as a whole to point
        away from the centroid on average (objects), and so is the whole cloud. With ``N <= k`` it is
        ``outward``;
        ``outward``: each normal points away from the centroid;
        ``viewpoint``: each normal points towards ``viewpoint`` (LiDAR: the sensor at the origin);
        ``none``: the raw eigenvector sign.

    Args:
        xyz: ``(N, 3)`` finite points, ``N >= 3``.
        k: neighbourhood size (clamped to ``N``).
        orient: orientation rule (above).
        viewpoint: sensor position for ``orient="viewpoint"``.

    Returns:
        ``(normal, curv)``: float32 ``(N, 3)`` and float32 ``(N,)``.

    Raises:
        ValueError: wrong shape, fewer than 3 points, ``k < 3`` or an unknown ``orient``.
    """
    pts = np.asarray(xyz, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {pts.shape}")
    if len(pts) < 3:
        raise ValueError(f"need at least 3 points to estimate normals, got {len(pts)}")
    if k < 3:
        raise ValueError(f"k must be >= 3, got {k}")
    if orient not in ("consistent", "outward", "viewpoint", "none"):
        raise ValueError(f"orient must be consistent|outward|viewpoint|none, got {orient!r}")
    k = min(k, len(pts))
    graph = orient == "consistent" and len(pts) > k
    if graph:  # the kNN indices serve both the covariances and the orientation graph
        from datapipes.normals import knn_covariances, knn_indices, orient_consistent

        idx = knn_indices(pts, k)
        cov = knn_covariances(pts, idx)
    else:  # open3d's kNN covariances are faster when no neighbour graph is needed
        o3d = _open3d()
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
        pcd.estimate_covariances(o3d.geometry.KDTreeSearchParamKNN(knn=k))
        cov = np.asarray(pcd.covariances, dtype=np.float64)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending eigenvalues
    normal = eigvec[:, :, 0]
    total = eigval.sum(axis=1)
    curv = np.divide(np.clip(eigval[:, 0], 0.0, None), total, out=np.zeros(len(pts)), where=total > 1e-300)
    centroid = pts.mean(axis=0)
    if graph:
        normal = orient_consistent(pts, normal, idx)
        if float(np.einsum("ij,ij->", normal, pts - centroid)) < 0.0:
            normal = -normal
    elif orient in ("outward", "consistent"):
        flip = np.einsum("ij,ij->i", normal, pts - centroid) < 0.0
        normal = np.where(flip[:, None], -normal, normal)
    elif orient == "viewpoint":
        view = np.asarray(viewpoint, dtype=np.float64).reshape(3)
        flip = np.einsum("ij,ij->i", normal, view - pts) < 0.0
        normal = np.where(flip[:, None], -normal, normal)
    return normal.astype(np.float32), curv.astype(np.float32)
