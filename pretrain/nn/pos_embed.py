"""Positional embedding of patch centres, as in Point-BERT and Point-MAE."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CenterPosEmbed"]


class CenterPosEmbed(nn.Sequential):
    """MLP on patch-centre coordinates: Linear(3→hidden), GELU, Linear(hidden→dim).

    A ``Sequential`` so parameter names are ``0.*`` and ``2.*``, matching the official ``pos_embed``.

    Args:
        dim: output width (the transformer width).
        hidden: hidden width (128 in the official models).
        in_dim: coordinate dimension.
    """

    def __init__(self, dim: int, hidden: int = 128, in_dim: int = 3) -> None:
        if min(dim, hidden, in_dim) < 1:
            raise ValueError(f"dim, hidden and in_dim must be >= 1, got {dim}, {hidden}, {in_dim}")
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, centers: Tensor) -> Tensor:  # type: ignore[override]
        """Embeds centres.

        Args:
            centers: (..., 3) coordinates, e.g. (B, G, 3).

        Returns:
            (..., dim) embeddings.
        """
        out: Tensor = super().forward(centers)
        return out
