"""Exact geometric ops in pure torch: FPS, kNN, patch grouping, masks, Chamfer distance and batch transforms.

Batched and channels-last (``xyz (B, N, 3)``, features ``(B, N, C)``, indices ``(B, S)`` long), CPU and
CUDA, explicit ``torch.Generator`` wherever randomness is drawn. They reproduce the custom CUDA ops of
Point-BERT / Point-MAE (pointnet2_ops FPS, KNN_CUDA, chamfer_dist) without compiling anything.
"""

from pretrain.ops.chamfer import chamfer_distance, nearest_sqdist
from pretrain.ops.contrastive import gather_with_grad, nt_xent
from pretrain.ops.grouping import PatchGroups, gather_points, group_points
from pretrain.ops.masking import block_group_mask, random_group_mask, random_segment_mask, split_by_mask
from pretrain.ops.neighbors import knn, pairwise_sqdist
from pretrain.ops.sampling import farthest_point_sample
from pretrain.ops.transforms import normalize_unit_sphere, random_point_subset, scale_and_translate
from pretrain.ops.view_augment import augment_images, augment_point_views

__all__ = [
    "PatchGroups",
    "augment_images",
    "augment_point_views",
    "block_group_mask",
    "chamfer_distance",
    "farthest_point_sample",
    "gather_points",
    "gather_with_grad",
    "group_points",
    "knn",
    "nearest_sqdist",
    "normalize_unit_sphere",
    "nt_xent",
    "pairwise_sqdist",
    "random_group_mask",
    "random_point_subset",
    "random_segment_mask",
    "scale_and_translate",
    "split_by_mask",
]
