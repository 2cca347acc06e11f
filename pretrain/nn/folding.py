"""FoldingNet-style patch decoder of the Point-BERT dVAE (Yu et al., CVPR 2022).

Per patch: an MLP maps the feature to ``M = K / 4`` coarse points; every coarse point is expanded by a 2×2
grid in ``[-0.05, 0.05]²`` into 4 fine points, whose offsets are predicted by a per-point Conv1d stack on
``[feature, grid, coarse]`` (256 + 2 + 3 = 261 channels officially) and added to the coarse point. Output is
in centre-relative patch coordinates.

Fine point ``m·4 + s`` belongs to coarse point ``m`` and grid corner ``s``; the corners are
``(-0.05, -0.05), (0.05, -0.05), (-0.05, 0.05), (0.05, 0.05)`` (first coordinate varying fastest), as in the
official ``Decoder``. Parameter names (``mlp.{0,2,4}``, ``final_conv.{0,1,3,4,6}``) match it too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FoldingDecoder", "folding_grid"]

GRID_SIZE = 2


def folding_grid(grid_size: int = GRID_SIZE, scale: float = 0.05) -> Tensor:
    """The folding seed: a ``grid_size``² grid in ``[-scale, scale]²``, first coordinate varying fastest.

    Shapes:
        returns: (grid_size², 2).
    """
    steps = torch.linspace(-scale, scale, steps=grid_size)
    first = steps.repeat(grid_size)  # varies fastest
    second = steps.repeat_interleave(grid_size)
    return torch.stack([first, second], dim=-1)


class FoldingDecoder(nn.Module):
    """Decodes one feature per patch into coarse and fine patch points.

    Args:
        in_dim: patch feature width (``decoder_dims``, 256 officially).
        num_fine: fine points per patch (the group size K); a multiple of 4.
        hidden_dim: width of the coarse MLP (1024 officially).
        fold_dim: width of the folding Conv1d stack (512 officially).
        grid_scale: half-width of the folding grid (0.05 officially).

    Raises:
        ValueError: ``num_fine`` not a positive multiple of 4, or non-positive widths.
    """

    grid: Tensor

    def __init__(
        self,
        in_dim: int,
        num_fine: int,
        *,
        hidden_dim: int = 1024,
        fold_dim: int = 512,
        grid_scale: float = 0.05,
    ) -> None:
        super().__init__()
        cells = GRID_SIZE**2
        if (
            isinstance(num_fine, bool)
            or not isinstance(num_fine, int)
            or num_fine < cells
            or num_fine % cells
        ):
            raise ValueError(f"num_fine must be a positive multiple of {cells}, got {num_fine!r}")
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("fold_dim", fold_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_dim = in_dim
        self.num_fine = num_fine
        self.num_coarse = num_fine // cells
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 3 * self.num_coarse),
        )
        self.final_conv = nn.Sequential(
            nn.Conv1d(in_dim + 2 + 3, fold_dim, 1),
            nn.BatchNorm1d(fold_dim),
            nn.ReLU(inplace=True),
            nn.Conv1d(fold_dim, fold_dim, 1),
            nn.BatchNorm1d(fold_dim),
            nn.ReLU(inplace=True),
            nn.Conv1d(fold_dim, 3, 1),
        )
        self.register_buffer("grid", folding_grid(GRID_SIZE, grid_scale), persistent=False)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Decodes patches.

        Args:
            features: (B, G, in_dim) one feature per patch.

        Returns:
            ``(coarse (B, G, M, 3), fine (B, G, K, 3))`` centre-relative points, ``M = K / 4``.
        """
        if features.ndim != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(f"features must have shape (B, G, {self.in_dim}), got {tuple(features.shape)}")
        batch, groups, channels = features.shape
        flat = features.reshape(batch * groups, channels)
        coarse = self.mlp(flat).reshape(batch * groups, self.num_coarse, 3)
        cells = self.grid.shape[0]
        anchor = coarse.repeat_interleave(cells, dim=1)  # (BG, K, 3): coarse point m for fine m*4 + s
        grid = self.grid.to(features.dtype).repeat(self.num_coarse, 1)  # (K, 2): corner s for fine m*4 + s
        grid = grid.unsqueeze(0).expand(batch * groups, -1, -1)
        feat = torch.cat([flat.unsqueeze(1).expand(-1, self.num_fine, -1), grid, anchor], dim=-1)
        fine = self.final_conv(feat.transpose(1, 2)).transpose(1, 2) + anchor
        return (
            coarse.reshape(batch, groups, self.num_coarse, 3),
            fine.reshape(batch, groups, self.num_fine, 3),
        )
