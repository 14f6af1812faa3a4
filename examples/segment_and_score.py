"""Segment a folder of images from a model's attention and score the masks against a COCO annotation file.

    python examples/segment_and_score.py --out out/segment                     # synthetic val set, embedded default
    python examples/segment_and_score.py --method maskcut --layer -2 --out out/segment

The images and their COCO json are the synthetic validation set, written to a temporary folder (use your own
``--coco instances.json`` to score real data; its images are found beside it as in COCO's layout). Each image is
resized to the model's training size (aspect ratio kept), segmented on the token grid (DINO: the most-attended
patches holding 60 % of the head-averaged CLS attention; MaskCut: normalized cuts of the layer's features), and the
masks are mapped back onto the original pixels. Writes ``results.json`` (COCO results) and prints the class-agnostic
COCO AP (pycocotools) and the foreground Jaccard of the union of each image's masks with its ground truth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from crate_vis import load_model
from crate_vis.data.image_geometry import prepare_image
from crate_vis.data.synthetic import write_dataset
from crate_vis.groundtruth.coco import COCODataset
from crate_vis.io.coco import result_entry, write_results
from crate_vis.io.images import load_image
from crate_vis.metrics import coco_ap, fg_jaccard
from crate_vis.models.pretrained import default_weights
from crate_vis.segmentation.run import SegmentConfig, segment_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="project-format weights (default: the embedded default)")
    parser.add_argument("--coco", default=None, help="COCO instances json (default: a synthetic val set)")
    parser.add_argument("--method", choices=("dino", "maskcut", "tokencut"), default="dino")
    parser.add_argument("--layer", type=int, default=-1, help="layer whose attention / features are used")
    parser.add_argument("--images", type=int, default=100, help="synthetic images to write and score")
    parser.add_argument("--out", default="out/segment_and_score", help="output folder")
    parser.add_argument("--fast", action="store_true", help="a few images only (for tests)")
    args = parser.parse_args(argv)

    model = load_model(args.checkpoint or default_weights())
    side = int(model.config["image_size"][0]) if hasattr(model, "config") else 224
    patch = model.patch_size
    config = SegmentConfig(method=args.method, layer=args.layer)

    with tempfile.TemporaryDirectory() as tmp:
        if args.coco:
            coco_json = Path(args.coco)
        else:
            n = 6 if args.fast else args.images
            root = write_dataset(Path(tmp) / "synthetic", num_train=0, num_val=n, image_size=side, seed=0)
            coco_json = root / "annotations" / "instances_val.json"
            print(f"wrote {n} synthetic images and {coco_json.name} under {root}")
        data = COCODataset(coco_json)  # images are found beside the json (val/ for annotations/instances_val.json)

        results, preds, truths = [], [], []
        for image_id in data.image_ids:
            image = load_image(data.image_path(image_id))
            h, w = image.height, image.width
            prep = prepare_image(image, patch, side)  # the photo, the model input and the geometry between them
            with torch.no_grad():
                seg = segment_batch(model, prep.tensor[None], config)[0]  # (1, 3, h', w') in
            masks = prep.grid_to_image(seg.masks)  # (K, H, W) bool, at the photo's own size
            results += [result_entry(image_id, m, s) for m, s in zip(masks, seg.scores)]
            preds.append(masks.any(axis=0) if len(masks) else np.zeros((h, w), bool))
            truths.append(np.any([i.mask for i in data.instances(image_id) if not i.iscrowd], axis=0))

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        n_results = write_results(out / "results.json", results)
        ap = coco_ap(data, out / "results.json")  # class-agnostic, every ground-truth image counts
    jac = fg_jaccard(preds, truths)
    print(f"{args.method} masks from layer {args.layer}: {n_results} masks for {len(preds)} images -> "
          f"{out / 'results.json'}")  # fmt: skip
    print(f"COCO AP {ap['AP'] * 100:.1f}  AP50 {ap['AP50'] * 100:.1f}  AP75 {ap['AP75'] * 100:.1f}  "
          f"AR100 {ap['AR100'] * 100:.1f} (class-agnostic, pycocotools)")  # fmt: skip
    print(f"foreground Jaccard {jac['mean']:.3f} over {jac['n_images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
