"""The main job end to end on built-in data: the Python side of ``crate-vis demo``.

1. **Real photos** (the public-domain / CC0 sample photos shipped in ``crate_vis/sample_images``): per-head CLS
   attention figures, segmentation overlays and the head-wise part figure, with the embedded default for photos
   (a CRATE trained on real photos; :data:`crate_vis.models.pretrained.DEFAULT_WEIGHTS_NAME`).
2. **Scored synthetic images**: held-out images of the built-in synthetic dataset (with ground-truth masks) are
   segmented with the synthetic-shapes model, scored against their masks (foreground Jaccard, class-agnostic COCO
   AP) and drawn as a head figure with per-head scores.

Every step is the same function the command line calls; the equivalent commands are printed so they can be re-run
or pointed at other images.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io.images import list_images

__all__ = ["DemoConfig", "run_demo", "sample_images", "SAMPLE_DIR", "SYNTHETIC_WEIGHTS"]

#: The sample photos shipped with the package (see its README for their licences).
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_images"

#: The model of the scored synthetic part.
SYNTHETIC_WEIGHTS = "crate_mini_patch8_96.synthetic"


def sample_images() -> list[Path]:
    """The shipped sample photos, sorted."""
    return list_images(SAMPLE_DIR)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (the flags of ``crate-vis demo``)."""

    images: int = 8
    method: str | None = None
    seed: int = 0
    device: str | None = None
    photos_checkpoint: str | None = None
    synthetic_checkpoint: str | None = None
    photos: bool = True
    synthetic: bool = True

    def __post_init__(self) -> None:
        if self.images < 1:
            raise UsageError(f"--images must be at least 1, got {self.images}")
        if self.method not in (None, "dino", "maskcut", "tokencut"):
            raise UsageError(f"--method must be dino, maskcut or tokencut, got {self.method!r}")
        if not (self.photos or self.synthetic):
            raise UsageError("nothing to do: both parts of the demo are switched off")


def _say(title: str, argv: list[str]) -> None:
    print(f"\n== {title}\n$ crate-vis {shlex.join(argv)}", flush=True)


def run_demo(out: str | Path, config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run the demo into ``out`` and return what it wrote and scored."""
    from ..models import resolve_model
    from ..models.pretrained import DEFAULT_WEIGHTS_NAME
    from .attention import AttentionConfig, attention_figures
    from .heads import HeadsConfig, heads_figure
    from .segment import SegmentRunConfig, segment_images

    out = Path(out)
    summary: dict[str, Any] = {}
    from ..models import recommended_settings
    from ..segmentation.run import recommended_config

    dev = ["--device", config.device] if config.device else []
    how = ["--method", config.method] if config.method else []  # else: what the weights recommend
    if config.photos:
        photos = sample_images()
        spec = config.photos_checkpoint or DEFAULT_WEIGHTS_NAME
        model = resolve_model(spec, device=config.device)
        where = out / "photos"
        print(f"demo part 1: {len(photos)} sample photos ({SAMPLE_DIR}), model {spec}")
        _say("per-head attention", ["attention", str(SAMPLE_DIR), "--out", str(where / "attention"), "-c", spec, *dev])
        attention_figures(photos, model, where / "attention", AttentionConfig(dpi=120))
        _say("segmentation", ["segment", str(SAMPLE_DIR), "--out", str(where / "segment"), "-c", spec, *how,
                              "--overwrite", *dev])  # fmt: skip
        rec = recommended_settings(model)
        run = SegmentRunConfig(segment=recommended_config(rec, method=config.method), size=rec.get("img_size"),
                               mode="overwrite")  # fmt: skip
        info = segment_images(photos, model, where / "segment", run)
        _say("head-wise part figure", ["heads", str(SAMPLE_DIR), "--out", str(where / "heads.png"), "-c", spec, *dev])
        written, _ = heads_figure(photos, [model], where / "heads.png", HeadsConfig(max_images=len(photos), dpi=120))
        summary["photos"] = {"attention": str(where / "attention"), "segment": str(where / "segment"),
                             "heads": [str(w) for w in written], "masks": info["masks"]}  # fmt: skip
    if config.synthetic:
        summary["synthetic"] = _synthetic_part(out / "synthetic", config, how, dev)
    print(f"\ndone: {out}")
    return summary


def _synthetic_part(where: Path, config: DemoConfig, how: list[str], dev: list[str]) -> dict[str, Any]:
    from ..data.synthetic import write_dataset
    from ..models import recommended_settings, resolve_model
    from ..segmentation.run import recommended_config
    from .heads import HeadsConfig, heads_figure
    from .score import ScoreConfig, format_table, score_predictions
    from .segment import SegmentRunConfig, segment_images

    spec = config.synthetic_checkpoint or SYNTHETIC_WEIGHTS
    model = resolve_model(spec, device=config.device)
    data = write_dataset(where / "images", num_train=0, num_val=config.images, image_size=96, seed=config.seed,
                         overwrite=True)  # fmt: skip
    gt = data / "annotations" / "instances_val.json"
    print(f"\ndemo part 2: {config.images} synthetic images with ground-truth masks in {data / 'val'}; model {spec}")
    _say("segmentation", ["segment", str(gt), "--out", str(where / "segment"), "-c", spec, *how, "--overwrite",
                          *dev])  # fmt: skip
    rec = recommended_settings(model)
    run = SegmentRunConfig(segment=recommended_config(rec, method=config.method), size=rec.get("img_size"),
                           mode="overwrite")  # fmt: skip
    segment_images([gt], model, where / "segment", run)
    scores = {}
    for protocol, extra in (("jaccard", []), ("coco", ["--iou-type", "segm"])):
        _say(f"score ({protocol})", ["score", "--pred", str(where / "segment"), "--gt", str(gt), "--protocol",
                                     protocol, *extra])  # fmt: skip
        res = score_predictions(where / "segment", gt, ScoreConfig(protocol=protocol, iou_type="segm"))
        print(format_table(res))
        scores[protocol] = res
    _say("head-wise part figure", ["heads", str(data / "val"), "--out", str(where / "heads.png"), "--gt", str(gt),
                                   "-c", spec, *dev])  # fmt: skip
    written, _ = heads_figure([data / "val"], [model], where / "heads.png", HeadsConfig(gt=str(gt), dpi=120))
    return {"segment": str(where / "segment"), "heads": [str(w) for w in written],
            "jaccard": scores["jaccard"]["mean"], "coco_ap": scores["coco"]["segm"]["AP"]}  # fmt: skip
