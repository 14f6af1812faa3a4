"""Segmentation from attention: DINO masks, MaskCut / TokenCut, PCA feature maps.

All algorithms are pure functions on arrays/tensors; :mod:`crate_vis.hooks` supplies the model outputs
(``cls_attention_maps`` for DINO masks, ``subspace_features`` for MaskCut and PCA), and :mod:`crate_vis.segmentation.run`
runs a model on a batch and applies a method.
"""

from __future__ import annotations

from .dino import attention_contrast, attention_maps, dino_foreground, dino_masks, dino_threshold
from .maskcut import MaskCutResult, affinity_matrix, maskcut, ncut_value, second_smallest_eigenvector, tokencut
from .masks import largest_component, mask_iou, upsample_masks
from .pca import pca_foreground, pca_map, pca_maps
from .run import GridSegmentation, SegmentConfig, segment_batch

__all__ = [
    "GridSegmentation", "MaskCutResult", "SegmentConfig", "affinity_matrix", "attention_contrast", "attention_maps",
    "dino_foreground", "dino_masks", "dino_threshold", "largest_component", "mask_iou", "maskcut", "ncut_value",
    "pca_foreground", "pca_map", "pca_maps", "second_smallest_eigenvector", "segment_batch", "tokencut",
    "upsample_masks",
]  # fmt: skip
