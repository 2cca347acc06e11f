"""Every shipped YAML config builds its model, data module and trainer with the current code.

Parsing alone would miss a value the constructors refuse (a mask ratio that masks no patch, heads that do not
divide the width, a tokenizer whose grouping differs from the encoder's), so each config is instantiated on
small demo shards; nothing is trained. Point-BERT's masked-modelling configs get the dVAE tokenizer their
stage-1 config builds, exported as an artifact: the two stages must fit together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from datapipes.synthetic import write_synthetic
from finetune.lightning_cli import CLI_KWARGS as FINETUNE_KWARGS
from finetune.lightning_cli import FinetuneCLI
from pretrain.lightning_cli import CLI_KWARGS as PRETRAIN_KWARGS
from pretrain.lightning_cli import PretrainCLI
from pretrain.methods.base import PretrainModule
from tests.cli_helpers import REPO

PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
TRAINER = sorted((REPO / "configs" / "trainer").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough points for every shipped config (up to 2048 points: ViPFormer's ShapeNetRender clouds)."""
    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root, classes=2, per_class=2, test_per_class=1, points=2048, shard_size=4)
    return root


def _cpu(extra: list[str]) -> list[str]:
    return [*extra, "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false"]


def _pretrain(args: list[str], root: Path) -> PretrainCLI:
    argv = _cpu([*args, f"--data.data_root={root}", "--data.num_workers=0"])
    return PretrainCLI(args=argv, run=False, **PRETRAIN_KWARGS)


def _stage_one(config: Path) -> Path | None:
    if not config.name.startswith("point_bert") or "dvae" in config.name:
        return None
    return config.with_name(config.name.replace("point_bert", "point_bert_dvae", 1))


@pytest.mark.parametrize("config", PRETRAIN, ids=lambda p: p.name)
def test_pretrain_config_instantiates(config: Path, demo: Path, tmp_path: Path) -> None:
    extra: list[str] = []
    stage_one = _stage_one(config)
    if stage_one is not None:
        dvae = _pretrain(["-c", str(stage_one)], demo).model
        assert isinstance(dvae, PretrainModule)
        extra = [f"--model.init_args.dvae={dvae.export_encoder(tmp_path / 'tokenizer')}"]
    cli = _pretrain(["-c", str(config), *extra], demo)
    assert isinstance(cli.model, PretrainModule)
    cli.datamodule.setup("fit")
    assert cli.trainer.max_epochs or cli.trainer.max_steps


@pytest.mark.parametrize("trainer", TRAINER, ids=lambda p: p.name)
def test_trainer_config_combines_with_a_method(trainer: Path, demo: Path) -> None:
    method = REPO / "configs" / "pretrain" / "point_mae_tiny.yaml"
    cli = _pretrain(["-c", str(method), "-c", str(trainer)], demo)
    assert type(cli.model).__name__ == "PointMAE"


def test_finetune_config_instantiates(demo: Path, tmp_path: Path) -> None:
    from pretrain.checkpoint import save_encoder
    from pretrain.encoders import build_encoder
    from pretrain.encoders.spec import DataContract, PointViTSpec

    art = save_encoder(tmp_path / "art", build_encoder(PointViTSpec()), data=DataContract(), provenance={})
    argv = _cpu(["-c", str(REPO / "configs" / "finetune" / "classify.yaml"), f"--data.data_root={demo}",
                 f"--model.pretrained={art}"])  # fmt: skip
    cli: Any = FinetuneCLI(args=argv, run=False, **FINETUNE_KWARGS)
    cli.datamodule.setup("fit")
    assert cli.model.cls_head_finetune[-1].out_features == 2


ANY2POINT = sorted((REPO / "configs" / "finetune").glob("any2point_*.yaml"))


@pytest.mark.parametrize("config", ANY2POINT, ids=lambda p: p.name)
def test_any2point_config_instantiates(config: Path, demo: Path, tmp_path: Path) -> None:
    """Each Any2Point config builds with a small random source model in its layout (the real ones are big)."""
    import yaml

    from pretrain.encoders import Any2PointEncoder
    from pretrain.sources.synthetic import write_random_source

    layout = yaml.safe_load(config.read_text())["model"]["encoder"]["source_layout"]
    suffix = ".safetensors" if layout == "bert" else ".pth"
    source = write_random_source(
        tmp_path / f"source{suffix}", layout, embed_dim=64, num_heads=4, positions=80
    )
    argv = _cpu(["-c", str(config), f"--data.data_root={demo}", f"--model.encoder.source_path={source}"])
    if layout != "bert":
        argv.append("--model.encoder.source_num_heads=4")
    cli: Any = FinetuneCLI(args=argv, run=False, **FINETUNE_KWARGS)
    cli.datamodule.setup("fit")
    assert isinstance(cli.model.encoder, Any2PointEncoder)
    assert cli.model.encoder.min_points <= cli.datamodule.num_points


def test_point_adapter_config_instantiates(demo: Path, tmp_path: Path) -> None:
    from pretrain.checkpoint import save_encoder
    from pretrain.encoders import DataContract, PointAdapterEncoder, PointViTSpec, build_encoder

    base = save_encoder(tmp_path / "base", build_encoder(PointViTSpec()), data=DataContract(), provenance={})
    config = REPO / "configs" / "finetune" / "point_adapter.yaml"
    argv = _cpu(["-c", str(config), f"--data.data_root={demo}", f"--model.encoder.base_path={base}"])
    cli: Any = FinetuneCLI(args=argv, run=False, **FINETUNE_KWARGS)
    assert isinstance(cli.model.encoder, PointAdapterEncoder)
