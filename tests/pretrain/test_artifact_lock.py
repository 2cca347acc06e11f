"""Concurrent updates of one artifact: every recorded evaluation survives, a held lock is waited for."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain import artifact_files
from pretrain.artifact_files import META_FILE, WEIGHTS_FILE, artifact_lock, record_evaluation
from pretrain.artifacts import ArtifactError, read_artifact_meta, save_module_artifact
from pretrain.encoders import DataContract, PointViTSpec, build_encoder
from pretrain.model_card import CARD_FILE

CONTRACT = DataContract(num_points=64, normalization="unit_sphere", fps_order=True)
EXPECTED_FILES = (CARD_FILE, META_FILE, WEIGHTS_FILE)


def _artifact(folder: Path) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    return save_module_artifact(folder, encoder, data=CONTRACT, provenance={"method": "PointMAE"})


def _slow_reads(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Makes every read of ``encoder.json`` linger, so unlocked read-modify-writes would overlap."""
    read = artifact_files.read_artifact_meta

    def slow(*args: Any, **kwargs: Any) -> dict[str, Any]:
        meta = read(*args, **kwargs)
        time.sleep(seconds)
        return meta

    monkeypatch.setattr(artifact_files, "read_artifact_meta", slow)


def test_concurrent_recordings_all_end_up_in_the_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = _artifact(tmp_path / "mae")
    _slow_reads(monkeypatch, 0.15)
    errors: list[BaseException] = []

    def record(i: int) -> None:
        try:
            record_evaluation(art, {"command": "probe", "run": i})
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=record, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    runs = sorted(e["run"] for e in read_artifact_meta(art)["evaluations"])
    assert runs == [0, 1, 2, 3]


def test_recordings_from_two_processes_are_all_kept(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "mae")
    script = (  # every read of encoder.json lingers, as in _slow_reads
        "import sys, time\n"
        "from pretrain import artifact_files\n"
        "read = artifact_files.read_artifact_meta\n"
        "artifact_files.read_artifact_meta = lambda *a, **k: (read(*a, **k), time.sleep(0.05))[0]\n"
        "for i in range(8):\n"
        "    artifact_files.record_evaluation(sys.argv[1], {'writer': sys.argv[2], 'run': i})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(art), name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = read_artifact_meta(art)["evaluations"]
    assert sorted((e["writer"], e["run"]) for e in entries) == [(w, i) for w in "ab" for i in range(8)]


def test_a_held_lock_is_waited_for_then_named_in_the_error(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "mae")
    with (
        artifact_lock(art),
        pytest.raises(ArtifactError, match=r"mae: another process is still updating"),
        artifact_lock(art, timeout=0.2),
    ):
        pass
    with artifact_lock(art, timeout=0.2):  # released: free again
        pass
    assert sorted(p.name for p in art.iterdir()) == sorted(EXPECTED_FILES)  # no lock file left behind
    with pytest.raises(ArtifactError, match="nope: no such artifact directory"):
        record_evaluation(tmp_path / "nope", {"command": "probe"})


def test_an_in_place_save_waits_for_a_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _artifact(tmp_path / "mae")
    _slow_reads(monkeypatch, 0.3)
    recorder = threading.Thread(target=record_evaluation, args=(art, {"command": "probe"}))
    recorder.start()
    time.sleep(0.15)  # the recorder holds the lock, reading
    torch.manual_seed(1)
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    save_module_artifact(art, encoder, data=CONTRACT, provenance={"method": "PointMAE"})
    recorder.join()
    # The save came after the recording: the new weights' metadata has no evaluation of the old ones.
    assert not read_artifact_meta(art).get("evaluations")
