"""``compile=True``: in-place torch.compile of the heavy parts, same numbers as eager, same keys."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_encoder
from pretrain.cli import main as pretrain_main
from pretrain.encoders import PointViTSpec
from pretrain.methods.point_mae import PointMAE
from pretrain.nn.transformer import Block
from tests.pretrain.methods.tiny_cli import RUNTIME, config, tiny_encoder

#: no drop-path: in-graph random draws come from inductor's generator, so only a deterministic model matches.
SPEC = PointViTSpec(
    embed_dim=32, depth=2, num_heads=2, num_groups=8, group_size=8, tokenizer_dim=32, drop_path=0.0
)


def _model(compile: bool) -> PointMAE:
    torch.manual_seed(0)
    return PointMAE(
        SPEC, decoder_depth=1, decoder_drop_path=0.0, compile=compile, compile_dynamic=False
    ).train()


def _graphs() -> int:
    """Graphs torch.compile has produced in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _step(model: PointMAE, points: torch.Tensor) -> float:
    """One loss + backward + SGD step on a fixed mask; returns the loss.

    SGD, not AdamW: AdamW scales every gradient to a step of size ``lr``, also the round-off gradients of
    biases followed by BatchNorm (exactly 0 in exact arithmetic), which differ between eager and compiled.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model.loss_for(points, generator=torch.Generator().manual_seed(3))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def test_compile_wraps_the_outermost_blocks_in_place_and_keeps_state_dict_keys() -> None:
    model, eager = _model(compile=True), _model(compile=False)
    names = list(model.compile_targets())
    assert names == ["encoder.blocks.0", "encoder.blocks.1", "decoder.blocks.0"]
    assert all(isinstance(m, Block) for m in model.compile_targets().values())
    assert model.hparams["compile"] is True
    model.configure_model()  # what the Trainer calls (compilation itself happens at the first call)
    assert model.compile_modules() == names  # idempotent
    compiled = [name for name, m in model.named_modules() if m._compiled_call_impl is not None]
    assert compiled == names
    assert list(model.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in model.state_dict())
    eager.load_state_dict(model.state_dict(), strict=True)
    eager.configure_model()  # nothing compiles without compile=True
    assert all(m._compiled_call_impl is None for m in eager.modules())


@pytest.mark.slow
def test_compiled_point_mae_matches_eager() -> None:
    """Loss and weights after one step equal eager's (compiling takes 10-80 s on a cold inductor cache)."""
    torch._dynamo.reset()
    graphs = _graphs()
    points = torch.rand(4, 64, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    eager, compiled = _model(compile=False), _model(compile=True)
    compiled.configure_model()

    begin = time.perf_counter()
    compiled_loss = _step(compiled, points)
    compile_s = time.perf_counter() - begin
    eager_loss = _step(eager, points)
    assert _graphs() > graphs, "torch.compile produced no graph: the blocks ran eagerly"
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5, abs=1e-6)
    for (key, a), (_, b) in zip(compiled.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
    # the weights moved (the comparison above is not between two untouched copies)
    untouched = _model(compile=False).encoder.blocks[0].attn.qkv.weight
    assert not torch.equal(compiled.encoder.blocks[0].attn.qkv.weight, untouched)
    assert compile_s < 180, f"compiling the tiny model took {compile_s:.0f} s"


@pytest.mark.slow
def test_cli_fit_with_compile_writes_an_artifact_that_loads(demo: Path, tmp_path: Path) -> None:
    torch._dynamo.reset()
    graphs = _graphs()
    art = tmp_path / "art"
    args = [*config("point_mae_tiny.yaml"), *tiny_encoder(num_groups=8, tokenizer_dim=32)]
    args += ["--model.init_args.decoder_depth=1", *RUNTIME, "--model.init_args.compile=true"]
    status = pretrain_main(
        ["fit", *args, f"--data.data_root={demo}", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.max_steps=2", f"--export_dir={art}"]
    )  # fmt: skip
    assert status == 0
    assert _graphs() > graphs  # the blocks ran compiled
    encoder, meta = load_encoder(art)  # strict load into an eager encoder
    assert meta["provenance"]["step"] == 2
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["compile"] is True
    state = ckpt["state_dict"]
    weights = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    assert set(weights) == set(encoder.state_dict())
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, weights[key], msg=key)
    eager = PointMAE(encoder.spec, decoder_depth=1)
    eager.load_state_dict(ckpt["state_dict"], strict=True)  # the Lightning checkpoint too
    out = encoder.eval().encode(torch.rand(2, 64, 3))
    assert torch.isfinite(out.tokens).all()
