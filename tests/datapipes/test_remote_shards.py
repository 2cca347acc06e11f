"""Shard folders read from URLs: a real HTTP server (http.server) and a real S3 API server (moto).

The shards are written by ``pcpt-data synth`` into ``tmp_path`` and served from there; every reader must give
what it gives on the local folder, and a changed shard on the server must fail naming its URL.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datapipes.cli import main as data_main
from datapipes.datamodule import PointCloudDataModule
from datapipes.errors import UserError
from datapipes.inspect import format_report, inspect_shards
from datapipes.memory import load_split_arrays
from datapipes.pipeline import make_eval_loader
from datapipes.shards import (
    ShardFormatError,
    check_shard_hashes,
    iter_split_samples,
    manifest_sha256,
    read_manifest,
    shard_locations,
)
from datapipes.shards.remote import CACHE_ENV
from finetune.data import ClassificationDataModule

#: 4 classes x 8 training clouds + 4 x 2 test clouds of 96 points, in shards of 8 (4 train, 1 test).
SYNTH = ["--classes", "4", "--per-class", "8", "--test-per-class", "2", "--points", "96", "--shard-size", "8"]


# ------------------------------------------------------------------------------------------------ servers
class _Server:
    """A threaded HTTP server of one folder that records the paths it was asked for."""

    def __init__(self, folder: Path) -> None:
        requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.requests = requests
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shard folder written by ``pcpt-data synth`` (never changed)."""
    root = tmp_path_factory.mktemp("served") / "demo"
    assert data_main(["synth", str(root), *SYNTH]) == 0
    return root


@pytest.fixture(scope="module")
def http_url(local: Path) -> Iterator[str]:
    """``http://127.0.0.1:<port>/demo``: the local folder served over HTTP."""
    server = _Server(local.parent)
    yield f"{server.url}/demo"
    server.close()


@pytest.fixture
def served_copy(local: Path, tmp_path: Path) -> Iterator[tuple[Path, _Server]]:
    """A copy of the folder that a test may change, served over HTTP: ``(folder, server)``."""
    shutil.copytree(local, tmp_path / "demo")
    server = _Server(tmp_path)
    yield tmp_path / "demo", server
    server.close()


@pytest.fixture(scope="module")
def s3_url(local: Path) -> Iterator[str]:
    """``s3://pcpt/demo`` on a moto S3 server on 127.0.0.1, found through ``AWS_ENDPOINT_URL``."""
    server_module = pytest.importorskip("moto.server", reason="needs moto[server]")
    pytest.importorskip("s3fs", reason="s3:// URLs need s3fs (the remote extra)")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="pcpt")
        for path in sorted(local.iterdir()):
            if path.is_file():
                client.put_object(Bucket="pcpt", Key=f"demo/{path.name}", Body=path.read_bytes())
        yield "s3://pcpt/demo"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(params=["http", "s3"])
def url(request: pytest.FixtureRequest) -> str:
    """The demo folder's URL on each server."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def _tamper(path: Path) -> None:
    """Changes the last byte of the first point array of a shard: it still decodes, only its hash differs."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".xyz.npy"))
    with open(path, "r+b") as f:
        f.seek(member.offset_data + member.size - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_url_gives_the_local_report(local: Path, url: str) -> None:
    remote, here = inspect_shards(url), inspect_shards(local)
    assert remote.ok
    assert here.ok
    assert {**remote.to_json(), "root": None} == {**here.to_json(), "root": None}
    assert remote.root == url
    assert format_report(remote).splitlines()[1:] == format_report(here).splitlines()[1:]
    assert manifest_sha256(url) == hashlib.sha256((local / "manifest.json").read_bytes()).hexdigest()


def test_inspect_cli_reads_a_url(http_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["inspect", http_url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["root"] == http_url
    assert report["splits"] == {"train": {"samples": 32, "shards": 4}, "test": {"samples": 8, "shards": 1}}


def test_inspect_url_reports_what_local_inspect_reports(served_copy: tuple[Path, _Server]) -> None:
    folder, server = served_copy
    _tamper(folder / "train-000001.tar")
    shutil.copy(folder / "train-000000.tar", folder / "train-000007.tar")  # a shard the manifest omits
    (folder / "test-000000.tar").unlink()
    remote = inspect_shards(f"{server.url}/demo")
    assert remote.problems == inspect_shards(folder).problems
    assert sorted(remote.problems) == [
        "split 'test': 0 samples in shards, manifest says 8",
        "test-000000.tar: missing shard",
        "train-000001.tar: sha256 mismatch (the file changed or is damaged)",
        "train-000007.tar: shard file not listed in manifest.json",
    ]
    assert data_main(["inspect", f"{server.url}/demo"]) == 1


# ------------------------------------------------------------------------------------------------ readers
def test_split_samples_are_the_local_ones(local: Path, url: str) -> None:
    for split in ("train", "test"):
        xyz, labels, keys = load_split_arrays(url, split, 64)
        want_xyz, want_labels, want_keys = load_split_arrays(local, split, 64)
        np.testing.assert_array_equal(xyz, want_xyz)
        np.testing.assert_array_equal(labels, want_labels)
        assert keys == want_keys
    remote = list(iter_split_samples(url, "train", fields=["xyz", "normal", "meta"]))
    here = list(iter_split_samples(local, "train", fields=["xyz", "normal", "meta"]))
    assert [s["key"] for s in remote] == [s["key"] for s in here]
    for a, b in zip(remote, here):
        np.testing.assert_array_equal(a["normal"], b["normal"])
        assert a["meta"] == b["meta"]
    assert shard_locations(url, "test") == [f"{url}/test-000000.tar"]
    check_shard_hashes(url, progress=False)


def _batches(loader: Any, count: int) -> list[tuple[torch.Tensor, list[str]]]:
    out = []
    for batch in loader:
        out.append((batch.points, list(batch.key)))
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_datamodule_streams_the_local_batches(
    local: Path, http_url: str, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    options: dict[str, Any] = {"num_points": 64, "batch_size": 4, "num_workers": workers, "seed": 3}
    options["normals"] = True
    remote, here = PointCloudDataModule(http_url, **options), PointCloudDataModule(str(local), **options)
    remote.setup("fit")
    here.setup("fit")
    got, want = _batches(remote.train_dataloader(), 8), _batches(here.train_dataloader(), 8)
    assert len(got) == len(want) == 8
    for (points, keys), (want_points, want_keys) in zip(got, want):
        assert keys == want_keys
        torch.testing.assert_close(points, want_points, rtol=0, atol=0)
    val, want_val = list(remote.val_dataloader()), list(here.val_dataloader())
    assert [b.key for b in val] == [b.key for b in want_val]
    assert all(torch.equal(a.points, b.points) for a, b in zip(val, want_val))
    assert remote.state_dict()["manifest_sha256"] == here.state_dict()["manifest_sha256"]


def test_eval_loader_and_probe_data_module_read_urls(local: Path, url: str) -> None:
    loader = make_eval_loader(shard_locations(url, "train"), batch_size=8)
    want = make_eval_loader(shard_locations(local, "train"), batch_size=8)
    assert [b.key for b in loader] == [b.key for b in want]
    remote = ClassificationDataModule(url, num_points=64, pool_points=96, batch_size=8, verify=True)
    here = ClassificationDataModule(str(local), num_points=64, pool_points=96, batch_size=8)
    remote.setup()
    here.setup()
    assert remote.selection == here.selection
    for name in ("train", "val", "test"):
        a, b = remote._sets[name], here._sets[name]
        assert a.keys == b.keys
        np.testing.assert_array_equal(a.xyz, b.xyz)
        np.testing.assert_array_equal(a.labels, b.labels)


# ------------------------------------------------------------------------------------------------ damage
def test_tampered_shard_fails_naming_its_url(served_copy: tuple[Path, _Server], monkeypatch: Any) -> None:
    folder, server = served_copy
    url = f"{server.url}/demo"
    for index in range(4):
        _tamper(folder / f"train-{index:06d}.tar")
    shard = f"{url}/train-000000.tar"
    differs = f"^{re.escape(shard)}: sha256 .* differs from {re.escape(url)}/manifest\\.json"
    with pytest.raises(ShardFormatError, match=differs):
        load_split_arrays(url, "train", 64)
    with pytest.raises(ShardFormatError, match=f"^{re.escape(shard)}: sha256 differs"):
        check_shard_hashes(url, ["train"], progress=False)
    with pytest.raises(ShardFormatError, match=f"{re.escape(url)}/train-00000[0-3]\\.tar: sha256"):
        next(iter(make_eval_loader(shard_locations(url, "train"), batch_size=4)))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dm = PointCloudDataModule(url, num_points=64, batch_size=4, num_workers=0, val_split=None)
    dm.setup("fit")
    with pytest.raises(ShardFormatError, match=f"{re.escape(url)}/train-00000[0-3]\\.tar: sha256"):
        next(iter(dm.train_dataloader()))
    load_split_arrays(url, "test", 64)  # the untouched split still reads


def test_tampered_shard_in_the_bucket_fails_naming_its_url(local: Path, s3_url: str, tmp_path: Path) -> None:
    import boto3

    shutil.copy(local / "test-000000.tar", tmp_path / "shard.tar")
    _tamper(tmp_path / "shard.tar")
    client = boto3.client("s3")
    for path in local.iterdir():
        if path.is_file():
            client.put_object(Bucket="pcpt", Key=f"changed/{path.name}", Body=path.read_bytes())
    shard = (tmp_path / "shard.tar").read_bytes()
    client.put_object(Bucket="pcpt", Key="changed/test-000000.tar", Body=shard)
    with pytest.raises(ShardFormatError, match=r"^s3://pcpt/changed/test-000000\.tar: sha256"):
        load_split_arrays("s3://pcpt/changed", "test", 64)
    assert inspect_shards("s3://pcpt/changed").problems == [
        "test-000000.tar: sha256 mismatch (the file changed or is damaged)"
    ]


def test_unreachable_missing_and_denied_urls_are_clear(served_copy: tuple[Path, _Server]) -> None:
    folder, server = served_copy
    port = _closed_port()
    with pytest.raises(
        UserError, match=f"^http://127\\.0\\.0\\.1:{port}/demo/manifest\\.json: .* server is unreachable"
    ):
        read_manifest(f"http://127.0.0.1:{port}/demo")
    with pytest.raises(UserError, match=r"manifest\.json: not found, so .*/nope is not a finished pcpt"):
        inspect_shards(f"{server.url}/nope")
    assert data_main(["inspect", f"{server.url}/nope"]) == 2
    (folder / "train-000002.tar").unlink()
    with pytest.raises(UserError, match=f"^{re.escape(server.url)}/demo/train-000002\\.tar: not found"):
        load_split_arrays(f"{server.url}/demo", "train", 64)
    with pytest.raises(ShardFormatError, match=r"train-000002\.tar: not found"):
        check_shard_hashes(f"{server.url}/demo", progress=False)
    with pytest.raises(UserError, match=r"nosuchproto://bucket/demo/manifest\.json: not a URL fsspec"):
        read_manifest("nosuchproto://bucket/demo")


def test_shard_cache_serves_verified_copies(
    served_copy: tuple[Path, _Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, server = served_copy
    url = f"{server.url}/demo"
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    first = load_split_arrays(url, "train", 64)
    shas = read_manifest(folder)["sha256"]
    want = sorted(f"{shas[f'train-{i:06d}.tar']}.tar" for i in range(4))
    assert sorted(p.name for p in cache.iterdir()) == want
    fetched = [p for p in server.requests if p.endswith(".tar")]
    assert len(fetched) == 4
    cached = cache / f"{shas['train-000001.tar']}.tar"
    _tamper(cached)  # a changed cache entry is fetched again
    again = load_split_arrays(url, "train", 64)
    np.testing.assert_array_equal(first[0], again[0])
    assert [p for p in server.requests if p.endswith(".tar")][len(fetched) :] == ["/demo/train-000001.tar"]
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == shas["train-000001.tar"]


# ------------------------------------------------------------------------------------------------ CLI
def test_pretrain_fit_from_an_http_url(local: Path, http_url: str, tmp_path: Path) -> None:
    from pretrain.checkpoint import load_encoder
    from pretrain.cli import main as pretrain_main
    from tests.pretrain.methods.tiny_cli import RUNTIME, config, tiny_encoder

    art = tmp_path / "art"
    status = pretrain_main(
        ["fit", *config("point_mae_tiny.yaml"), *tiny_encoder(num_groups=8, tokenizer_dim=32),
         "--model.init_args.decoder_depth=1", *RUNTIME, f"--data.data_root={http_url}",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", f"--export_dir={art}"]
    )  # fmt: skip
    assert status == 0
    _, meta = load_encoder(art)
    assert meta["provenance"]["step"] == 8  # 32 samples / batch 4
    want = hashlib.sha256((local / "manifest.json").read_bytes()).hexdigest()
    assert meta["provenance"]["data_manifest_sha256"] == want


@pytest.mark.slow
def test_pretrain_fit_from_a_url_trains_the_local_weights(local: Path, http_url: str, tmp_path: Path) -> None:
    from pretrain.checkpoint import load_encoder
    from pretrain.cli import main as pretrain_main
    from tests.pretrain.methods.tiny_cli import RUNTIME, config, tiny_encoder

    weights = []
    for name, root in (("url", http_url), ("local", str(local))):
        status = pretrain_main(
            ["fit", *config("point_mae_tiny.yaml"), *tiny_encoder(num_groups=8, tokenizer_dim=32),
             "--model.init_args.decoder_depth=1", *RUNTIME, f"--data.data_root={root}",
             f"--trainer.default_root_dir={tmp_path / name}", "--trainer.max_epochs=2",
             f"--export_dir={tmp_path / name / 'art'}"]
        )  # fmt: skip
        assert status == 0
        weights.append(load_encoder(tmp_path / name / "art")[0].state_dict())
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("command", ["probe", "fewshot"])
def test_probe_and_fewshot_read_a_url(
    local: Path, url: str, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pcpt-finetune probe/fewshot --data URL`` gives the local folder's numbers on the same encoder."""
    from finetune.cli import main as finetune_main
    from pretrain.checkpoint import save_encoder
    from pretrain.encoders import DataContract, PointViTSpec, build_encoder

    torch.manual_seed(0)
    contract = DataContract(num_points=64, normalization="unit_sphere", fps_order=True)
    art = save_encoder(
        tmp_path / "art",
        build_encoder(PointViTSpec.named("tiny")),
        data=contract,
        provenance={"method": "test"},
    )
    extra = (
        ["--method", "knn"]
        if command == "probe"
        else ["--way", "3", "--shot", "2", "--query", "2", "--folds", "3"]
    )
    reports = []
    for data in (url, str(local)):
        assert finetune_main([command, str(art), "--data", data, *extra, "--no-record", "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    remote, here = reports
    assert remote["data"] == url
    assert here["data"] == str(local)
    for report in reports:
        report.pop("data")
        report.pop("date", None)
    assert remote == here
