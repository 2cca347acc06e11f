from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import cli as finetune_cli
from pretrain import cli as pretrain_cli
from pretrain.artifacts import save_module_artifact
from pretrain.checkpoint import ArtifactError, WeightsMismatchError, load_encoder, read_artifact_meta
from pretrain.dvae import (
    DVAE_KIND,
    DiscreteVAE,
    DVAESpec,
    gumbel_softmax,
    infer_dvae_spec,
    load_dvae,
)
from pretrain.encoders.spec import DataContract
from pretrain.importers import REMAPS
from tests.pretrain import dvae_reference as dref
from tests.pretrain.encoders import official_reference as ref

TINY_ARGS = ["--num-groups", "16", "--group-size", "8", "--num-points", "64"]


def _tiny_pair(seed: int = 0) -> tuple[DiscreteVAE, dref.DiscreteVAE]:
    official = dref.randomize_dvae(dref.DiscreteVAE(**dref.TINY), seed=seed).eval()
    ours = DiscreteVAE(DVAESpec(**dref.TINY_SPEC)).eval()
    ours.load_state_dict(official.state_dict())  # same names, no remap
    return ours, official


def _clouds(batch: int = 3, n: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    clouds = rng.uniform(-1, 1, size=(batch, n, 3)).astype(np.float32)
    clouds[:, 5] = 0.01  # near the origin: the official FPS never picks it after the first centre
    return torch.from_numpy(clouds)


def test_spec_defaults_are_official_and_round_trip() -> None:
    spec = DVAESpec()
    assert (spec.num_groups, spec.group_size, spec.tokenizer_dim, spec.codebook_size) == (64, 32, 256, 8192)
    assert spec.dgcnn_dims == (128, 256, 512, 512, 1024)
    assert spec.dgcnn_k == 4
    assert DVAESpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="unknown DVAESpec fields"):
        DVAESpec.from_dict({"codebook": 3})
    with pytest.raises(ValueError, match="multiple of 4"):
        DVAESpec(group_size=30)
    with pytest.raises(ValueError, match="codebook_size"):
        DVAESpec(codebook_size=0)


def test_official_size_key_layout() -> None:
    ours = DiscreteVAE(DVAESpec()).state_dict()
    official = dref.DiscreteVAE().state_dict()
    assert len(ours) == 75
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}
    assert tuple(ours["codebook"].shape) == (8192, 256)


def test_gumbel_softmax_explicit_noise(gen: torch.Generator) -> None:
    logits = torch.randn(2, 3, 5, generator=gen)
    state = gen.get_state()
    soft = gumbel_softmax(logits, 0.5, generator=gen)
    gen.set_state(state)
    noise = -torch.empty(2, 3, 5).exponential_(generator=gen).log()
    torch.testing.assert_close(soft, ((logits + noise) / 0.5).softmax(-1))
    gen.set_state(state)
    leaf = logits.clone().requires_grad_(True)
    hard = gumbel_softmax(leaf, 0.5, hard=True, generator=gen)
    assert torch.equal(hard.detach().argmax(-1), soft.argmax(-1))
    assert torch.equal(hard.detach().sum(-1), torch.ones(2, 3))
    assert set(hard.detach().unique().tolist()) == {
        0.0,
        1.0,
    }
    weights = torch.randn(2, 3, 5, generator=gen)
    (hard * weights).sum().backward()
    soft_leaf = logits.clone().requires_grad_(True)
    ((((soft_leaf + noise) / 0.5).softmax(-1)) * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, soft_leaf.grad)  # straight-through: the soft sample's gradient
    with pytest.raises(ValueError, match="temperature"):
        gumbel_softmax(logits, 0.0)


def test_forward_matches_official_layout_reference(gen: torch.Generator) -> None:
    ours, official = _tiny_pair()
    neighborhood, center = ref.group_reference(_clouds(2), 16, 8)
    logits = ours.logits(neighborhood, center)
    # float32 rounding: the mini-PointNet sums in another order than Conv1d (about 1e-6), and the DGCNN's
    # GroupNorms amplify that to about 1e-5 on logits of magnitude 3.
    torch.testing.assert_close(logits, official.logits(neighborhood, center), atol=1e-4, rtol=1e-4)
    codes = torch.softmax(torch.randn(2, 16, 12, generator=gen), -1)
    for a, b in zip(ours.decode(codes, center), official.decode(codes, center)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    out = ours(neighborhood, center, temperature=1.0, hard=True, generator=gen)
    assert out.coarse.shape == (2, 16, 2, 3)
    assert out.fine.shape == (2, 16, 8, 3)
    assert torch.equal(out.codes.argmax(-1), out.codes.detach().argmax(-1))


def test_artifact_round_trip_is_strict(tmp_path: Path) -> None:
    ours, _ = _tiny_pair()
    out = save_module_artifact(
        tmp_path / "tok", ours, data=DataContract(num_points=64), provenance={"method": "test"}
    )
    meta = read_artifact_meta(out, kind=DVAE_KIND)
    assert meta["spec"]["codebook_size"] == 12
    assert meta["provenance"]["method"] == "test"
    loaded, _ = load_dvae(out)
    assert not loaded.training
    for key, value in ours.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(ArtifactError, match="expected 'point_encoder'"):
        load_encoder(out)
    spec = json.loads((out / "encoder.json").read_text())
    spec["spec"]["codebook_size"] = 16
    (out / "encoder.json").write_text(json.dumps(spec))
    with pytest.raises(WeightsMismatchError):
        load_dvae(out)


def test_infer_spec_from_official_weights() -> None:
    state = dref.DiscreteVAE(**dref.TINY).state_dict()
    assert infer_dvae_spec(state, num_groups=16) == DVAESpec(**dref.TINY_SPEC)
    with pytest.raises(ValueError, match="does not match the decoder"):
        infer_dvae_spec(state, num_groups=16, group_size=32)
    with pytest.raises(ValueError, match="missing tensors"):
        infer_dvae_spec({"codebook": state["codebook"]})


def test_remap_accepts_dvae_and_mpm_layouts() -> None:
    official = dref.DiscreteVAE(**dref.TINY)
    plain = REMAPS["point-bert-dvae"](official.state_dict())
    assert plain.kind == DVAE_KIND
    assert plain.dropped == []
    nested = {f"dvae.{k}": v for k, v in official.state_dict().items()}
    nested.update({"transformer_q.norm.weight": torch.ones(2), "queue": torch.zeros(2, 3)})
    remapped = REMAPS["point-bert-dvae"](nested)
    assert sorted(remapped.state) == sorted(plain.state)
    assert remapped.unexpected_dropped() == []
    nested["stray.weight"] = torch.zeros(1)
    assert REMAPS["point-bert-dvae"](nested).unexpected_dropped() == ["stray.weight"]
    with pytest.raises(ValueError, match="not a Point-BERT dVAE checkpoint"):
        REMAPS["point-bert-dvae"]({"blocks.0.weight": torch.zeros(1)})


def test_import_official_dvae_gives_official_token_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    official = dref.randomize_dvae(dref.DiscreteVAE(**dref.TINY), seed=3).eval()
    src = tmp_path / "dvae.pth"
    ref.save_official(src, official)  # {"base_model": {"module.codebook": ...}, "epoch": 300, ...}
    out = tmp_path / "tok"
    assert pretrain_cli.main(["import", "point-bert-dvae", str(src), str(out), *TINY_ARGS, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == DVAE_KIND
    assert summary["layout"] == "point-bert dvae"
    assert summary["num_tensors"] == len(official.state_dict())
    tokenizer, meta = load_dvae(out)
    assert meta["provenance"]["epoch"] == 300
    assert meta["data_contract"]["num_points"] == 64

    clouds = _clouds(3)
    with torch.no_grad():
        expected_ids, expected_centers = official.token_ids(clouds, 16, 8)
        groups, ids = tokenizer.discrete_tokens(clouds)
        torch.testing.assert_close(
            tokenizer.logits(groups.neighborhoods, groups.centers),
            official.logits(*ref.group_reference(clouds, 16, 8)),
            atol=1e-4,  # float32 summation order (see test_forward_matches_official_layout_reference)
            rtol=1e-4,
        )
    assert torch.equal(ids, expected_ids)
    assert len(expected_ids.unique()) > 2  # a test that could tell wrong ids apart
    torch.testing.assert_close(groups.centers, expected_centers)

    # pcpt-finetune embed on a tokenizer artifact writes token ids and centres
    inp, feats = tmp_path / "clouds.npy", tmp_path / "tokens.npz"
    np.save(inp, clouds.numpy())
    argv = ["embed", str(out), "--input", str(inp), "--out", str(feats), "--batch-size", "2", "--json"]
    assert finetune_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["shapes"] == {"token_ids": [3, 16], "centers": [3, 16, 3]}
    with np.load(feats) as data:
        assert data["token_ids"].dtype == np.int64
        assert np.array_equal(data["token_ids"], expected_ids.numpy())
        np.testing.assert_allclose(data["centers"], expected_centers.numpy())

    # the dvae.* part of an official masked point modelling checkpoint imports to the same tokenizer
    holder = torch.nn.Module()
    holder.dvae = official
    holder.register_buffer("queue", torch.zeros(4, 8))
    mpm = tmp_path / "mpm.pth"
    ref.save_official(mpm, holder)
    assert pretrain_cli.main(["import", "point-bert-dvae", str(mpm), str(tmp_path / "tok2"), *TINY_ARGS]) == 0
    assert "dVAE tokenizer, 12 codes" in capsys.readouterr().out
    again, _ = load_dvae(tmp_path / "tok2")
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_import_rejects_wrong_group_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "dvae.pth"
    ref.save_official(src, dref.DiscreteVAE(**dref.TINY))
    status = pretrain_cli.main(
        ["import", "point-bert-dvae", str(src), str(tmp_path / "t"), "--group-size", "32"]
    )
    assert status == 2
    assert "does not match the decoder" in capsys.readouterr().err
