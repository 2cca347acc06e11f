"""``shapenet-render``: ShapeNet point clouds paired with real rendered images (CrossPoint's ShapeNetRender).

Layout (the release CrossPoint and ViPFormer pre-train on)::

    SRC/ShapeNet/<synset>/<model>.ply                          one point cloud per model (.npy, .pts too)
    SRC/ShapeNetRendering/<synset>/<model>/rendering/*.png     its 3D-R2N2 renderings (24 per model)

One sample per cloud: its points (all of them unless ``--points``; centred and scaled to the unit sphere
and stored in FPS order by default, like every object format), label = index of the synset among the sorted
synset folders of ``SRC/ShapeNet`` (class names are the synset ids), and its renderings as ``img.0.png``,
``img.1.png``, ... in sorted file-name order, as RGB PNGs: an RGB rendering byte for byte, any other
converted like the official ViPFormer/CrossPoint loader's ``Image.open(path).convert("RGB")`` (the
3D-R2N2 renders are 137×137 RGBA PNGs: their alpha channel is dropped) and re-encoded, its sample's
``meta.renderings_converted`` then set to ``"RGB"``.

Views: every sample stores the same number ``V`` of views (the shard format has one view count):
``--max-views`` when given, else the number of renderings most models have (24 for the release). A model
with more keeps its first ``V``; a model with fewer, or none (no ``rendering`` folder or no PNG in it), or
with a rendering that is not a decodable PNG of the same size as its others, is rejected with the reason
in ``rejected.jsonl``.

Split: ``SRC/train.txt`` / ``SRC/test.txt`` when either exists (one model per line, as
``<synset>/<model>``, ``<synset>-<model>`` or ``<model>``, an optional cloud suffix ignored): a listed
model goes to that list's split, unlisted models are left out (their number is the manifest's
``converter.unlisted``), and a listed model without a cloud is rejected. Otherwise a deterministic hash of
the model id: ``<synset>/<model>`` goes to ``test`` when the first 8 bytes of its SHA-256, read as a
fraction of 2**64, are below ``--test-fraction`` (default 0.1; 0 puts everything in ``train``), so the
split depends on the model id alone: not on the seed, on the other models, or on what was added later.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.sources import as_points, check_file, class_dirs, load_npy, make_key, require_dir
from datapipes.errors import UserError
from datapipes.mesh import read_mesh
from datapipes.shards.codecs import PNG_SIGNATURE, encode_png, image_pixels

__all__ = ["CLOUD_SUFFIXES", "ShapeNetRender", "hash_fraction", "read_renderings"]

CLOUD_SUFFIXES = (".ply", ".npy", ".pts")
"""Point-cloud files accepted under ``SRC/ShapeNet/<synset>/``."""
_CLOUDS, _RENDERS, _RENDER_SUB = "ShapeNet", "ShapeNetRendering", "rendering"
_LISTS = {"train": "train.txt", "test": "test.txt"}


def hash_fraction(model_id: str) -> float:
    """The first 8 bytes of ``sha256(model_id)`` as a fraction in ``[0, 1)`` (the hash split's draw)."""
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:8], "big") / 2.0**64


def _png_files(folder: Path) -> list[Path]:
    """The ``.png`` files of a rendering folder, sorted by name (empty when the folder is missing)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:  # one directory read; file types come with the entries
        return sorted(Path(e.path) for e in entries if e.name.lower().endswith(".png") and e.is_file())


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(H, W, 3)`` like Pillow's ``convert("RGB")``: alpha dropped, grey repeated."""
    colour = pixels[:, :, :3] if pixels.shape[2] >= 3 else pixels[:, :, :1]
    return np.ascontiguousarray(np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour)


def read_renderings(folder: Path, views: int | None) -> tuple[list[bytes], list[str], bool]:
    """Reads the first ``views`` renderings of a model (all with ``None``) as RGB PNG bytes.

    A rendering that decodes to RGB is kept byte for byte; any other (RGBA like the 3D-R2N2 renders, grey,
    grey + alpha) is converted the way the official ViPFormer/CrossPoint loader does (Pillow's
    ``convert("RGB")``: alpha dropped, grey repeated) and re-encoded, so every stored view has 3 channels.

    Args:
        folder: the model's ``rendering`` folder.
        views: how many to take.

    Returns:
        ``(PNG bytes, file names, whether any rendering was converted)`` in sorted file-name order.

    Raises:
        Reject: fewer renderings than ``views``, none, or one that is not a decodable PNG of the same size
            as the first.
    """
    files = _png_files(folder)
    where = "/".join(folder.parts[-4:])  # ShapeNetRendering/<synset>/<model>/rendering
    if not files:
        raise Reject(f"no renderings: no .png files in {where}")
    if views is not None:
        if len(files) < views:
            raise Reject(_too_few(len(files), views, where))
        files = files[:views]
    images: list[bytes] = []
    shape: tuple[int, ...] | None = None
    converted = False
    for path in files:
        data = path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            raise Reject(f"rendering {path.name}: not a PNG file")
        try:
            pixels = image_pixels(data)
        except ValueError as err:
            raise Reject(f"rendering {path.name}: {err}") from None
        if shape is None:
            shape = pixels.shape[:2]
        elif pixels.shape[:2] != shape:
            raise Reject(f"rendering {path.name} is {pixels.shape[:2]} pixels, {files[0].name} is {shape}")
        if pixels.shape[2] != 3:
            data, converted = encode_png(_rgb(pixels)), True
        images.append(data)
    return images, [p.name for p in files], converted


def _read_lists(src: Path, synsets: list[str]) -> dict[tuple[str, str], str] | None:
    """``{(synset or "", model): split}`` from ``SRC/{train,test}.txt``, or ``None`` when there are none."""
    paths = {split: src / name for split, name in _LISTS.items() if (src / name).is_file()}
    if not paths:
        return None
    known = set(synsets)
    listed: dict[tuple[str, str], str] = {}
    for split, path in sorted(paths.items()):
        for line in path.read_text(errors="replace").splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            stem = entry[: -len(Path(entry).suffix)] if Path(entry).suffix in CLOUD_SUFFIXES else entry
            parts = stem.replace("\\", "/").split("/")
            if len(parts) >= 2:
                pair = (parts[-2], parts[-1])
            elif "-" in stem and stem.split("-", 1)[0] in known:
                synset, model = stem.split("-", 1)
                pair = (synset, model)
            else:
                pair = ("", stem)
            if listed.get(pair, split) != split:
                raise UserError(f"{path}: model {entry!r} is listed in both train.txt and test.txt")
            listed[pair] = split
    return listed


class ShapeNetRender(Converter):
    """ShapeNet clouds ``ShapeNet/<synset>/<model>.ply`` + renderings ``ShapeNetRendering/.../*.png``.

    See the module docstring for the views, the split and the rejections.
    """

    name = "shapenet-render"
    summary = "ShapeNet/<synset>/<model>.ply + ShapeNetRendering/<synset>/<model>/rendering/*.png (ViPFormer)"
    accepts = frozenset({"test_fraction", "max_views"})
    render_source = None  # the source has its own images
    default_test_fraction = 0.1

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Pairs every cloud with its rendering folder, decides the view count and the split."""
        require_dir(src, f"a ShapeNetRender folder with {_CLOUDS}/ and {_RENDERS}/")
        clouds_root = require_dir(src / _CLOUDS, f"{_CLOUDS}/<synset>/<model>.ply point clouds")
        renders_root = src / _RENDERS
        if not renders_root.is_dir():
            raise UserError(f"{renders_root}: no such folder ({_RENDERS}/<synset>/<model>/rendering/*.png)")
        synsets = class_dirs(clouds_root)
        if not synsets:
            raise UserError(f"{clouds_root}: no synset folders")
        models: list[tuple[str, str, Path]] = []
        for synset in synsets:
            for path in sorted((clouds_root / synset).iterdir()):
                if path.is_file() and path.suffix.lower() in CLOUD_SUFFIXES and not path.name.startswith("."):
                    models.append((synset, path.stem, path))
        if not models:
            raise UserError(f"{clouds_root}: no {'/'.join(CLOUD_SUFFIXES)} clouds under the synset folders")
        counts = {(s, m): len(_png_files(renders_root / s / m / _RENDER_SUB)) for s, m, _ in models}
        views = options.max_views or _most_common(c for c in counts.values() if c)
        lists = _read_lists(src, synsets)
        index = {s: i for i, s in enumerate(synsets)}
        splits: dict[str, list[WorkItem]] = {"train": [], "test": []}
        found: set[tuple[str, str]] = set()
        unlisted = 0
        for synset, model, path in models:
            if lists is None:
                split = "test" if hash_fraction(f"{synset}/{model}") < options.test_fraction else "train"
            else:
                listed = lists.get((synset, model)) or lists.get(("", model))
                if listed is None:
                    unlisted += 1
                    continue
                found.update({(synset, model), ("", model)})
                split = listed
            count = counts[(synset, model)]
            folder = f"{_RENDERS}/{synset}/{model}/{_RENDER_SUB}"
            error = ""
            if count == 0:
                error = f"no renderings: {folder}/*.png not found"
            elif count < views:
                error = _too_few(count, views, folder)
            splits[split].append(
                WorkItem(
                    key=make_key(synset, model),
                    split=split,
                    source=path.relative_to(src).as_posix(),
                    path=str(path),
                    label=index[synset],
                    class_name=synset,
                    error=error,
                )
            )
        for (synset, model), split in sorted((lists or {}).items()):
            if (synset, model) not in found:
                splits[split].append(
                    WorkItem(
                        key=make_key(synset, model),
                        split=split,
                        source=f"{_LISTS[split]}:{synset + '/' if synset else ''}{model}",
                        path="",
                        label=index.get(synset, -1),
                        class_name=synset if synset in index else "",
                        error=f"listed in {_LISTS[split]} but no cloud {_CLOUDS}/*/{model}.ply|.npy|.pts",
                    )
                )
        info: dict[str, Any] = {
            "split": "lists" if lists is not None else "hash",
            "test_fraction": None if lists is not None else options.test_fraction,
            "unlisted": unlisted,
            "renderings_without_cloud": _orphans(renders_root, {(s, m) for s, m, _ in models}),
        }
        images: dict[str, Any] | None = None
        if views:
            images = {
                "views": views,
                "size": _first_size(renders_root, models, counts, views),
                "source": "rendering",
                "format": "png",
                "channels": 3,
                "files": f"{_RENDERS}/*/*/{_RENDER_SUB}/*.png",
            }
        return Plan(
            splits={s: items for s, items in splits.items() if items},
            classes=synsets,
            info=info,
            images=images,
        )

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Loads one cloud and its first ``max_views`` renderings (set by the driver from the plan)."""
        path = Path(item.path)
        check_file(path)
        suffix = path.suffix.lower()
        raw = RawCloud()
        if suffix == ".npy":
            raw.xyz, raw.normal = as_points(load_npy(path))
        elif suffix == ".pts":
            raw.xyz, raw.normal = as_points(_load_pts(path))
        else:
            vertices, faces = read_mesh(path)
            if len(faces):  # a mesh: sampled like the mesh formats
                raw.mesh = (vertices, faces)
            else:
                raw.xyz = vertices
        synset, model = path.parent.name, path.stem
        folder = path.parents[2] / _RENDERS / synset / model / _RENDER_SUB
        raw.images, names, converted = read_renderings(folder, options.max_views)
        raw.meta = {"renderings": f"{_RENDERS}/{synset}/{model}/{_RENDER_SUB}", "rendering_files": names}
        if converted:
            raw.meta["renderings_converted"] = "RGB"  # re-encoded from RGBA / grey, as the official loader
        return raw


def _load_pts(path: Path) -> np.ndarray:
    """A whitespace-separated ``x y z [nx ny nz]`` text file."""
    try:
        return np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise Reject(f"malformed .pts file ({err})") from None


def _most_common(counts: Iterable[int]) -> int:
    """The most frequent rendering count (the larger on a tie); 0 when no model has renderings."""
    tally = Counter(counts)
    if not tally:
        return 0
    top = max(tally.values())
    return max(c for c, n in tally.items() if n == top)


def _first_size(
    root: Path, models: list[tuple[str, str, Path]], counts: dict[tuple[str, str], int], views: int
) -> int | list[int] | None:
    """Pixel size of the first usable model's first rendering: ``S`` if square, else ``[H, W]``."""
    from PIL import Image

    for synset, model, _ in models:
        if counts[(synset, model)] >= views:
            try:
                with Image.open(_png_files(root / synset / model / _RENDER_SUB)[0]) as img:
                    width, height = img.size
            except (OSError, IndexError):
                continue
            return width if width == height else [height, width]
    return None


def _orphans(root: Path, paired: set[tuple[str, str]]) -> int:
    """Number of rendering folders without a cloud."""
    return sum(
        1
        for synset in class_dirs(root)
        for model in class_dirs(root / synset)
        if (synset, model) not in paired
    )


def _too_few(count: int, views: int, folder: str) -> str:
    """The rejection reason of a model with fewer renderings than the views every sample stores."""
    return f"only {count} renderings in {folder}, {views} needed (--max-views {count} stores fewer per model)"
