"""The IVF near-pair search finds what the exact search finds, and ``pcpt-data dedup --index`` exposes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datapipes import dedup_search
from datapipes.cli import main as pcpt_data
from datapipes.dedup import load_descriptors, shape_descriptor
from datapipes.dedup_search import (
    AUTO_EXACT_MAX,
    default_nlist,
    default_nprobe,
    resolve_index,
    search_near_pairs,
)
from tests.cli_helpers import assert_one_error_line
from tests.datapipes.test_dedup import _copy, _surface, _write

DIM = 3 + 4 * 32
THRESHOLD = 0.006


def _descriptors(size: int, dups: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """``size`` unit descriptors in 20 clumps, ``dups`` of them copies of others moved by 0.1-0.9 x threshold.

    Returns:
        ``((size, DIM) float32, planted pairs {(i, j), i < j})``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, 1.0, (20, DIM))
    desc = centres[rng.integers(0, 20, size)] + rng.normal(scale=0.05, size=(size, DIM))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    copies = rng.choice(size, dups, replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(size), copies), dups, replace=False)
    step = rng.normal(size=(dups, DIM))
    step *= (rng.uniform(0.1, 0.9, dups) * THRESHOLD / np.linalg.norm(step, axis=1))[:, None]
    moved = desc[sources] + step
    desc[copies] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    planted = {(int(min(a, b)), int(max(a, b))) for a, b in zip(sources, copies)}
    return desc.astype(np.float32), planted


def _brute_force(
    queries: np.ndarray, base: np.ndarray | None, threshold: float
) -> dict[tuple[int, int], float]:
    """Every pair within ``threshold`` by numpy in float64: ``{(i, j): distance}`` (one set: ``i < j``)."""
    q = queries.astype(np.float64)
    b = q if base is None else base.astype(np.float64)
    dist2 = (q**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2.0 * q @ b.T
    rows, cols = np.nonzero(dist2 <= (threshold + 1e-4) ** 2)  # candidates; exact distance below
    out = {}
    for i, j in zip(rows.tolist(), cols.tolist()):
        if base is None and j <= i:
            continue
        d = float(np.linalg.norm(q[i] - b[j]))
        if d <= threshold:
            out[(i, j)] = d
    return out


def _as_dict(found: dedup_search.NearPairs) -> dict[tuple[int, int], float]:
    return {(a, b): d for a, b, d in found.as_tuples()}


def test_ivf_finds_the_planted_and_brute_force_pairs() -> None:
    desc, planted = _descriptors(3000, dups=40, seed=0)
    reference = _brute_force(desc, None, THRESHOLD)
    assert planted <= set(reference)
    found = search_near_pairs(desc, threshold=THRESHOLD, index="ivf")
    info = found.info
    assert (info.index, info.nlist, info.nprobe) == (
        "ivf",
        default_nlist(3000),
        default_nprobe(default_nlist(3000)),
    )
    assert info.nprobe is not None
    assert info.nlist is not None
    assert info.nprobe < info.nlist  # not a full scan
    assert info.train_samples == min(3000, dedup_search.TRAIN_PER_LIST * info.nlist)
    assert info.unverified == 0
    assert info.cells_per_query is not None
    assert 1.0 <= info.cells_per_query < info.nprobe
    got = _as_dict(found)
    assert set(got) == set(reference)  # recall 1.0 on the planted pairs and nothing else missed or added
    for pair, d in reference.items():
        assert got[pair] == pytest.approx(d, abs=1e-9)
    assert [d for *_, d in found.as_tuples()] == sorted(got.values())
    exact = search_near_pairs(desc, threshold=THRESHOLD, index="exact")
    assert exact.info.index == "exact"
    assert exact.as_tuples() == found.as_tuples()
    again = search_near_pairs(desc, threshold=THRESHOLD, index="ivf", block=700)
    assert again.as_tuples() == found.as_tuples()  # query blocks change nothing
    assert again.info == info


def test_ivf_against_another_set_matches_brute_force() -> None:
    desc, _ = _descriptors(2400, dups=60, seed=1)
    queries, base = desc[:600], desc[600:]
    reference = _brute_force(queries, base, THRESHOLD)
    assert len(reference) >= 10
    found = search_near_pairs(queries, base, threshold=THRESHOLD, index="ivf", nlist=32)
    assert found.info.unverified == 0
    assert (found.info.queries, found.info.base) == (600, 1800)
    assert set(_as_dict(found)) == set(reference)


def test_unverified_counts_the_queries_that_may_have_missed_a_pair() -> None:
    rng = np.random.default_rng(2)
    desc = rng.normal(size=(1500, 8)).astype(np.float32)  # no clumps: many cells near each point
    threshold = 1.0
    reference = set(_brute_force(desc, None, threshold))
    assert len(reference) > 100
    missed = {}
    for nlist, nprobe in ((32, 1), (32, 4), (32, 32), (16, 16)):
        found = search_near_pairs(desc, threshold=threshold, index="ivf", nlist=nlist, nprobe=nprobe)
        got = set(_as_dict(found))
        assert got <= reference
        missed[nprobe] = len(reference - got)
        if found.info.unverified == 0:  # no unverified query: provably the exact answer
            assert got == reference
        if nprobe == nlist:
            assert found.info.unverified == 0
            assert found.info.cells_per_query is not None
            assert found.info.cells_per_query < nlist  # cells that cannot hold a partner are skipped
    assert missed[1] > missed[4] > 0  # too few probed cells do miss pairs here, and say so
    assert missed[32] == missed[16] == 0


def test_defaults_and_the_auto_cut_over() -> None:
    assert [default_nlist(n) for n in (1, 10, 3000, 10_000, 100_000, 1_000_000)] == [1, 1, 76, 256, 512, 2048]
    assert [default_nprobe(n) for n in (1, 8, 128, 1024, 4096, 1 << 16)] == [1, 8, 16, 16, 64, 128]
    limit = AUTO_EXACT_MAX**2
    assert resolve_index("auto", AUTO_EXACT_MAX, AUTO_EXACT_MAX) == "exact"
    assert resolve_index("auto", AUTO_EXACT_MAX, AUTO_EXACT_MAX + 1) == "ivf"
    assert resolve_index("auto", 1, limit) == "exact"
    assert resolve_index("exact", limit, limit) == "exact"
    assert resolve_index("ivf", 2, 2) == "ivf"


def test_bad_search_arguments_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    desc, _ = _descriptors(100, dups=2, seed=3)
    with pytest.raises(ValueError, match="index must be one of auto, exact, ivf"):
        search_near_pairs(desc, threshold=THRESHOLD, index="hnsw")
    with pytest.raises(ValueError, match=r"nlist \(101\) must be at most the number of base vectors \(100\)"):
        search_near_pairs(desc, threshold=THRESHOLD, index="ivf", nlist=101)
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        search_near_pairs(desc, threshold=THRESHOLD, index="ivf", nprobe=0)
    with pytest.raises(ValueError, match="apply to the ivf index"):
        search_near_pairs(desc, threshold=THRESHOLD, index="exact", nlist=4)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        search_near_pairs(desc, threshold=-0.1)
    with pytest.raises(ValueError, match=r"must be \(M, D\) and \(K, D\)"):
        search_near_pairs(desc, desc[:, :5], threshold=THRESHOLD)
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert dedup_search._gpu_resources() is None
    with pytest.raises(ValueError, match="no GPU"):
        search_near_pairs(desc, threshold=THRESHOLD, index="ivf", gpu=True)
    assert search_near_pairs(desc, threshold=THRESHOLD, index="ivf").info.gpu is False


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """40 clouds: 35 distinct training shapes, 3 test copies of training shapes, 2 new test shapes."""
    rng = np.random.default_rng(4)
    train = {}
    for i in range(35):
        kind = ("ellipsoid", "box", "torus", "cylinder")[i % 4]
        dims = tuple(rng.uniform(0.3, 1.0, 2 if kind in ("torus", "cylinder") else 3))
        train[f"shape_{i}"] = _surface(kind, dims, rng, n=512)
    test = {f"copy_of_{i}": _copy(train[f"shape_{i}"], rng) for i in (3, 17, 30)}
    test.update({f"new_{i}": _surface("ellipsoid", (1.0, 0.9 - 0.3 * i, 0.2), rng, n=512) for i in range(2)})
    clouds = {"train": train, "test": test}
    return _write(tmp_path / "shards", clouds), {k: v for split in clouds.values() for k, v in split.items()}


def test_load_descriptors_reads_every_cloud_in_order(shards: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, clouds = shards
    desc, entries = load_descriptors(root)
    assert desc.shape == (40, DIM)
    assert desc.dtype == np.float32
    assert len(entries) == 40
    assert [e.split for e in entries] == ["test"] * 5 + ["train"] * 35
    for row, entry in zip(desc, entries):
        expected = shape_descriptor(clouds[entry.key].astype(np.float32))
        np.testing.assert_allclose(row, expected, atol=1e-6, err_msg=entry.key)


def test_cli_ivf_reports_the_same_pairs_as_exact(
    shards: tuple[Path, dict[str, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = shards
    reports = {}
    for options in (
        ["--index", "exact"],
        ["--index", "ivf", "--nlist", "4", "--nprobe", "2"],
        ["--nlist", "4"],
    ):
        assert pcpt_data(["dedup", str(root), "--json", "--quiet", *options]) == 0
        reports[" ".join(options)] = json.loads(capsys.readouterr().out)
    exact, ivf, auto = reports.values()
    expected = {("test", f"copy_of_{i}", "train", f"shape_{i}") for i in (3, 17, 30)}
    for report in (exact, ivf, auto):
        got = {(p["a"]["split"], p["a"]["key"], p["b"]["split"], p["b"]["key"]) for p in report["pairs"]}
        assert got == expected
        assert report["counts"] == {"test/train": 3}
    assert ivf["pairs"] == exact["pairs"]
    assert exact["index"] == {**exact["index"], "index": "exact", "queries": 40, "base": 40, "nlist": None}
    assert ivf["index"]["index"] == "ivf"
    assert (ivf["index"]["nlist"], ivf["index"]["nprobe"], ivf["index"]["unverified"]) == (4, 2, 0)
    assert ivf["index"]["train_samples"] == 40
    assert auto["index"] == exact["index"]  # 40 x 40 is far below the cut-over: --nlist unused
    assert pcpt_data(["dedup", str(root), "--quiet", "--index", "ivf", "--nlist", "4"]) == 0
    text = capsys.readouterr().out
    assert "3 pair(s)" in text
    assert "index: ivf (nlist 4, nprobe 4, k-means on 40 clouds" in text
    assert "unverified clouds: 0" in text


def test_cli_bad_index_options(
    shards: tuple[Path, dict[str, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(shards[0])
    with pytest.raises(SystemExit) as exc:
        pcpt_data(["dedup", root, "--index", "hnsw"])
    assert exc.value.code == 2
    assert "argument --index: invalid choice: 'hnsw'" in capsys.readouterr().err
    for bad in (["--nlist", "0"], ["--nprobe", "many"]):
        with pytest.raises(SystemExit) as exc:
            pcpt_data(["dedup", root, *bad])
        assert exc.value.code == 2
        assert f"argument {bad[0]}: expected a positive integer, got '{bad[1]}'" in capsys.readouterr().err
    assert pcpt_data(["dedup", root, "--quiet", "--nlist", "41"]) == 2
    assert_one_error_line("pcpt-data", capsys.readouterr().err, "--nlist 41 is more than the 40 clouds")
    assert pcpt_data(["dedup", root, "--quiet", "--index", "exact", "--nprobe", "4"]) == 2
    assert_one_error_line("pcpt-data", capsys.readouterr().err, "--nlist and --nprobe apply to --index ivf")
    other = _write(
        shards[0].parent / "other", {"val": {"a": _surface("box", (1.0, 1.0, 1.0), np.random.default_rng(5))}}
    )
    assert (
        pcpt_data(["dedup", root, "--against", str(other), "--quiet", "--index", "ivf", "--nlist", "2"]) == 2
    )
    assert_one_error_line(
        "pcpt-data", capsys.readouterr().err, "--nlist 2 is more than the 1 clouds of the --against"
    )
