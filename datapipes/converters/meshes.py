"""Mesh sources: ``modelnet-off`` (ModelNet10/40 ``.off`` meshes) and ``mesh-folder`` (any open3d mesh).

Meshes are sampled uniformly on the surface (``--points``, default 8192) with a generator seeded from
``(seed, key)``; normals are the normals of the faces the points lie on. With ``--render-views K``
each sample gets K views ray-cast from its mesh (``mesh_render``, see :mod:`datapipes.converters.images`);
ModelNet meshes stand on the z axis (``--render-up z`` by default), other meshes on y.
"""

from __future__ import annotations

from pathlib import Path

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.sources import check_file, class_split_items, require_dir
from datapipes.mesh import MESH_SUFFIXES, read_mesh, read_off


class ModelNetOff(Converter):
    """ModelNet10/40 meshes ``<class>/{train,test}/*.off``, including the ``OFF1234 5678 0`` header quirk."""

    name = "modelnet-off"
    summary = "ModelNet10/40 meshes <class>/{train,test}/*.off (handles the 'OFF1234 5678 0' header)"
    default_points = 8192
    render_source = "mesh_render"
    render_up = "z"

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Lists the ``.off`` files per split and class."""
        require_dir(src, "a ModelNet folder of <class>/{train,test}/*.off")
        splits, classes = class_split_items(src, (".off",), seed=options.seed)
        return Plan(splits=splits, classes=classes, source_normals=True)

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Parses one OFF mesh."""
        check_file(Path(item.path))
        vertices, faces = read_off(item.path)
        return RawCloud(mesh=(vertices, faces))


class MeshFolder(Converter):
    """Any ``.ply/.obj/.off/.stl`` under class folders, optionally split into ``<class>/{train,test}/``.

    Without split folders everything goes to ``train`` unless ``--test-fraction f`` sends a seeded
    fraction of each class to ``test``. A ``.ply`` with vertices but no faces is used as a point set (its
    ``--render-views`` views are splatted from the points).
    """

    name = "mesh-folder"
    summary = "any .ply/.obj/.off/.stl under <class>/ folders (optionally <class>/{train,test}/)"
    default_points = 8192
    accepts = frozenset({"test_fraction"})
    render_source = "mesh_render"

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Lists the mesh files per split and class."""
        require_dir(src, "a folder of <class>/ mesh folders")
        splits, classes = class_split_items(
            src, MESH_SUFFIXES, test_fraction=options.test_fraction, seed=options.seed
        )
        return Plan(
            splits=splits, classes=classes, source_normals=True, info={"test_fraction": options.test_fraction}
        )

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Reads one mesh (or a point-cloud ``.ply``)."""
        check_file(Path(item.path))
        vertices, faces = read_mesh(item.path)
        if len(faces) == 0:
            if Path(item.path).suffix.lower() != ".ply":
                raise Reject("degenerate mesh: no faces")
            return RawCloud(xyz=vertices, meta={"from": "ply vertices"})
        return RawCloud(mesh=(vertices, faces))
