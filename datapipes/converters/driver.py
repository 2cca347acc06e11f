"""The conversion driver: options, planning, sharding, resume and the report (``convert``).

Shard ``i`` of a split holds exactly items ``[i*S, (i+1)*S)`` of the split's (seeded, shuffled) order
(``S = shard_size``) minus the rejected ones, so a re-run recomputes only the shards that are not complete
and verified: nothing is lost or duplicated. The per-item work runs on an engine (local processes or Ray,
see :mod:`datapipes.engines`) and gives the same samples whatever the engine; the report says how many
samples and rejections each node computed. The workers also encode every sample into its tar blocks
(``process_items(..., encode=True)``; the blocks travel as ``bytes``, also through Ray's ``.npz`` results),
so this process only appends them to the shard, hashes and records it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from datapipes.converters.base import Converter, ConvertOptions, Plan, WorkItem, item_rng
from datapipes.converters.images import images_entry, resolve_render_options
from datapipes.converters.process import is_rejection, process_items
from datapipes.engines import Engine, JobResult, ShardJob
from datapipes.errors import UserError
from datapipes.files import printable

if TYPE_CHECKING:  # datapipes.types imports torch, which per-item workers do not need
    from datapipes.shards import ShardSetWriter
    from datapipes.shards.samples import EncodedSample
    from datapipes.types import Rejection

__all__ = ["ConvertReport", "convert", "dumps_report", "resolve_options", "shuffled"]


def resolve_options(converter: Converter, base: ConvertOptions, given: Mapping[str, Any]) -> ConvertOptions:
    """Fills in the format defaults for options the user left unset and checks format-specific ones.

    Args:
        converter: the format.
        base: options with everything but ``points``, ``normalize``, ``fps`` and ``variant`` set.
        given: the command-line values (``None`` = not given) of ``points``, ``normalize``, ``fps``,
            ``variant``, ``test_fraction``, ``points_column``, ``label_column``, ``split_map``,
            ``max_views`` and the image options ``render_views``, ``render_size`` and ``render_up`` (those
            not in ``given`` are taken from ``base``). ``test_fraction`` not given (and 0 in ``base``) is the
            format's :attr:`~Converter.default_test_fraction`.

    Returns:
        The completed options.

    Raises:
        UserError: an option this format does not accept, an unknown variant, or a bad image option (see
            :func:`~datapipes.converters.images.resolve_render_options`).
    """
    for name in ("variant", "test_fraction", "points_column", "label_column", "split_map", "max_views"):
        if given.get(name) not in (None, (), "") and name not in converter.accepts:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} does not apply to format {converter.name!r}")
    variant = given.get("variant")
    if converter.variants:
        variant = variant or converter.variants[0]
        if variant not in converter.variants:
            raise UserError(f"--variant {variant!r} is not one of {', '.join(converter.variants)}")
    test_fraction = base.test_fraction
    if given.get("test_fraction") is None and not test_fraction and "test_fraction" in converter.accepts:
        test_fraction = converter.default_test_fraction
    max_views = given.get("max_views", base.max_views)
    if max_views is not None and int(max_views) < 1:
        raise UserError(f"--max-views must be >= 1, got {max_views}")
    points, normalize, fps = given.get("points"), given.get("normalize"), given.get("fps")
    views, size = given.get("render_views"), given.get("render_size")
    options = replace(
        base,
        points=converter.default_points if points is None else int(points),
        normalize=converter.default_normalize if normalize is None else bool(normalize),
        fps=converter.default_fps if fps is None else bool(fps),
        variant=variant,
        test_fraction=float(test_fraction),
        max_views=None if max_views is None else int(max_views),
        render_views=base.render_views if views is None else int(views),
        render_size=base.render_size if size is None else int(size),
    )
    return resolve_render_options(
        converter, options, size_given=size is not None, up_given=given.get("render_up") or base.render_up
    )


@dataclass
class ConvertReport:
    """Outcome of a conversion (the summary printed by the CLI).

    Attributes:
        format: converter name.
        out: output directory.
        samples: split -> number of samples written.
        classes: class names.
        rejected: number of rejected items (all shards, including resumed ones).
        shards_written: shards computed in this run.
        shards_resumed: complete shards kept from an earlier run.
        elapsed_s: wall-clock seconds.
        empty_classes: classes without any sample in any split (a class folder without input files, or
            whose files were all rejected); they keep their label index.
        nodes: node id -> ``{"address": IP or host name, "samples": n, "rejected": r}``: the samples and
            rejections of the shards written in this run, by the node that computed them (``local`` for
            the local engine; resumed shards are not counted).
    """

    format: str
    out: str
    samples: dict[str, int]
    classes: list[str]
    rejected: int
    shards_written: int
    shards_resumed: int
    elapsed_s: float
    empty_classes: list[str] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        out = asdict(self)
        out["num_classes"] = len(self.classes)
        return out


def shuffled(items: Sequence[WorkItem], seed: int, split: str) -> list[WorkItem]:
    """A seeded permutation of a split's items (depends only on the seed, the split and the item list).

    Args:
        items: the split's items in sorted order.
        seed: base seed.
        split: split name (each split gets its own permutation).

    Returns:
        The items in shuffled order.
    """
    perm = item_rng(seed, f"__order__/{split}").permutation(len(items))
    return [items[i] for i in perm]


def _printable_plan(plan: Plan) -> None:
    """Makes sources and class names valid Unicode (file names need not be UTF-8), in place."""
    plan.classes = [printable(c) for c in plan.classes]
    for items in plan.splits.values():
        for i, item in enumerate(items):
            source, class_name = printable(item.source), printable(item.class_name)
            if source != item.source or class_name != item.class_name:
                items[i] = replace(item, source=source, class_name=class_name)


def _check_plan(plan: Plan) -> None:
    seen: dict[str, str] = {}
    for split, items in plan.splits.items():
        for item in items:
            if item.key in seen:
                raise UserError(
                    f"two source items map to the same sample key {item.key!r}: {seen[item.key]} and "
                    f"{item.source}; rename one of them"
                )
            seen[item.key] = item.source
            if item.split != split:
                raise ValueError(f"item {item.key!r} listed under split {split!r} but says {item.split!r}")


def count_rejected(out: Path) -> int:
    """Number of lines in ``OUT/rejected.jsonl`` (0 when absent)."""
    path = out / "rejected.jsonl"
    if not path.is_file():
        return 0
    with path.open() as fh:
        return sum(1 for line in fh if line.strip())


def convert(
    converter: Converter,
    options: ConvertOptions,
    out: Path,
    engine: Engine,
    *,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    on_shard: Callable[[str, int], None] | None = None,
) -> ConvertReport:
    """Plans, runs and finalises one conversion (resuming complete shards of an earlier identical run).

    Args:
        converter: the format.
        options: resolved options (:func:`resolve_options`).
        out: output directory.
        engine: where the per-item function runs.
        strict: any rejection raises instead of being listed.
        progress: called with the number of items just finished.
        on_total: called once with the number of items still to process.
        on_shard: called after each shard is written, with ``(split, index)``.

    Returns:
        The report (``empty_classes`` lists the classes without any sample).

    Raises:
        UserError: bad source layout, duplicate keys, an output folder that holds files pcpt did not write or
            a run with different options, another conversion writing to the same folder, a rejection under
            ``strict``, or every item rejected (``rejected.jsonl`` then lists the reasons and no manifest is
            written).
    """
    from datapipes.shards import ShardSetWriter

    start = time.perf_counter()
    plan = converter.plan(Path(options.src), options)
    _printable_plan(plan)
    _check_plan(plan)
    options = replace(options, source_normals=plan.source_normals)
    if plan.images is not None:  # the source's own views: every sample stores the count the plan decided
        options = replace(options, max_views=int(plan.images["views"]))
    if options.shuffle:
        plan.splits = {split: shuffled(items, options.seed, split) for split, items in plan.splits.items()}
    if not any(plan.splits.values()):
        raise UserError(f"{options.src}: no {converter.name} input found")
    nodes: dict[str, dict[str, Any]] = {}
    with ShardSetWriter(out, options=options.to_dict()) as writer:
        manifest, written, resumed = _run(
            converter, writer, plan, options, engine, strict, progress, on_total, on_shard, nodes
        )
    samples_per_split = {s: int(v.get("samples", 0)) for s, v in manifest.get("splits", {}).items()}
    totals = {c: sum(int(per.get(c, 0)) for per in manifest.get("counts", {}).values()) for c in plan.classes}
    return ConvertReport(
        format=converter.name,
        out=printable(str(out)),
        samples=samples_per_split,
        classes=list(plan.classes),
        rejected=count_rejected(out),
        shards_written=written,
        shards_resumed=resumed,
        elapsed_s=round(time.perf_counter() - start, 3),
        empty_classes=[c for c in plan.classes if totals[c] == 0],
        nodes=dict(sorted(nodes.items())),
    )


def _count_nodes(nodes: dict[str, dict[str, Any]], done: JobResult) -> None:
    """Adds one job's samples and rejections to the per-node counts, in place."""
    for result, node in zip(done.results, done.nodes, strict=True):
        entry = nodes.setdefault(node.id, {"address": node.address, "samples": 0, "rejected": 0})
        entry["rejected" if is_rejection(result) else "samples"] += 1


def _run(
    converter: Converter,
    writer: ShardSetWriter,
    plan: Plan,
    options: ConvertOptions,
    engine: Engine,
    strict: bool,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
    on_shard: Callable[[str, int], None] | None,
    nodes: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], int, int]:
    """Computes the shards that are not complete and finalises; returns ``(manifest, written, resumed)``.

    ``nodes`` receives the per-node counts of the shards written (see :class:`ConvertReport`).
    """
    size = options.shard_size
    num_shards = {split: math.ceil(len(items) / size) for split, items in plan.splits.items() if items}
    jobs: list[ShardJob] = []
    resumed = 0
    for split in sorted(num_shards):
        items = plan.splits[split]
        for index in range(num_shards[split]):
            if writer.is_complete(split, index):
                resumed += 1
            else:
                jobs.append(ShardJob(split, index, tuple(items[index * size : (index + 1) * size])))
    if on_total is not None:
        on_total(sum(len(job.items) for job in jobs))
    fn = partial(process_items, options=options, encode=True)  # workers encode; this process only writes
    written = 0
    seen: set[tuple[str, int]] = set()
    for done in engine.run(fn, jobs, progress):
        job, results = done.job, done.results
        if (job.split, job.index) in seen:  # engines yield each job once; never write a shard twice
            raise RuntimeError(f"engine returned shard {job.split}-{job.index:06d} twice")
        seen.add((job.split, job.index))
        rejected = [cast("Rejection", r) for r in results if is_rejection(r)]
        if strict and rejected:
            first = rejected[0]
            raise UserError(f"{first['source']}: {first['reason']} (rejected under --strict)")
        samples = [cast("EncodedSample", r) for r in results if not is_rejection(r)]
        writer.write_shard(job.split, job.index, samples, rejected)
        _count_nodes(nodes, done)
        written += 1
        if on_shard is not None:
            on_shard(job.split, job.index)
    extra: dict[str, Any] = {"converter": {"format": converter.name, **plan.info}}
    images = images_entry(converter, options, plan)
    if images is not None:
        extra["images"] = images
    manifest = writer.finalize(
        num_shards=num_shards,
        classes=plan.classes,
        fps_ordered=options.fps,
        extra=extra,
        require_samples=True,
        channels=plan.channels,
    )
    return manifest, written, resumed


def dumps_report(report: ConvertReport) -> str:
    """The ``--json`` summary."""
    return json.dumps(report.to_dict(), indent=2, sort_keys=True)
