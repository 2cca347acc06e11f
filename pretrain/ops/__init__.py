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
from pretrain.ops.virtual_projection import (
    cells_1d,
    cells_2d,
    interpolate_table_1d,
    num_cells_1d,
    num_cells_2d,
    official_layout_2d,
    pixels_2d,
    positions_1d,
    project_to_views,
    raw_positions_1d,
    rescale_positions_1d,
    sample_table_2d,
    view_rotations,
    virtual_pos_embed_1d,
    virtual_pos_embed_2d,
)
from pretrain.ops.voxel_cluster import (
    gather_segments,
    same_cell_mask,
    segment_counts,
    segment_reduce,
    segment_reduce_broadcast,
    voxel_cluster,
)

__all__ = [
    "PatchGroups",
    "augment_images",
    "augment_point_views",
    "block_group_mask",
    "cells_1d",
    "cells_2d",
    "chamfer_distance",
    "farthest_point_sample",
    "gather_points",
    "gather_segments",
    "gather_with_grad",
    "group_points",
    "interpolate_table_1d",
    "knn",
    "nearest_sqdist",
    "normalize_unit_sphere",
    "nt_xent",
    "num_cells_1d",
    "num_cells_2d",
    "official_layout_2d",
    "pairwise_sqdist",
    "pixels_2d",
    "positions_1d",
    "project_to_views",
    "random_group_mask",
    "random_point_subset",
    "random_segment_mask",
    "raw_positions_1d",
    "rescale_positions_1d",
    "same_cell_mask",
    "sample_table_2d",
    "scale_and_translate",
    "segment_counts",
    "segment_reduce",
    "segment_reduce_broadcast",
    "split_by_mask",
    "view_rotations",
    "virtual_pos_embed_1d",
    "virtual_pos_embed_2d",
    "voxel_cluster",
]
