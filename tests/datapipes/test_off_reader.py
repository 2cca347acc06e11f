"""The bulk NumPy OFF parser gives the line-by-line reference reader's arrays and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datapipes.mesh import MeshError, _read_off_fast, _read_off_reference, read_off


def _random_mesh(seed: int, nv: int = 50, nf: int = 80, corners: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vertices = rng.normal(size=(nv, 3)) * 10.0 ** rng.integers(-20, 20, size=(nv, 3))
    faces = np.stack([rng.choice(nv, size=corners, replace=False) for _ in range(nf)])
    return vertices, faces


def _off_text(vertices: np.ndarray, faces: list[list[int]] | np.ndarray, *, quirk: bool = False) -> str:
    header = f"OFF{len(vertices)} {len(faces)} 0\n" if quirk else f"OFF\n{len(vertices)} {len(faces)} 0\n"
    body = "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in vertices.tolist())
    body += "".join(f"{len(f)} {' '.join(str(i) for i in f)}\n" for f in faces)
    return header + body


def _same(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``read_off(path)`` after checking it equals the reference reader's result, dtypes and shapes too."""
    got = read_off(path)
    ref = _read_off_reference(path, path.read_bytes())
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    return got


def _cases() -> dict[str, tuple[str, bool]]:
    """name -> (file text, whether the fast path reads it)."""
    tri_v, tri_f = _random_mesh(0)
    quad_v, quad_f = _random_mesh(1, corners=4)
    hex_v, hex_f = _random_mesh(2, corners=6)
    plain = _off_text(tri_v, tri_f)
    mixed = [list(f[: 3 + i % 3]) for i, f in enumerate(_random_mesh(3, corners=5)[1])]
    header, counts, *rest = plain.split("\n")
    return {
        "triangles": (plain, True),
        "quirk header": (_off_text(tri_v, tri_f, quirk=True), True),
        "quads": (_off_text(quad_v, quad_f), True),
        "hexagons": (_off_text(hex_v, hex_f), True),
        "mixed polygons": (_off_text(hex_v, mixed), False),
        "crlf": (plain.replace("\n", "\r\n"), True),
        "blank lines and tabs": ("\n".join([header, counts, "", *("\t" + r + "  " for r in rest)]), True),
        "trailing lines": (plain + "1 2 3\n4 5\n", True),
        "no final newline": (plain.rstrip("\n"), True),
        "comments": (plain.replace("\n", " # note\n", 5), False),
        "vertex colours": (
            _off_text(tri_v, tri_f).replace("\n", " 255 0 0\n").replace(" 255 0 0", "", 2),
            False,
        ),
        "face colours": (
            "\n".join([header, counts, *(r + " 9 9 9" if r.startswith("3 ") else r for r in rest)]),
            False,
        ),
        "irregular face lines": ("OFF\n3 2 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2 3\n0 1 2\n", False),
        "no faces": ("OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n", True),
        "no vertices": ("OFF\n0 0 0\n", True),
        "signs and zeros": ("OFF\n3 1 0\n+1 -0 007\n1e3 .5 -2.5E-3\n0 1 0\n3 +0 1 002\n", True),
        "nan": ("OFF\n3 1 0\nnan 0 0\n1 0 0\n0 1 0\n3 0 1 2\n", False),
        "lone cr": ("OFF\r3 1 0\r0 0 0\r1 0 0\r0 1 0\r3 0 1 2\r", False),
        "leading blank line": ("\nOFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n", False),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_fast_reader_equals_reference(tmp_path: Path, name: str) -> None:
    text, fast = _cases()[name]
    path = tmp_path / "mesh.off"
    path.write_bytes(text.encode("ascii"))
    assert (_read_off_fast(path.read_bytes()) is not None) == fast
    vertices, faces = _same(path)
    assert vertices.shape[1:] == (3,)
    assert faces.shape[1:] == (3,)


def test_fan_triangulation_of_uniform_polygons(tmp_path: Path) -> None:
    path = tmp_path / "pentagons.off"
    path.write_text("OFF\n6 2 0\n" + "0 0 0\n" * 6 + "5 0 1 2 3 4\n5 5 4 3 2 1\n")
    _, faces = _same(path)
    np.testing.assert_array_equal(faces, [[0, 1, 2], [0, 2, 3], [0, 3, 4], [5, 4, 3], [5, 3, 2], [5, 2, 1]])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "OFF",
        "OFF\n",
        "OFF BINARY\n3 1 0\n",
        "PLY\n3 1 0\n",
        "OFF\nx 1 0\n",
        "OFF\n3\n",
        "OFF\n-3 1 0\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 -1\n",
        "OFF\n3 1 0\n0 0 x\n1 0 0\n0 1 0\n3 0 1 2\n",
        "OFF\n3 1 0\n0 0 1e\n1 0 0\n0 1 0\n3 0 1 2\n",
        "OFF\n3 1 0\n0 0\n1 0 0\n0 1 0\n3 0 1 2\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2.5\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1-2\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n2 0 1\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 99999999999999999999999\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 -9223372036854775809\n",
        "OFF\n3 2 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n4 0 1 2\n",
        "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\xe9\n",
    ],
)
def test_malformed_files_give_the_reference_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.off"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(MeshError) as ref:
        _read_off_reference(path, path.read_bytes())
    with pytest.raises(MeshError) as got:
        read_off(path)
    assert str(got.value) == str(ref.value)
    assert str(ref.value).startswith(f"{path}: ")
