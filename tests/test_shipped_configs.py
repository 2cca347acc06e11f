"""Every shipped YAML config parses against the current signatures (a renamed argument breaks this test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main
from tests.cli_helpers import REPO

PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
TRAINER = sorted((REPO / "configs" / "trainer").glob("*.yaml"))


def _print_config(main: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)  # type: ignore[operator]
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("config", PRETRAIN, ids=lambda p: p.name)
def test_pretrain_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _print_config(pretrain_main, ["fit", "-c", str(config), "--print_config"], capsys)
    assert "class_path: pretrain.methods." in out


@pytest.mark.parametrize("trainer", TRAINER, ids=lambda p: p.name)
def test_trainer_config_combines_with_a_method(trainer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    method = REPO / "configs" / "pretrain" / "point_mae.yaml"
    out = _print_config(
        pretrain_main, ["fit", "-c", str(method), "-c", str(trainer), "--print_config"], capsys
    )
    assert "PointMAE" in out


def test_finetune_config_parses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from datapipes.synthetic import write_synthetic

    write_synthetic(tmp_path, classes=2, per_class=2, test_per_class=1, points=32, shard_size=4)
    argv = ["fit", "-c", str(REPO / "configs" / "finetune" / "classify.yaml"), f"--data.data_root={tmp_path}",
            "--print_config"]  # fmt: skip
    assert "vote_views" in _print_config(finetune_main, argv, capsys)
