from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from datapipes.progress import Progress
from finetune import cli
from finetune.embed import embed_clouds
from pretrain import cli as pretrain_cli
from pretrain.checkpoint import load_encoder
from pretrain.ops import normalize_unit_sphere
from tests.cli_helpers import assert_one_error_line, console_script, run_command
from tests.pretrain.encoders import official_reference as ref

_one_error_line = partial(assert_one_error_line, "pcpt-finetune")

TINY = ["--num-heads", "2", "--num-groups", "16", "--group-size", "8", "--num-points", "64"]


def _import(tmp_path: Path, fmt: str, model: torch.nn.Module) -> Path:
    src = tmp_path / f"{fmt}.pth"
    ref.save_official(src, model)
    out = tmp_path / f"{fmt}-art"
    assert pretrain_cli.main(["import", fmt, str(src), str(out), *TINY]) == 0
    return out


def _clouds(tmp_path: Path, batch: int = 5, n: int = 64, seed: int = 0) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    clouds = rng.uniform(-1, 1, size=(batch, n, 3)).astype(np.float32)
    clouds[:, 7] = 0.01  # near the origin: the official FPS never picks it as a centre
    path = tmp_path / "clouds.npy"
    np.save(path, clouds)
    return path, clouds


@pytest.fixture
def finetuned(tmp_path: Path) -> tuple[Path, ref.PointTransformer]:
    model = ref.PointTransformer(32, 2, 2)
    ref.randomize(model).eval()
    return _import(tmp_path, "point-mae", model), model


def test_embed_matches_official_forward(
    tmp_path: Path, finetuned: tuple[Path, ref.PointTransformer], capsys: pytest.CaptureFixture[str]
) -> None:
    art, model = finetuned
    inp, clouds = _clouds(tmp_path)
    out = tmp_path / "features.npz"
    argv = ["embed", str(art), "--input", str(inp), "--out", str(out), "--batch-size", "2", "--json"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shapes"] == {"tokens": [5, 16, 32], "centers": [5, 16, 3], "pooled": [5, 64]}
    assert summary["pooled"] == "concat[cls, max]"
    with np.load(out) as features:
        assert sorted(features.files) == ["centers", "pooled", "tokens"]
        assert all(features[k].dtype == np.float32 for k in features.files)
        neighborhood, center = ref.group_reference(torch.from_numpy(clouds), 16, 8)
        with torch.no_grad():
            all_tokens, concat = model.features(neighborhood, center)
        torch.testing.assert_close(torch.from_numpy(features["centers"]), center)
        torch.testing.assert_close(
            torch.from_numpy(features["tokens"]), all_tokens[:, 1:], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(torch.from_numpy(features["pooled"]), concat, atol=1e-5, rtol=1e-5)


def _embed_quietly(art: Path, inp: Path, out: Path) -> torch.Tensor:
    """Runs ``embed`` and returns the pooled features it wrote."""
    assert cli.main(["embed", str(art), "--input", str(inp), "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        return torch.from_numpy(f["pooled"])


def test_embed_point_bert_and_point_mae_pretraining(tmp_path: Path) -> None:
    inp, clouds = _clouds(tmp_path, batch=3)
    neighborhood, center = ref.group_reference(torch.from_numpy(clouds), 16, 8)

    bert = ref.randomize(ref.PointBERT(32, 2, 2, encoder_dims=16)).eval()
    pooled = _embed_quietly(_import(tmp_path, "point-bert", bert), inp, tmp_path / "b.npz")
    with torch.no_grad():
        expected = bert.transformer_q(neighborhood, center, torch.zeros(3, 16, dtype=torch.bool))
    torch.testing.assert_close(
        pooled, torch.cat([expected[:, 0], expected[:, 1:].amax(1)], -1), atol=1e-5, rtol=1e-5
    )

    mae = ref.randomize(ref.PointMAE(32, 2, 2, group_size=8)).eval()
    pooled = _embed_quietly(_import(tmp_path, "point-mae", mae), inp, tmp_path / "m.npz")
    with torch.no_grad():
        tokens = mae.MAE_encoder(neighborhood, center, torch.zeros(3, 16, dtype=torch.bool))
    with np.load(tmp_path / "m.npz") as f:
        torch.testing.assert_close(torch.from_numpy(f["tokens"]), tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, torch.cat([tokens.amax(1), tokens.mean(1)], -1), atol=1e-5, rtol=1e-5)


def test_single_cloud_float64_and_normalisation(
    tmp_path: Path, finetuned: tuple[Path, ref.PointTransformer]
) -> None:
    art, _ = finetuned
    _, clouds = _clouds(tmp_path, batch=1)
    single = tmp_path / "one.npy"
    np.save(single, clouds[0].astype(np.float64) * 3.0 + 1.0)
    assert (
        cli.main(["embed", str(art), "--input", str(single), "--out", str(tmp_path / "a.npz"), "--quiet"])
        == 0
    )
    with np.load(tmp_path / "a.npz") as f:
        assert f["tokens"].shape == (1, 16, 32)
    argv = ["embed", str(art), "--input", str(single), "--out", str(tmp_path / "n.npz"), "--quiet"]
    assert cli.main([*argv, "--normalize", "unit_sphere"]) == 0
    encoder, _ = load_encoder(art)
    normalized = normalize_unit_sphere(torch.from_numpy(clouds[:1] * 3.0 + 1.0)).numpy()
    expected = embed_clouds(encoder, normalized, progress=False)
    with np.load(tmp_path / "n.npz") as f:
        np.testing.assert_allclose(f["pooled"], expected["pooled"], atol=1e-5)
        radius = np.linalg.norm(f["centers"][0] - normalized[0].mean(0), axis=-1).max()
        assert radius <= 1.0 + 1e-5


def test_progress_bar_for_many_batches(
    tmp_path: Path,
    finetuned: tuple[Path, ref.PointTransformer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    init = Progress.__init__

    def every_update(self: Progress, *args: object, **kwargs: object) -> None:
        init(self, *args, **{**kwargs, "interval": 0.0})  # type: ignore[arg-type]

    monkeypatch.setattr(Progress, "__init__", every_update)  # a line per batch, also when not on a terminal
    art, _ = finetuned
    inp, _ = _clouds(tmp_path, batch=3)
    assert (
        cli.main(
            ["embed", str(art), "--input", str(inp), "--out", str(tmp_path / "f.npz"), "--batch-size", "1"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "embed" in captured.err
    assert "3/3" in captured.err
    assert captured.out.startswith(f"wrote {tmp_path / 'f.npz'}")


def _write_bad_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "ints.npy", np.zeros((2, 64, 3), dtype=np.int64))
    np.save(tmp_path / "flat.npy", np.zeros((2, 64, 2), dtype=np.float32))
    np.save(tmp_path / "few.npy", np.zeros((2, 4, 3), dtype=np.float32))
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "archive.npz", xyz=np.zeros((2, 64, 3), dtype=np.float32))
    nan = np.zeros((2, 64, 3), dtype=np.float32)
    nan[1, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "garbage.npy").write_bytes(b"hello")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--input", "{tmp}/missing.npy"], ["missing.npy", "no such file"]),
        (["--input", "{tmp}/ints.npy"], ["ints.npy", "int64"]),
        (["--input", "{tmp}/flat.npy"], ["flat.npy", "(B, N, 3)"]),
        (["--input", "{tmp}/few.npy"], ["few.npy", "4 points", "at least 16"]),
        (["--input", "{tmp}/objects.npy"], ["objects.npy", "Python objects"]),
        (["--input", "{tmp}/archive.npz"], ["archive.npz", ".npz archive"]),
        (["--input", "{tmp}/garbage.npy"], ["garbage.npy", "not a .npy file"]),
        (["--input", "{tmp}/nan.npy"], ["cloud 1", "non-finite"]),
        (["--input", "{tmp}/flat.npy", "--batch-size", "0"], ["--batch-size"]),
        (["--art", "{tmp}/no-artifact", "--input", "{tmp}/flat.npy"], ["no-artifact", "no such artifact"]),
        (["--input", "{tmp}/flat.npy", "--device", "tpu"], ["--device", "tpu"]),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    finetuned: tuple[Path, ref.PointTransformer],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needles: list[str],
) -> None:
    art, _ = finetuned
    _write_bad_inputs(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] == "--art":
        art, args = Path(args[1]), args[2:]
    capsys.readouterr()
    assert cli.main(["embed", str(art), *args, "--out", str(tmp_path / "out.npz")]) == 2
    _one_error_line(capsys.readouterr().err, *needles)
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_unavailable_is_a_user_error(
    tmp_path: Path, finetuned: tuple[Path, ref.PointTransformer], capsys: pytest.CaptureFixture[str]
) -> None:
    art, _ = finetuned
    inp, _ = _clouds(tmp_path)
    assert (
        cli.main(
            ["embed", str(art), "--input", str(inp), "--out", str(tmp_path / "o.npz"), "--device", "cuda"]
        )
        == 2
    )
    _one_error_line(capsys.readouterr().err, "--device cuda", "CUDA is not available")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["embed", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("tokens", "centers", "pooled", "--batch-size", "--device", "--input", "--out"):
        assert word in text
    assert cli.main(["--help"]) == 0
    assert "embed" in capsys.readouterr().out


def test_console_script(tmp_path: Path, finetuned: tuple[Path, ref.PointTransformer]) -> None:
    exe = console_script("pcpt-finetune")
    art, _ = finetuned
    inp, _ = _clouds(tmp_path, batch=2)
    out = tmp_path / "f.npz"
    done = run_command([exe, "embed", str(art), "--input", str(inp), "--out", str(out), "--quiet"])
    assert done.returncode == 0, done.stderr
    with np.load(out) as f:
        assert f["pooled"].shape == (2, 64)
    bad = run_command([exe, "embed", str(art), "--input", str(tmp_path / "nope.npy"), "--out", str(out)])
    assert bad.returncode == 2
    _one_error_line(bad.stderr, "nope.npy")
