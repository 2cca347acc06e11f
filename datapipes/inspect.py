"""Summary and full verification of a shard folder (``pcpt-data inspect``), local or given by URL.

A URL (``https://host/data/demo``, ``s3://bucket/demo``; see :mod:`datapipes.shards.remote`) gives the same
report as the local folder: every shard is downloaded once into a temporary folder, hashed and decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapipes.shards import read_manifest, verify_shards

__all__ = ["InspectReport", "format_report", "inspect_shards", "summarize"]


@dataclass
class InspectReport:
    """What ``pcpt-data inspect`` found.

    Attributes:
        root: the shard folder (a path or a URL).
        summary: see :func:`summarize`.
        problems: one line per problem found by verification (empty when all is good).
        verified: whether every shard was hashed and decoded.
    """

    root: str
    summary: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    verified: bool = False

    @property
    def ok(self) -> bool:
        """True when verification ran and found nothing wrong."""
        return self.verified and not self.problems

    def to_json(self) -> dict[str, Any]:
        """Plain-data form for ``--json``."""
        return {
            "root": self.root,
            "ok": self.ok,
            "verified": self.verified,
            "problems": self.problems,
            **self.summary,
        }


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """The user-facing summary of a manifest: splits, classes, counts, fields, points, FPS order, images.

    ``images`` is the manifest's ``images`` entry (how many views, their size and where they come from:
    ``mesh_render``, ``point_splat`` or ``rendering``), ``None`` when the manifest has none.
    """
    order = {"train": 0, "val": 1, "validation": 1, "test": 2}
    names = sorted(manifest["splits"], key=lambda n: (order.get(n, 3), n))
    splits = {
        name: {
            "samples": int(manifest["splits"][name]["samples"]),
            "shards": len(manifest["splits"][name]["shards"]),
        }
        for name in names
    }
    return {
        "format": manifest["format"],
        "splits": splits,
        "classes": list(manifest.get("classes", [])),
        "counts": manifest.get("counts", {}),
        "fields": manifest.get("fields", {}),
        "points": manifest.get("points", {}),
        "fps_ordered": bool(manifest.get("fps_ordered", False)),
        "rejected": int(manifest.get("rejected", 0)),
        "source": manifest.get("source", {}),
        "images": manifest.get("images"),
        "created_by": manifest.get("created_by"),
    }


def inspect_shards(
    root: str | Path, *, verify: bool = True, on_shard: Callable[[str], None] | None = None
) -> InspectReport:
    """Reads the manifest and (unless ``verify=False``) hashes and decodes every shard against it.

    Args:
        root: the shard folder: a local path or a URL.
        verify: hash and decode every shard.
        on_shard: called with each shard name after it is checked (progress reporting).

    Raises:
        UserError: if the folder or its manifest is missing, unreachable or invalid.
    """
    manifest = read_manifest(root)
    report = InspectReport(root=str(root), summary=summarize(manifest))
    if verify:
        report.problems = verify_shards(root, on_shard=on_shard)
        report.verified = True
    return report


def _fmt_shape(spec: dict[str, Any]) -> str:
    shape = spec.get("shape", [])
    return (
        f"{spec.get('dtype', '?')} ({', '.join(str(d) for d in shape)})" if shape else str(spec.get("dtype"))
    )


_IMAGE_SOURCES = {
    "mesh_render": "rendered from the meshes",
    "point_splat": "splatted from the points",
    "rendering": "the source's own renderings",
}


def _fmt_images(images: dict[str, Any]) -> str:
    """``"24 view(s) per sample, 137x137 px, the source's own renderings (rendering)"``."""
    size = images.get("size")
    if isinstance(size, int):
        pixels = f"{size}x{size} px"
    elif isinstance(size, list) and len(size) == 2:
        pixels = f"{size[1]}x{size[0]} px"
    else:
        pixels = "size unknown"
    source = str(images.get("source"))
    text = f"{images.get('views')} view(s) per sample, {pixels}, {_IMAGE_SOURCES.get(source, source)}"
    camera = images.get("camera") or {}
    if camera:
        text += f" (up {camera.get('up')}, elevation {camera.get('elevation_deg')} deg)"
    return f"{text} [{source}]"


def format_report(report: InspectReport) -> str:
    """Human-readable multi-line summary, ending with the verification verdict."""
    s = report.summary
    lines = [f"{report.root}: {s['format']} ({s.get('created_by') or 'unknown writer'})"]
    for name, info in s["splits"].items():
        lines.append(f"  split {name}: {info['samples']} samples in {info['shards']} shard(s)")
    points = s.get("points") or {}
    lines.append(
        f"  points per cloud: {points.get('min')}..{points.get('max')}, "
        f"stored in FPS order: {'yes' if s['fps_ordered'] else 'no'}"
    )
    lines.append("  fields: " + ", ".join(f"{k} {_fmt_shape(v)}" for k, v in sorted(s["fields"].items())))
    if s.get("images"):
        lines.append(f"  images: {_fmt_images(s['images'])}")
    classes = s["classes"]
    if classes:
        lines.append(f"  classes ({len(classes)}):")
        split_names = [n for n in s["splits"] if n in s["counts"]]
        width = max(len(c) for c in classes)
        lines.append("    " + " " * width + "".join(f"{n:>10}" for n in split_names))
        for c in classes:
            row = "".join(f"{s['counts'][n].get(c, 0):>10}" for n in split_names)
            lines.append(f"    {c:<{width}}{row}")
    lines.append(f"  rejected source items: {s['rejected']}")
    if not report.verified:
        lines.append("not verified (--no-verify)")
    elif report.problems:
        lines.append(f"FAILED: {len(report.problems)} problem(s):")
        lines.extend(f"  {p}" for p in report.problems)
    else:
        lines.append("OK: every shard matches the manifest (sha256, sample counts, decodable members)")
    return "\n".join(lines)
