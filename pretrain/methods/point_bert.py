"""Point-BERT stage 2: masked point modelling with a frozen dVAE tokenizer (Yu et al., CVPR 2022).

group → tokenize (encoder) and token targets (frozen dVAE, argmax, no noise) → block mask (per-sample ratio
U(0.25, 0.45)), masked tokens replaced by the mask token → encode → ``lm_head`` → CE at masked patches. The
point-patch mixing branch mixes the patches of every cloud with the mirrored cloud of the batch (ratio
ρ ~ U(0, 1) per cloud), masks and encodes the mixed clouds (CE on their mixed targets) and contrasts the
projected CLS of each mixed cloud with the keys of a momentum encoder (EMA m = 0.999, unmixed masked input)
and a queue of 16,384 keys: soft targets ρ (own key) and 1 − ρ (partner key), T = 0.07. Keys are gathered
from all ranks (``self.all_gather``) before they enter the queue, so every rank holds the same queue.

Differences from the official code, on purpose: the frozen dVAE runs in eval mode (the official model
leaves its BatchNorm in training mode, so targets depend on the batch); the momentum copy covers the
encoder and the projection head only (the official EMA also copies ``lm_head``, which keys never use); the
queue write wraps around instead of requiring ``K`` to be a multiple of the global batch.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.dvae import load_dvae
from pretrain.encoders import PointViT, PointViTSpec
from pretrain.losses import masked_token_ce, mixup_contrastive_loss, moco_loss
from pretrain.methods.base import PretrainModule
from pretrain.ops import block_group_mask
from pretrain.ops.grouping import PatchGroups

__all__ = ["PointBERT", "enqueue_keys", "mix_patches"]


def mix_patches(
    neighborhoods: Tensor, centers: Tensor, targets: Tensor, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Point-patch mixing of every cloud with the mirrored batch.

    Every patch of cloud ``i`` comes from cloud ``i`` with probability ``ρ_i``, else from cloud ``B − 1 − i``,
    with ``ρ_i ~ U(0, 1)``. Draws ``ρ`` (B,) then the per-patch uniforms (B, G) from ``generator`` (on its
    device).

    Shapes:
        neighborhoods: (B, G, K, 3), centers: (B, G, 3), targets: (B, G) long.
        returns: ratio (B,), mixed neighborhoods, centers and targets of the input shapes.
    """
    batch, num_groups = centers.shape[:2]
    draw_device = generator.device if generator is not None else torch.device("cpu")
    ratio = torch.rand(batch, generator=generator, device=draw_device)
    own = torch.rand(batch, num_groups, generator=generator, device=draw_device) < ratio.unsqueeze(1)
    ratio, own = ratio.to(centers.device), own.to(centers.device)
    mixed_neighborhoods = torch.where(own[..., None, None], neighborhoods, neighborhoods.flip(0))
    mixed_centers = torch.where(own[..., None], centers, centers.flip(0))
    return ratio, mixed_neighborhoods, mixed_centers, torch.where(own, targets, targets.flip(0))


@torch.no_grad()
def enqueue_keys(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """Writes ``keys`` into the ring buffer ``queue`` at ``ptr`` (wrapping around) and advances ``ptr``.

    Shapes:
        queue: (C, K) updated in place; ptr: (1,) long, updated in place; keys: (n, C) with ``n <= K``.

    Raises:
        ValueError: more keys than queue slots, or a width mismatch.
    """
    size = queue.shape[1]
    if keys.ndim != 2 or keys.shape[1] != queue.shape[0] or keys.shape[0] > size:
        raise ValueError(f"keys must be (n <= {size}, {queue.shape[0]}), got {tuple(keys.shape)}")
    start = int(ptr[0])
    slots = (start + torch.arange(keys.shape[0], device=queue.device)) % size
    queue[:, slots] = keys.T.to(queue.dtype)
    ptr[0] = (start + keys.shape[0]) % size


class PointBERT(PretrainModule):
    """Masked point modelling against dVAE token ids, with the point-patch mixing contrast.

    Args:
        encoder: encoder architecture; needs ``cls_token``, ``mask_token``, the dVAE's group settings and
            ``tokenizer_dim`` (its point tokenizer's mini-PointNet starts from the dVAE's, as officially).
        dvae: path of the ``dvae_tokenizer`` artifact (stage 1); loaded strictly and frozen.
        mask_type: ``"block"`` (official: the patches nearest a random centre) or ``"rand"`` (official
            ``mask_rand``: one ratio per batch, each patch masked independently with that probability).
        mask_ratio: ``(lo, hi)``: masked fraction drawn from ``U(lo, hi)``.
        momentum: EMA coefficient of the key encoder (0.999).
        queue_size: keys in the queue K (16,384).
        proj_dim: width of the contrastive projection ``cls_head`` (512).
        temperature: contrastive temperature T (0.07).
        mixup: run the point-patch mixing branch (its token loss and contrastive loss; official: on).
        moco: add the plain MoCo term (official: off).
        **kwargs: optimiser (official: AdamW lr 5e-4, weight decay 0.05), schedule (3 warmup epochs), data
            contract and seed of masks, mixing and the queue's initial values (see :class:`PretrainModule`).
    """

    method_name = "PointBERT"
    encoder: PointViT
    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        encoder: PointViTSpec,
        dvae: str,
        *,
        mask_type: Literal["block", "rand"] = "block",
        mask_ratio: tuple[float, float] = (0.25, 0.45),
        momentum: float = 0.999,
        queue_size: int = 16384,
        proj_dim: int = 512,
        temperature: float = 0.07,
        mixup: bool = True,
        moco: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        if not isinstance(self.encoder, PointViT):
            raise ValueError(f"PointBERT trains a point_vit encoder, got arch {encoder.arch!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        lo, hi = (float(r) for r in mask_ratio)
        if not 0.0 <= lo <= hi <= 1.0 or hi == 0.0:
            raise ValueError(f"mask_ratio must satisfy 0 <= lo <= hi <= 1 with hi > 0, got {mask_ratio!r}")
        if not 0.0 <= momentum < 1.0 or queue_size < 1 or proj_dim < 1 or not temperature > 0:
            raise ValueError(
                f"need 0 <= momentum < 1, queue_size >= 1, proj_dim >= 1, temperature > 0; got {momentum}, "
                f"{queue_size}, {proj_dim}, {temperature}"
            )
        self.mask_type, self.mask_ratio = mask_type, (lo, hi)
        self.momentum, self.temperature, self.mixup, self.moco = momentum, temperature, mixup, moco
        self.dvae, _ = load_dvae(dvae)
        self.dvae.requires_grad_(False).eval()
        self._check_compatible(self.encoder.spec)
        # the official _prepare_encoder: the point tokenizer's mini-PointNet starts as the dVAE's encoder
        self.encoder.tokenizer.load_state_dict(self.dvae.encoder.state_dict())
        dim = self.encoder.spec.embed_dim
        self.lm_head = nn.Linear(dim, self.dvae.spec.codebook_size)
        self.cls_head = nn.Sequential(nn.Linear(dim, proj_dim), nn.GELU(), nn.Linear(proj_dim, proj_dim))
        for layer in (self.lm_head, *self.cls_head):
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.momentum_cls_head = copy.deepcopy(self.cls_head).requires_grad_(False)
        init = torch.randn(proj_dim, queue_size, generator=torch.Generator().manual_seed(self.seed))
        self.register_buffer("queue", F.normalize(init, dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _check_compatible(self, spec: PointViTSpec) -> None:
        tok = self.dvae.spec
        if not (spec.cls_token and spec.mask_token):
            raise ValueError("PointBERT needs an encoder spec with cls_token=True and mask_token=True")
        mismatch = [
            f"{name}: encoder {getattr(spec, name)} vs tokenizer {getattr(tok, name)}"
            for name in ("num_groups", "group_size", "tokenizer_dim")
            if getattr(spec, name) != getattr(tok, name)
        ]
        if mismatch:
            raise ValueError(f"encoder spec does not match the dVAE tokenizer: {'; '.join(mismatch)}")

    def train(self, mode: bool = True) -> PointBERT:
        """Switches training mode; the frozen tokenizer always stays in eval mode."""
        super().train(mode)
        self.dvae.eval()
        return self

    # ------------------------------------------------------------------------------------------ pieces
    def make_mask(self, centers: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Bool (B, G) mask, True = replaced by the mask token."""
        if self.mask_type == "block":
            return block_group_mask(centers, self.mask_ratio, generator=generator)
        lo, hi = self.mask_ratio
        draw_device = generator.device if generator is not None else torch.device("cpu")
        rate = lo + (hi - lo) * torch.rand((), generator=generator, device=draw_device)
        return (torch.rand(centers.shape[:2], generator=generator, device=draw_device) < rate).to(
            centers.device
        )

    @torch.no_grad()
    def token_targets(self, groups: PatchGroups) -> Tensor:
        """Token ids (B, G) of the frozen dVAE for the batch's patches, in float32 even under autocast."""
        with torch.autocast(device_type=groups.centers.device.type, enabled=False):
            return self.dvae.token_ids(groups.neighborhoods.float(), groups.centers.float())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``θ_k ← m·θ_k + (1 − m)·θ_q`` for the key encoder and projection head."""
        pairs = ((self.encoder, self.momentum_encoder), (self.cls_head, self.momentum_cls_head))
        for online, target in pairs:
            for p_q, p_k in zip(online.parameters(), target.parameters()):
                p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def momentum_keys(self, groups: PatchGroups, generator: torch.Generator | None = None) -> Tensor:
        """L2-normalised keys (B, proj_dim) of the momentum encoder on the unmixed clouds, freshly masked."""
        tokens = self.momentum_encoder.embed(groups.neighborhoods)
        mask = self.make_mask(groups.centers, generator)
        out = self.momentum_encoder(tokens, groups.centers, replace=mask)
        return F.normalize(self.momentum_cls_head(out.cls), dim=1)

    def query(self, neighborhoods: Tensor, centers: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encodes masked clouds -> (token logits (B, G, V), CLS (B, D))."""
        out = self.encoder(self.encoder.embed(neighborhoods), centers, replace=mask)
        if out.cls is None:
            raise RuntimeError("the encoder returned no CLS token")
        return self.lm_head(out.tokens), out.cls

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Adds the keys of every rank (rank order) to the queue; identical on all ranks."""
        if self._trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(keys)  # (world, B, C), rank order
            if not isinstance(gathered, Tensor):
                raise RuntimeError(f"all_gather returned {type(gathered).__name__}, expected a tensor")
            keys = gathered.flatten(0, 1)
        enqueue_keys(self.queue, self.queue_ptr, keys)

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = self.batch_points(batch)
        generator = self.step_generator()
        groups = self.encoder.group(points, generator=generator)
        targets = self.token_targets(groups)
        mask = self.make_mask(groups.centers, generator)
        logits, cls = self.query(groups.neighborhoods, groups.centers, mask)
        losses = {"train/loss_token": masked_token_ce(logits, targets, mask)}
        if not (self.mixup or self.moco):
            return self._log_step(losses, logits, targets, mask)
        queue = self.queue.clone()  # the keys of this step enter the queue only after the losses
        self.momentum_update()
        keys = self.momentum_keys(groups, generator)
        if self.mixup:
            ratio, mixed_neigh, mixed_centers, mixed_targets = mix_patches(
                groups.neighborhoods, groups.centers, targets, generator=generator
            )
            mixed_mask = self.make_mask(mixed_centers, generator)
            mixed_logits, mixed_cls = self.query(mixed_neigh, mixed_centers, mixed_mask)
            losses["train/loss_token_mixed"] = masked_token_ce(mixed_logits, mixed_targets, mixed_mask)
            q_mixed = F.normalize(self.cls_head(mixed_cls), dim=1)
            losses["train/loss_mixup"] = mixup_contrastive_loss(q_mixed, keys, queue, ratio, self.temperature)
        if self.moco:
            q = F.normalize(self.cls_head(cls), dim=1)
            losses["train/loss_moco"] = moco_loss(q, keys, queue, self.temperature)
        self.enqueue(keys)
        return self._log_step(losses, logits, targets, mask)

    def _log_step(self, losses: dict[str, Tensor], logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        loss = torch.stack(list(losses.values())).sum()
        size = mask.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({**losses, "train/token_acc": _masked_accuracy(logits, targets, mask)}, batch_size=size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Masked-token cross-entropy and accuracy with the same masks at every validation."""
        points = self.batch_points(batch)
        generator = torch.Generator().manual_seed(self.seed + batch_idx)
        groups = self.encoder.group(points)
        targets = self.token_targets(groups)
        mask = self.make_mask(groups.centers, generator)
        logits, _ = self.query(groups.neighborhoods, groups.centers, mask)
        loss = masked_token_ce(logits, targets, mask)
        metrics = {"val/loss_token": loss, "val/token_acc": _masked_accuracy(logits, targets, mask)}
        self.log_dict(metrics, batch_size=points.shape[0], sync_dist=True)
        return loss


def _masked_accuracy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Fraction of masked patches whose predicted token id is the target (0 when nothing is masked)."""
    hits = (logits.detach().argmax(-1) == targets) & mask
    return hits.sum().float() / mask.sum().clamp_min(1)
