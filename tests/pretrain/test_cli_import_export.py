from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from pretrain import cli
from pretrain.checkpoint import CKPT_META_KEY, lightning_ckpt_meta, load_encoder, read_artifact_meta
from pretrain.encoders import DataContract, PointViTSpec, build_encoder
from tests.cli_helpers import assert_one_error_line, console_script, run_command
from tests.pretrain.encoders import official_reference as ref

_one_error_line = partial(assert_one_error_line, "pcpt-pretrain")

TINY = ["--num-heads", "2", "--num-groups", "16", "--group-size", "8", "--num-points", "64"]


@pytest.fixture
def official_mae(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = ref.randomize(ref.PointTransformer(32, 2, 2)).eval()
    path = tmp_path / "ckpt-best.pth"
    ref.save_official(path, model)
    return path, model


def test_import_then_compare_with_official(
    tmp_path: Path,
    official_mae: tuple[Path, torch.nn.Module],
    gen: torch.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, model = official_mae
    out = tmp_path / "art"
    assert cli.main(["import", "point-mae", str(src), str(out), *TINY, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["artifact"] == str(out)
    assert summary["layout"] == "point-mae finetuned classifier"
    assert summary["spec"]["cls_token"] is True
    enc, meta = load_encoder(out)
    assert meta["data_contract"]["num_points"] == 64
    enc.eval()
    neighborhood, center = ref.group_reference(torch.rand(2, 64, 3, generator=gen) * 2 - 1, 16, 8)
    _, expected = model.features(neighborhood, center)  # type: ignore[operator]
    torch.testing.assert_close(enc.pool(enc(enc.embed(neighborhood), center)), expected, atol=1e-5, rtol=1e-5)


def test_import_plain_output(
    tmp_path: Path, official_mae: tuple[Path, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = official_mae
    assert cli.main(["import", "point-mae", str(src), str(tmp_path / "art"), *TINY]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {tmp_path / 'art'}: point_vit 32x2 (2 heads), 16 groups of 8")


def test_export_lightning_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enc = build_encoder(PointViTSpec.named("tiny"))
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()},
        CKPT_META_KEY: lightning_ckpt_meta(
            method="PointMAE", module=enc, prefix="encoder.", data_contract=DataContract()
        ),
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert cli.main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "art"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["provenance"]["step"] == 10
    assert read_artifact_meta(tmp_path / "art")["provenance"]["method"] == "PointMAE"


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (
            ["import", "point-mae", "{tmp}/missing.pth", "{tmp}/art"],
            ["missing.pth", "no such checkpoint file"],
        ),
        (["import", "point-xyz", "{src}", "{tmp}/art"], ["FORMAT", "point-xyz"]),
        (["import", "point-bert", "{pre}", "{tmp}/art"], ["pre.pth", "not a Point-BERT checkpoint"]),
        (
            ["import", "point-mae", "{src}", "{tmp}/art", "--num-heads", "0"],
            ["--num-heads", "positive integer"],
        ),
        (["import", "point-mae", "{src}", "{tmp}/art", "--num-heads", "5"], ["num_heads=5"]),
        (["import", "point-mae", "{src}"], ["OUT"]),
        (["export", "{tmp}/nope.ckpt", "{tmp}/art"], ["nope.ckpt", "no such checkpoint"]),
        (["export", "{src}", "{tmp}/art"], ["not a pcpt Lightning checkpoint"]),
        (["frobnicate"], ["frobnicate"]),
        ([], ["COMMAND"]),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    official_mae: tuple[Path, torch.nn.Module],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    needles: list[str],
) -> None:
    src, _ = official_mae
    ref.save_official(tmp_path / "pre.pth", ref.PointMAE(32, 1, 2, group_size=8))
    args = [a.format(tmp=tmp_path, src=src, pre=tmp_path / "pre.pth") for a in argv]
    assert cli.main(args) == 2
    _one_error_line(capsys.readouterr().err, *needles)
    assert not (tmp_path / "art").exists()


def test_weights_mismatch_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = ref.PointMAE(32, 1, 2, group_size=8)
    src = tmp_path / "official.pth"
    ref.save_official(src, model)
    state = torch.load(src, weights_only=True)
    del state["base_model"]["module.MAE_encoder.pos_embed.2.bias"]
    torch.save(state, src)
    assert cli.main(["import", "point-mae", str(src), str(tmp_path / "art"), *TINY]) == 2
    _one_error_line(capsys.readouterr().err, "pos_embed.2.bias", str(src))


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "import" in capsys.readouterr().out
    assert cli.main(["import", "--help"]) == 0
    text = capsys.readouterr().out
    for option in (
        "point-bert",
        "point-mae",
        "--num-groups",
        "--num-heads",
        "--group-size",
        "--num-points",
        "--json",
    ):
        assert option in text
    assert cli.main(["export", "--help"]) == 0
    assert "CKPT" in capsys.readouterr().out


def test_passthrough_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fit(rest: list[str]) -> int:
        seen.append(rest)
        return 7

    monkeypatch.setitem(cli.PASSTHROUGH, "fit", fit)
    assert cli.main(["fit", "-c", "x.yaml", "--trainer.max_steps=2"]) == 7
    assert seen == [["-c", "x.yaml", "--trainer.max_steps=2"]]


def test_console_script_import_and_error(tmp_path: Path, official_mae: tuple[Path, torch.nn.Module]) -> None:
    src, _ = official_mae
    exe = console_script("pcpt-pretrain")
    done = run_command([exe, "import", "point-mae", str(src), str(tmp_path / "art"), *TINY, "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["spec"]["embed_dim"] == 32
    bad = run_command([exe, "import", "point-mae", str(tmp_path / "missing.pth"), str(tmp_path / "art2")])
    assert bad.returncode == 2
    _one_error_line(bad.stderr, "missing.pth")
