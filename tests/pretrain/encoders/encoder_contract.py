"""Abstract contract every :class:`PointEncoder` passes (subclass it; `make` returns a fresh encoder)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import pytest
import torch

from pretrain.encoders import EncoderOutput, PointEncoder


def _equal_count_mask(batch: int, groups: int, count: int, gen: torch.Generator) -> torch.Tensor:
    order = torch.rand(batch, groups, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, groups, dtype=torch.bool)
    return mask.scatter_(1, order[:, :count], True)


class EncoderContract(ABC):
    """Shapes, masking semantics, gradients, layer ids, batch independence and intermediate layers."""

    num_points: int = 64

    @abstractmethod
    def make(self) -> PointEncoder:
        """A fresh, small encoder."""

    def clouds(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(batch, self.num_points, 3, generator=gen) * 2 - 1

    def test_tokenize_shapes(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        spec = enc.spec
        groups, tokens = enc.tokenize(self.clouds(2, gen))
        assert groups.centers.shape == (2, spec.num_groups, 3)
        assert groups.neighborhoods.shape == (2, spec.num_groups, spec.group_size, 3)
        assert tokens.shape == (2, spec.num_groups, enc.embed_dim)

    def test_forward_full_shapes(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        groups, tokens = enc.tokenize(self.clouds(3, gen))
        out = enc(tokens, groups.centers)
        assert isinstance(out, EncoderOutput)
        assert out.tokens.shape == tokens.shape
        torch.testing.assert_close(out.centers, groups.centers)
        assert (out.cls is not None) == enc.spec.cls_token
        if out.cls is not None:
            assert out.cls.shape == (3, enc.embed_dim)
        assert out.layers == []
        assert torch.isfinite(out.tokens).all()

    def test_keep_processes_only_kept_tokens(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        g = enc.spec.num_groups
        groups, tokens = enc.tokenize(self.clouds(2, gen))
        keep = _equal_count_mask(2, g, g // 4, gen)
        out = enc(tokens, groups.centers, keep=keep)
        assert out.tokens.shape == (2, g // 4, enc.embed_dim)
        torch.testing.assert_close(out.centers, groups.centers[keep].reshape(2, -1, 3))
        # identical to encoding the pre-selected tokens: dropped tokens have no influence
        direct = enc(tokens[keep].reshape(2, g // 4, -1), groups.centers[keep].reshape(2, -1, 3))
        torch.testing.assert_close(out.tokens, direct.tokens)

    def test_keep_needs_equal_counts(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        groups, tokens = enc.tokenize(self.clouds(2, gen))
        keep = torch.ones(2, enc.spec.num_groups, dtype=torch.bool)
        keep[0, 0] = False
        with pytest.raises(ValueError, match="same number"):
            enc(tokens, groups.centers, keep=keep)

    def test_replace_semantics(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        g = enc.spec.num_groups
        groups, tokens = enc.tokenize(self.clouds(2, gen))
        none = torch.zeros(2, g, dtype=torch.bool)
        if not enc.spec.mask_token:
            with pytest.raises(ValueError, match="mask_token"):
                enc(tokens, groups.centers, replace=none)
            return
        torch.testing.assert_close(
            enc(tokens, groups.centers, replace=none).tokens, enc(tokens, groups.centers).tokens
        )
        some = _equal_count_mask(2, g, g // 2, gen)
        replaced = enc(tokens, groups.centers, replace=some)
        assert replaced.tokens.shape == tokens.shape  # positions kept, BERT style
        assert not torch.allclose(replaced.tokens, enc(tokens, groups.centers).tokens)

    def test_every_parameter_gets_a_gradient(self, gen: torch.Generator) -> None:
        torch.manual_seed(0)  # drop-path draws from the default generator: fix the draws, keep the test exact
        enc = self.make().train()
        g = enc.spec.num_groups
        groups, tokens = enc.tokenize(self.clouds(2, gen))
        replace = _equal_count_mask(2, g, g // 2, gen) if enc.spec.mask_token else None
        out = enc(tokens, groups.centers, replace=replace)
        loss = out.tokens.square().mean() + (out.cls.square().mean() if out.cls is not None else 0.0)
        loss.backward()
        assert [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []

    def test_batch_independence_in_eval(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        xyz = self.clouds(3, gen)
        batched = enc.encode(xyz)
        for i in range(3):
            single = enc.encode(xyz[i : i + 1])
            torch.testing.assert_close(single.tokens[0], batched.tokens[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(enc.pool(single)[0], enc.pool(batched)[i], atol=1e-5, rtol=1e-5)

    def test_return_layers(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        depth = enc.spec.depth
        groups, tokens = enc.tokenize(self.clouds(2, gen))
        out = enc(tokens, groups.centers, return_layers=(depth - 1, 0, -1))
        assert len(out.layers) == 3
        for layer in out.layers:
            assert layer.shape == out.tokens.shape
        torch.testing.assert_close(out.layers[0], out.layers[2])
        # the final tokens are the normalised output of the last block
        norm = enc.norm if isinstance(getattr(enc, "norm", None), torch.nn.LayerNorm) else None
        if norm is not None:
            torch.testing.assert_close(norm(out.layers[0]), out.tokens)
        with pytest.raises(ValueError, match="return_layers"):
            enc(tokens, groups.centers, return_layers=(depth,))

    def test_pool(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        out = enc.encode(self.clouds(2, gen))
        pooled = enc.pool(out)
        assert pooled.shape == (2, 2 * enc.embed_dim) == (2, enc.pooled_dim)
        first = out.cls if out.cls is not None else out.tokens.max(dim=1).values
        torch.testing.assert_close(pooled[:, : enc.embed_dim], first)

    def test_encode_is_tokenize_then_forward(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        xyz = self.clouds(2, gen)
        groups, tokens = enc.tokenize(xyz)
        torch.testing.assert_close(enc.encode(xyz).tokens, enc(tokens, groups.centers).tokens)

    def test_rejects_bad_inputs(self, gen: torch.Generator) -> None:
        enc = self.make().eval()
        groups, tokens = enc.tokenize(self.clouds(1, gen))
        with pytest.raises(ValueError, match="tokens"):
            enc(tokens[..., :-1], groups.centers)
        with pytest.raises(ValueError, match="centers"):
            enc(tokens, groups.centers[:, :-1])
        with pytest.raises(ValueError, match="at least"):
            enc.tokenize(torch.rand(1, 4, 3))
