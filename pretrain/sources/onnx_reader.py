"""A ViT's weights read out of an ONNX graph, as a DINOv2 / timm state dict for the ``vit`` layout.

An ONNX export keeps the weights as graph initializers, but not always under their module names: the
TorchScript exporter stores every ``nn.Linear`` weight transposed, as a ``MatMul`` initializer named
``onnx::MatMul_<n>``, and constant folding can split ``pos_embed`` into anonymous pieces. So
:func:`read_onnx_vit` reads the graph's structure and ignores the names:

1. Linear layers: a ``MatMul`` (or ``Gemm``) with a constant 2-D weight, plus the ``Add`` of a constant bias
   that is its only consumer; weights are turned back into ``nn.Linear``'s (out, in).
2. LayerNorms: ``LayerNormalization`` nodes (opset >= 17), or the pattern ``(x - mean(x)) / sqrt(var + eps) *
   w + b`` that older opsets decompose them into; eps is read from the graph.
3. The residual stream, from the tokens that enter the first LayerNorm: per block ``x -> norm1 -> attention
   -> attn.proj [* ls1] -> + x = y -> norm2 -> mlp.fc1 -> activation -> mlp.fc2 [* ls2] -> + y``; then the
   final ``norm``. LayerScale is a ``Mul`` by a constant (D,) vector on the branch.
4. In every attention, q, k and v by their role, not by the order the exporter wrote them in (Hugging Face
   exports write key, value, query): q and k meet in the score ``MatMul`` that feeds the ``Softmax``, q on the
   left; v is what the probabilities multiply. Separate q / k / v projections (Hugging Face ``Dinov2Model``)
   are concatenated into ``attn.qkv``; a fused one (timm, DINOv2) is kept as is. The head count comes from
   the constant shape of the ``Reshape`` that splits the heads.
5. Embeddings: the tokens entering block 0 must be ``Add(tokens, positions)``. The token side holds the
   patch ``Conv`` (``patch_embed.proj``, stride = kernel = patch size) and an optional (1, 1, D)
   ``cls_token`` (or its expansion to a static batch, folded into an (n, 1, D) constant). The positional
   side holds either one (1, [1 +] H*W, D) table, or (when the graph resamples the table to the input's
   patch grid and the exporter folded the slicing, as in Hugging Face exports) a (1, 1, D) CLS entry and a
   (1, H*W, D) grid (or a folded (1, D, H, W) / (1, H, W, D) reshape of it) that are concatenated back into
   ``pos_embed`` at the table's own size. When the exporter folded the resampling itself (a static image
   size), only the resampled table is in the file, and that is what is returned.

The activation between ``fc1`` and ``fc2`` is recognised from its ops: ``Erf`` or ``Gelu`` -> exact GELU,
``Tanh`` or ``Gelu(approximate="tanh")`` -> ``gelu_tanh``, ``Relu`` -> ``relu``. Other structures (register
tokens, SwiGLU MLPs, fused attention ops, a norm before the blocks) are refused with a :class:`SourceError`
that says what was not found. Initializers outside the ViT (a task head, a decoder) are listed in
:attr:`OnnxViT.unused` and left out of the state.

Needs the ``onnx`` package (``python -m pip install onnx``), imported only when a file is read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datapipes.errors import one_line
from pretrain.nn.transformer import Activation
from pretrain.sources.layouts import SourceError

__all__ = ["ONNX_INSTALL", "ONNX_SUFFIX", "OnnxViT", "is_onnx", "read_onnx_vit"]

#: how to install the package the reader needs.
ONNX_INSTALL = "python -m pip install onnx"
#: file suffix (any case) that marks an ONNX model for :func:`~pretrain.sources.read_source_state`.
ONNX_SUFFIX = ".onnx"
#: ops a tensor passes through on its way between two meaningful ops (layout changes, casts, head split and
#: merge, unbinding a fused qkv). ``Mul`` / ``Div`` pass only by a data-free operand (a scale).
_PASS_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Cast",
        "Identity",
        "Squeeze",
        "Unsqueeze",
        "Gather",
        "Split",
        "Slice",
        "Flatten",
    }
)
_SCALE_OPS = frozenset({"Mul", "Div"})
_FLOAT_KINDS = frozenset("f")


@dataclass(frozen=True)
class OnnxViT:
    """The ViT found in an ONNX graph.

    Attributes:
        state: DINOv2 / timm names -> float32 tensors: ``pos_embed``, ``patch_embed.proj.weight`` (and
            ``.bias``), ``cls_token`` when the graph has one, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
            mlp.fc1, mlp.fc2}.{weight, bias}``, ``blocks.N.{ls1, ls2}.gamma`` with LayerScale,
            ``norm.{weight, bias}``.
        origin: each state key -> the initializer names it was built from (three for a concatenated qkv, two
            for a re-assembled ``pos_embed``).
        num_heads: attention heads, from the head-splitting ``Reshape``; None when its shape is not constant.
        norm_eps: the LayerNorm epsilon (one for every LayerNorm of the ViT), rounded to float32 precision.
        activation: the MLP activation: ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"relu"``.
        image_size: (H, W) of the graph's image input when static, else None.
        resampled: the graph resamples the positional grid before adding it (its input is not the table's
            own size).
        tokens_in: name of the graph tensor entering block 0 (patch and CLS tokens plus positions).
        tokens_out: name of the graph tensor the final LayerNorm writes.
        unused: float initializers that are not part of the ViT (a task head, a decoder), sorted.
    """

    state: dict[str, Tensor]
    origin: dict[str, tuple[str, ...]]
    num_heads: int | None
    norm_eps: float
    activation: Activation
    image_size: tuple[int, int] | None
    resampled: bool
    tokens_in: str
    tokens_out: str
    unused: tuple[str, ...]


@dataclass(frozen=True)
class _Linear:
    weight: np.ndarray  # (out, in), nn.Linear's orientation
    bias: np.ndarray | None
    names: tuple[str, ...]  # weight initializer, then bias initializer
    input: str
    output: str  # after the bias


@dataclass(frozen=True)
class _Norm:
    weight: np.ndarray
    bias: np.ndarray
    names: tuple[str, str]
    eps: float
    input: str
    output: str
    index: int  # of the node that writes the output


class _Graph:
    """Producer / consumer indices and constant values of an ONNX ``GraphProto``."""

    def __init__(self, graph: Any, to_array: Callable[[Any], np.ndarray]) -> None:
        self.nodes: list[Any] = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in node.output:
                self.producer[name] = i
            for name in node.input:
                if name:
                    self.consumers[name].append(i)
        self.initializers: dict[str, np.ndarray] = {t.name: to_array(t) for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.op_type == "Constant":
                value = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None:
                    self.constants[node.output[0]] = to_array(value.t)
        self.inputs: list[Any] = [i for i in graph.input if i.name not in self.initializers]
        self._data_free: dict[str, bool] = {}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` output (through ``Identity`` / ``Cast``), or None."""
        while True:
            if name in self.initializers:
                return self.initializers[name]
            if name in self.constants:
                return self.constants[name]
            node = self.node(name)
            if node is None or node.op_type not in ("Identity", "Cast"):
                return None
            name = node.input[0]

    def const_name(self, name: str) -> str:
        """The initializer / ``Constant`` name behind ``Identity`` / ``Cast`` nodes (else ``name``)."""
        while name not in self.initializers and name not in self.constants:
            node = self.node(name)
            if node is None or node.op_type not in ("Identity", "Cast"):
                return name
            name = node.input[0]
        return name

    def value(self, name: str) -> np.ndarray:
        """:meth:`const`, for a name known to be constant.

        Raises:
            SourceError: ``name`` is not a constant.
        """
        value = self.const(name)
        if value is None:
            raise SourceError(f"{name!r} is not a constant")
        return value

    def node(self, name: str) -> Any | None:
        index = self.producer.get(name)
        return None if index is None else self.nodes[index]

    def users(self, name: str) -> list[Any]:
        return [self.nodes[i] for i in self.consumers.get(name, [])]

    def data_free(self, name: str) -> bool:
        """True when ``name`` depends on no tensor data: only on constants and on ``Shape`` outputs."""
        if name in self._data_free:
            return self._data_free[name]
        result = True
        stack, seen = [name], set()
        while stack and result:
            current = stack.pop()
            if current in seen or self.const(current) is not None:
                continue
            seen.add(current)
            node = self.node(current)
            if node is None:
                result = False
            elif node.op_type not in ("Shape", "Size"):
                stack.extend(n for n in node.input if n)
        self._data_free[name] = result
        return result

    def ancestry(self, name: str) -> tuple[set[int], set[str]]:
        """(indices of the nodes ``name`` depends on, constant names it depends on).

        Stops at ``Shape`` / ``Size`` nodes: a tensor's shape is not its data.
        """
        nodes: set[int] = set()
        consts: set[str] = set()
        stack = [name]
        while stack:
            current = stack.pop()
            if current in self.initializers or current in self.constants:
                consts.add(current)
                continue
            index = self.producer.get(current)
            if index is None or index in nodes:
                continue
            nodes.add(index)
            if self.nodes[index].op_type not in ("Shape", "Size"):
                stack.extend(n for n in self.nodes[index].input if n)
        return nodes, consts


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _split_const(g: _Graph, node: Any) -> tuple[str, str] | None:
    """(constant operand, other operand) of a binary node with exactly one constant operand, or None."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    a_const, b_const = g.const(a) is not None, g.const(b) is not None
    if a_const == b_const:
        return None
    return (a, b) if a_const else (b, a)


def _vector(g: _Graph, name: str, size: int | None = None) -> np.ndarray | None:
    """A constant 1-D float vector (of ``size`` when given), else None."""
    value = g.const(name)
    if value is None or value.ndim != 1 or value.dtype.kind not in _FLOAT_KINDS:
        return None
    return value if size is None or value.shape[0] == size else None


def _float_scalar(value: np.ndarray | None) -> float | None:
    if value is None or value.size != 1 or value.dtype.kind not in _FLOAT_KINDS:
        return None
    return float(value.reshape(()))


def _round_f32(value: float) -> float:
    """``value`` as the shortest decimal that is the same float32 (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


# ------------------------------------------------------------------------------------------ patterns


def _matmul_weight(g: _Graph, name: str) -> tuple[np.ndarray, str] | None:
    """The (out, in) weight of ``MatMul(x, name)``: a constant (in, out) matrix, or ``Transpose`` of one."""
    value = g.const(name)
    if value is not None:
        return (value.T, g.const_name(name)) if value.ndim == 2 else None
    node = g.node(name)
    if node is not None and node.op_type == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:
        value = g.const(node.input[0])
        if value is not None and value.ndim == 2:
            return value, g.const_name(node.input[0])
    return None


def _find_linears(g: _Graph) -> list[_Linear]:
    """Every ``MatMul`` / ``Gemm`` by a constant matrix, with the constant-bias ``Add`` that follows it."""
    found: list[_Linear] = []
    names: tuple[str, ...]
    for node in g.nodes:
        if node.op_type == "MatMul" and g.const(node.input[0]) is None:
            weight = _matmul_weight(g, node.input[1])
            if weight is None or weight[0].dtype.kind not in _FLOAT_KINDS:
                continue
            matrix, names = weight[0], (weight[1],)
            bias, output = None, node.output[0]
            users = g.users(output)
            if len(users) == 1 and users[0].op_type == "Add":
                split = _split_const(g, users[0])
                if split is not None and (vec := _vector(g, split[0], matrix.shape[0])) is not None:
                    bias, output, names = vec, users[0].output[0], (*names, g.const_name(split[0]))
            found.append(_Linear(matrix, bias, names, node.input[0], output))
        elif node.op_type == "Gemm" and not _attr(node, "transA", 0):
            value = g.const(node.input[1])
            if value is None or value.ndim != 2 or _attr(node, "alpha", 1.0) != 1.0:
                continue
            matrix = value if _attr(node, "transB", 0) else value.T
            names = (g.const_name(node.input[1]),)
            bias = None
            if len(node.input) > 2 and node.input[2]:
                bias = _vector(g, node.input[2], matrix.shape[0])
                if bias is None or _attr(node, "beta", 1.0) != 1.0:
                    continue
                names = (*names, g.const_name(node.input[2]))
            found.append(_Linear(matrix, bias, names, node.input[0], node.output[0]))
    return found


def _affine(g: _Graph, normed: str) -> tuple[np.ndarray, np.ndarray, tuple[str, str], str, int] | None:
    """``normed * w + b`` after a decomposed LayerNorm: (w, b, names, output, index of the Add)."""
    users = g.users(normed)
    if len(users) != 1 or users[0].op_type != "Mul":
        return None
    mul = users[0]
    split = _split_const(g, mul)
    if split is None or (weight := _vector(g, split[0])) is None:
        return None
    users = g.users(mul.output[0])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    split_b = _split_const(g, add)
    if split_b is None or (bias := _vector(g, split_b[0], weight.shape[0])) is None:
        return None
    names = (g.const_name(split[0]), g.const_name(split_b[0]))
    return weight, bias, names, add.output[0], g.producer[add.output[0]]


def _decomposed_norm(g: _Graph, div: Any) -> _Norm | None:
    """``Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub, 2)), eps)))`` followed by ``* w + b``."""
    sub, sqrt = g.node(div.input[0]), g.node(div.input[1])
    if sub is None or sqrt is None or sub.op_type != "Sub" or sqrt.op_type != "Sqrt":
        return None
    mean = g.node(sub.input[1])
    if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0]:
        return None
    add_eps = g.node(sqrt.input[0])
    if add_eps is None or add_eps.op_type != "Add":
        return None
    split = _split_const(g, add_eps)
    eps = None if split is None else _float_scalar(g.const(split[0]))
    var = None if split is None else g.node(split[1])
    if eps is None or var is None or var.op_type != "ReduceMean":
        return None
    affine = _affine(g, div.output[0])
    if affine is None:
        return None
    weight, bias, names, output, index = affine
    return _Norm(weight, bias, names, eps, sub.input[0], output, index)


def _find_norms(g: _Graph) -> list[_Norm]:
    """Every affine LayerNorm over the last axis, in graph order."""
    found: list[_Norm] = []
    for index, node in enumerate(g.nodes):
        if node.op_type == "LayerNormalization" and _attr(node, "axis", -1) == -1 and len(node.input) == 3:
            weight, bias = _vector(g, node.input[1]), _vector(g, node.input[2])
            if weight is None or bias is None:
                continue
            names = (g.const_name(node.input[1]), g.const_name(node.input[2]))
            eps = float(_attr(node, "epsilon", 1e-5))
            found.append(_Norm(weight, bias, names, eps, node.input[0], node.output[0], index))
        elif node.op_type == "Div" and (norm := _decomposed_norm(g, node)) is not None:
            found.append(norm)
    return sorted(found, key=lambda n: n.index)


# ------------------------------------------------------------------------------------------- tracing


def _back(g: _Graph, name: str) -> str:
    """Walks back from ``name`` through :data:`_PASS_OPS` and scalings by data-free operands."""
    while True:
        node = g.node(name)
        if node is None:
            return name
        if node.op_type in _PASS_OPS:
            name = node.input[0]
        elif node.op_type in _SCALE_OPS and len(node.input) == 2:
            a, b = node.input
            if g.data_free(b):
                name = a
            elif node.op_type == "Mul" and g.data_free(a):
                name = b
            else:
                return name
        else:
            return name


def _op(g: _Graph, name: str) -> str | None:
    node = g.node(name)
    return None if node is None else str(node.op_type)


def _attention_roles(
    g: _Graph, proj: _Linear, by_output: dict[str, _Linear]
) -> tuple[_Linear, _Linear, _Linear]:
    """(q, k, v) projections of the attention that ``proj`` closes (one fused projection three times).

    Raises:
        SourceError: no ``Softmax(q @ k) @ v`` before ``proj``, or q / k / v not made by linear layers.
    """
    av = g.node(_back(g, proj.input))
    if av is None or av.op_type != "MatMul" or any(g.const(n) is not None for n in av.input):
        raise SourceError("no attention (probabilities @ v) feeds the attention output projection")
    probs_side = [i for i, n in enumerate(av.input) if _op(g, _back(g, n)) == "Softmax"]
    if len(probs_side) != 1:
        raise SourceError("the attention output is not a Softmax times v")
    softmax = g.node(_back(g, av.input[probs_side[0]]))
    assert softmax is not None
    scores_name = _back(g, softmax.input[0])
    scores = g.node(scores_name)
    while scores is not None and scores.op_type == "Add" and _split_const(g, scores) is not None:
        split = _split_const(g, scores)  # an additive constant mask
        assert split is not None
        scores = g.node(_back(g, split[1]))
    if scores is None or scores.op_type != "MatMul":
        raise SourceError("the attention Softmax does not read a q @ k product")
    roles = [_back(g, scores.input[0]), _back(g, scores.input[1]), _back(g, av.input[1 - probs_side[0]])]
    found = [by_output.get(name) for name in roles]
    if any(lin is None for lin in found):
        raise SourceError("the attention's q, k or v is not the output of a linear layer")
    q, k, v = (lin for lin in found if lin is not None)
    return q, k, v


def _static_shape(g: _Graph, name: str) -> list[int | None] | None:
    """A shape tensor's entries (None for a runtime entry such as the batch size), or None if unknown."""
    value = g.const(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" else None
    node = g.node(name)
    if node is None or node.op_type != "Concat":
        return None
    out: list[int | None] = []
    for part in node.input:
        known = g.const(part)
        if known is not None:
            out.extend(int(v) for v in known.reshape(-1))
            continue
        piece = g.node(part)
        if piece is None or piece.op_type != "Unsqueeze":
            return None
        out.append(None)  # Unsqueeze of a runtime scalar: one entry
    return out


def _heads(g: _Graph, q: _Linear, dim: int) -> int | None:
    """Head count from the ``Reshape(..., [.., H, D / H])`` that splits q's heads, or None.

    The head width may be -1 or computed at run time; H must be a constant that divides D.
    """
    for node in g.users(q.output):
        if node.op_type != "Reshape":
            continue
        shape = _static_shape(g, node.input[1])
        if shape is None or len(shape) < 2:
            continue
        heads, width = shape[-2], shape[-1]
        if heads is not None and heads > 0 and dim % heads == 0 and width in (dim // heads, -1, None):
            return heads
    return None


def _activation(g: _Graph, fc1: _Linear, fc2: _Linear, by_output: dict[str, _Linear]) -> Activation:
    """The activation between ``fc1`` and ``fc2``, from the ops on the path.

    Raises:
        SourceError: another linear layer or a graph input on the path, or an activation not recognised.
    """
    ops: set[str] = set()
    stack, seen = [fc2.input], set()
    while stack:
        name = stack.pop()
        if name == fc1.output or name in seen or g.data_free(name):
            continue
        seen.add(name)
        if name in by_output:
            raise SourceError("the MLP is not fc1 -> activation -> fc2 (gated MLPs are not supported)")
        node = g.node(name)
        if node is None:
            raise SourceError("the MLP's second layer reads a graph input, not the first layer")
        ops.add(str(node.op_type))
        if node.op_type == "Gelu":
            ops.add("Tanh" if _attr(node, "approximate", b"none") in (b"tanh", "tanh") else "Erf")
        stack.extend(n for n in node.input if n)
    if "Erf" in ops:
        return "gelu"
    if "Tanh" in ops:
        return "gelu_tanh"
    if "Relu" in ops:
        return "relu"
    raise SourceError(f"the MLP activation is not GELU or ReLU (ops {sorted(ops)})")


# ------------------------------------------------------------------------------------------ assembly


def _tensor(value: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32, copy=True))


def _one(items: Sequence[Any], what: str) -> Any:
    if len(items) != 1:
        raise SourceError(f"expected one {what}, found {len(items)}")
    return items[0]


class _Builder:
    """Collects state entries with their origins."""

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}
        self.origin: dict[str, tuple[str, ...]] = {}

    def put(self, key: str, value: np.ndarray, names: Iterable[str]) -> None:
        self.state[key] = _tensor(value)
        self.origin[key] = tuple(names)

    def linear(self, key: str, lin: _Linear) -> None:
        self.put(f"{key}.weight", lin.weight, lin.names[:1])
        if lin.bias is not None:
            self.put(f"{key}.bias", lin.bias, lin.names[1:])

    def norm(self, key: str, norm: _Norm) -> None:
        self.put(f"{key}.weight", norm.weight, norm.names[:1])
        self.put(f"{key}.bias", norm.bias, norm.names[1:])


def _residual(g: _Graph, x: str, by_output: dict[str, _Linear]) -> tuple[Any, _Linear, str | None] | None:
    """The residual ``Add(x, [gamma *] linear(...))`` on ``x``: (Add node, linear, gamma name), or None."""
    found = []
    for node in g.users(x):
        if node.op_type != "Add" or len(node.input) != 2 or x not in node.input:
            continue
        branch = node.input[1] if node.input[0] == x else node.input[0]
        gamma = None
        scale = g.node(branch)
        split = _split_const(g, scale) if scale is not None and scale.op_type == "Mul" else None
        if split is not None and _vector(g, split[0]) is not None:
            gamma, branch = split[0], split[1]
        if branch in by_output:
            found.append((node, by_output[branch], gamma))
    return _one(found, f"residual connection on {x!r}") if found else None


def _block(
    g: _Graph, b: _Builder, i: int, x: str, norms: dict[str, list[_Norm]], linears: list[_Linear]
) -> tuple[str, float, Activation, int | None]:
    """Reads block ``i`` whose input is ``x``: (its output, LayerNorm eps, activation, heads or None)."""
    by_output = {lin.output: lin for lin in linears}
    p = f"blocks.{i}."
    norm1 = _one(norms.get(x, []), f"norm1 of block {i}")
    first = _residual(g, x, by_output)
    if first is None:
        raise SourceError(f"block {i} has no attention residual connection")
    add1, proj, gamma1 = first
    y = add1.output[0]
    norm2 = _one(norms.get(y, []), f"norm2 of block {i}")
    second = _residual(g, y, by_output)
    if second is None:
        raise SourceError(f"block {i} has no MLP residual connection")
    add2, fc2, gamma2 = second
    fc1 = _one([lin for lin in linears if lin.input == norm2.output], f"fc1 in block {i}")
    readers = [lin for lin in linears if lin.input == norm1.output]
    q, k, v = _attention_roles(g, proj, by_output)
    dim = int(norm1.weight.shape[0])
    if len(readers) == 1 and q is k is v is readers[0]:
        b.linear(f"{p}attn.qkv", q)
    elif len(readers) == 3 and {id(q), id(k), id(v)} == {id(lin) for lin in readers}:
        b.put(
            f"{p}attn.qkv.weight",
            np.concatenate([q.weight, k.weight, v.weight]),
            [t.names[0] for t in (q, k, v)],
        )
        biases = [t.bias for t in (q, k, v)]
        if all(bias is not None for bias in biases):
            names = [t.names[1] for t in (q, k, v)]
            b.put(f"{p}attn.qkv.bias", np.concatenate([bias for bias in biases if bias is not None]), names)
        elif any(bias is not None for bias in biases):
            raise SourceError(f"block {i}: only some of q, k, v have a bias")
    else:
        raise SourceError(
            f"block {i}: the attention does not read norm1 through one fused or three q/k/v layers"
        )
    b.norm(f"{p}norm1", norm1)
    b.linear(f"{p}attn.proj", proj)
    b.norm(f"{p}norm2", norm2)
    b.linear(f"{p}mlp.fc1", fc1)
    b.linear(f"{p}mlp.fc2", fc2)
    for key, gamma in (("ls1", gamma1), ("ls2", gamma2)):
        if gamma is not None:
            b.put(f"{p}{key}.gamma", g.value(gamma), [g.const_name(gamma)])
    if norm1.eps != norm2.eps:
        raise SourceError(f"block {i}: norm1 and norm2 have different eps ({norm1.eps}, {norm2.eps})")
    return add2.output[0], norm1.eps, _activation(g, fc1, fc2, by_output), _heads(g, q, dim)


def _float_weights(g: _Graph, names: Iterable[str], dim: int) -> list[str]:
    """The float constants among ``names`` with at least ``dim`` entries (weights, not scalars or shapes)."""
    out = []
    for name in names:
        value = g.const(name)
        if value is not None and value.dtype.kind in _FLOAT_KINDS and value.size >= dim:
            out.append(name)
    return sorted(out)


def _is_cls(value: np.ndarray, dim: int) -> bool:
    """A (1, 1, D) CLS token, or its expansion to a static batch (n, 1, D) folded by the exporter."""
    return value.ndim == 3 and value.shape[1:] == (1, dim) and bool(np.all(value == value[:1]))


def _as_table(value: np.ndarray, dim: int) -> np.ndarray | None:
    """A positional constant as a (1, L, D) table: itself, or a folded (1, D, h, w) / (1, h, w, D) grid.

    Returns:
        The table, or None for any other shape (or a 4-D grid whose layout is ambiguous, h or w = D).
    """
    if value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == dim:
        return value
    if value.ndim != 4 or value.shape[0] != 1 or (value.shape[1] == dim) == (value.shape[3] == dim):
        return None
    if value.shape[1] == dim:  # NCHW, what a resampling Resize reads
        value = value.transpose(0, 2, 3, 1)
    return value.reshape(1, -1, dim)


def _table(values: dict[str, np.ndarray | None], name: str) -> np.ndarray:
    value = values[name]
    assert value is not None  # checked by the caller
    return value


def _embeddings(g: _Graph, b: _Builder, x0: str, dim: int) -> bool:
    """Reads ``patch_embed``, ``cls_token`` and ``pos_embed`` from the tokens entering block 0.

    Returns:
        Whether the graph resamples the positional grid (a ``Resize`` on the positional side).
    """
    add = g.node(x0)
    if add is None or add.op_type != "Add":
        raise SourceError(
            "the tokens entering the first block are not tokens + positional embedding (register tokens "
            "and embeddings added elsewhere are not supported)"
        )
    sides = [g.ancestry(name) for name in add.input]
    convs = [[i for i in nodes if g.nodes[i].op_type == "Conv"] for nodes, _ in sides]
    if sorted(len(c) for c in convs) != [0, 1]:
        raise SourceError("the tokens entering the first block do not come from one patch-embedding Conv")
    tok = 0 if convs[0] else 1
    conv = g.nodes[convs[tok][0]]
    weight = g.const(conv.input[1])
    if weight is None or weight.ndim != 4 or weight.shape[0] != dim or weight.shape[2] != weight.shape[3]:
        raise SourceError(f"the patch-embedding Conv has no constant ({dim}, C, p, p) weight")
    patch = int(weight.shape[2])
    if list(_attr(conv, "strides", [1, 1])) != [patch, patch]:
        raise SourceError(f"the patch-embedding Conv's stride is not its kernel size {patch}")
    b.put("patch_embed.proj.weight", weight, [g.const_name(conv.input[1])])
    conv_names = {g.const_name(n) for n in conv.input[1:] if n}
    if len(conv.input) > 2 and conv.input[2]:
        b.put("patch_embed.proj.bias", g.value(conv.input[2]), [g.const_name(conv.input[2])])
    others = [n for n in _float_weights(g, sides[tok][1], dim) if g.const_name(n) not in conv_names]
    cls = [n for n in others if _is_cls(g.value(n), dim)]
    if len(cls) > 1 or len(others) > len(cls):
        raise SourceError(f"unexpected weights next to the patch embedding: {', '.join(others)}")
    if cls:
        b.put("cls_token", g.value(cls[0])[:1], [g.const_name(cls[0])])
    pos_nodes, pos_consts = sides[1 - tok]
    pos: np.ndarray
    tables = _float_weights(g, pos_consts, dim)
    values = {n: _as_table(g.value(n), dim) for n in tables}
    if any(v is None for v in values.values()):
        raise SourceError(f"unexpected weights in the positional embedding: {', '.join(tables)}")
    if len(tables) == 1:
        pos, names = _table(values, tables[0]), [tables[0]]
    elif len(tables) == 2:
        cls_pos = [n for n in tables if _table(values, n).shape[1] == 1]
        grid = [n for n in tables if n not in cls_pos]
        if len(cls_pos) != 1:
            raise SourceError(
                f"a positional embedding in two pieces without a CLS entry: {', '.join(tables)}"
            )
        concat = [
            g.nodes[i] for i in pos_nodes if g.nodes[i].op_type == "Concat" and cls_pos[0] in g.nodes[i].input
        ]
        if len(concat) != 1 or concat[0].input[0] != cls_pos[0]:
            raise SourceError("the CLS positional entry is not concatenated in front of the grid")
        pos = np.concatenate([_table(values, cls_pos[0]), _table(values, grid[0])], axis=1)
        names = [cls_pos[0], grid[0]]
    else:
        raise SourceError(f"cannot find the positional embedding (weights: {', '.join(tables) or 'none'})")
    b.put("pos_embed", pos, [g.const_name(n) for n in names])
    return any(g.nodes[i].op_type == "Resize" for i in pos_nodes)


def _image_size(g: _Graph) -> tuple[int, int] | None:
    for graph_input in g.inputs:
        dims = graph_input.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            return int(dims[2].dim_value), int(dims[3].dim_value)
    return None


def _read_vit(g: _Graph) -> OnnxViT:
    norms = _find_norms(g)
    if not norms:
        raise SourceError("no LayerNorm")
    linears = _find_linears(g)
    by_output = {lin.output: lin for lin in linears}
    by_input: dict[str, list[_Norm]] = defaultdict(list)
    for norm in norms:
        by_input[norm.input].append(norm)
    b = _Builder()
    x0 = x = norms[0].input
    eps: set[float] = set()
    activations: set[Activation] = set()
    heads: set[int | None] = set()
    depth = 0
    while _residual(g, x, by_output) is not None:
        x, block_eps, activation, block_heads = _block(g, b, depth, x, by_input, linears)
        eps.add(block_eps)
        activations.add(activation)
        heads.add(block_heads)
        depth += 1
    if depth == 0:
        raise SourceError("no pre-norm transformer block (x + f(LayerNorm(x))) after the first LayerNorm")
    final = _one(by_input.get(x, []), "final LayerNorm after the last block")
    b.norm("norm", final)
    eps.add(final.eps)
    dim = int(final.weight.shape[0])
    resampled = _embeddings(g, b, x0, dim)
    if len(eps) != 1 or len(activations) != 1:
        raise SourceError(
            f"the blocks disagree on LayerNorm eps {sorted(eps)} or activation {sorted(activations)}"
        )
    known = {h for h in heads if h is not None}
    if len(known) > 1:
        raise SourceError(f"the blocks disagree on the head count: {sorted(known)}")
    used = {name for names in b.origin.values() for name in names}
    unused = sorted(
        name
        for name, value in g.initializers.items()
        if value.dtype.kind in _FLOAT_KINDS and name not in used
    )
    return OnnxViT(
        state=b.state,
        origin=b.origin,
        num_heads=known.pop() if known else None,
        norm_eps=_round_f32(eps.pop()),
        activation=activations.pop(),
        image_size=_image_size(g),
        resampled=resampled,
        tokens_in=x0,
        tokens_out=final.output,
        unused=tuple(unused),
    )


def is_onnx(path: str | Path) -> bool:
    """True for a file name ending in ``.onnx`` (any case): ONNX protobufs have no magic number."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def read_onnx_vit(path: str | Path) -> OnnxViT:
    """Reads the ViT in an ONNX file (the module docstring describes how it is found).

    Args:
        path: an ``.onnx`` file (external data files next to it are read too).

    Returns:
        The ViT's state dict in DINOv2 / timm names, with what the graph says about its structure.

    Raises:
        FileNotFoundError: no such file.
        SourceError: the ``onnx`` package is missing, the file is not an ONNX model, or its graph is not a
            ViT this reader recognises (the message names the file and what was not found).
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such source checkpoint file")
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise SourceError(f"{src}: reading an ONNX file needs the onnx package: {ONNX_INSTALL}") from err
    try:
        model = onnx.load(str(src))
    except Exception as err:  # protobuf decode errors, missing external data: "cannot read this file"
        reason = f"{type(err).__name__}: {one_line(str(err))}"
        raise SourceError(f"{src}: cannot read as an ONNX model ({reason})") from err
    try:
        return _read_vit(_Graph(model.graph, numpy_helper.to_array))
    except SourceError as err:
        raise SourceError(f"{src}: not a recognisable ViT graph: {err}") from err
