"""Segmentation from attention: DINO masks, MaskCut / TokenCut, PCA feature maps, bilateral-solver refinement.

All algorithms are pure functions on arrays/tensors; :mod:`crate_vis.hooks` supplies the model outputs
(``cls_attention_maps`` for DINO masks, ``subspace_features`` for MaskCut and PCA), and :mod:`crate_vis.segmentation.run`
runs a model on a batch and applies a method; :mod:`crate_vis.segmentation.bilateral` refines image-size masks along
the photo's edges (TokenCut's fast bilateral solver).
"""

from __future__ import annotations

from .bilateral import BilateralParams, RefineResult, refine_masks
from .dino import attention_contrast, attention_maps, dino_foreground, dino_masks, dino_threshold
from .maskcut import MaskCutResult, affinity_matrix, maskcut, ncut_value, second_smallest_eigenvector, tokencut
from .masks import largest_component, mask_iou, upsample_masks
from .pca import pca_foreground, pca_map, pca_maps
from .run import GridSegmentation, SegmentConfig, segment_batch

__all__ = [
    "BilateralParams", "GridSegmentation", "MaskCutResult", "RefineResult", "SegmentConfig", "affinity_matrix",
    "attention_contrast", "attention_maps", "dino_foreground", "dino_masks", "dino_threshold", "largest_component",
    "mask_iou", "maskcut", "ncut_value", "pca_foreground", "pca_map", "pca_maps", "refine_masks",
    "second_smallest_eigenvector", "segment_batch", "tokencut", "upsample_masks",
]  # fmt: skip
