"""``crate-vis`` console entry point: a thin layer over the Python API.

Each sub-command lives in a module exposing ``add_arguments(parser)`` and ``run(args) -> int`` (a module serving
several commands names them ``add_arguments_<cmd>`` / ``run_<cmd>``); modules are imported only when their command
runs, so ``crate-vis --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import CrateVisError

__all__ = ["main", "COMMANDS"]

#: name -> (module under crate_vis.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the main job end to end: attention, segmentation and head figures of built-in photos, then "
             "segment and score built-in synthetic images against their masks"),
    "info": ("models", "build a model and print its summary (parameters, geometry, FLOPs)"),
    "list-models": ("models", "list registered model names and known weights"),
    "convert": ("models", "convert an official CRATE, CRATE-alpha or CRATE-MAE checkpoint to the project format"),
    "train": ("train", "train or fine-tune CRATE or a timm ViT on an image folder"),
    "eval": ("evaluate", "evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix"),
    "analyze": ("analyze", "layer-wise coding rate and sparsity over a dataset, with a random-init baseline"),
    "segment": ("segment", "DINO / MaskCut / TokenCut segmentation from attention, as PNG masks and COCO json"),
    "score": ("score", "score segmentations: COCO AP, Jaccard, mIoU, CorLoc, saliency, per-head parts"),
    "attention": ("attention", "per-head CLS attention overlays and thresholded masks per image"),
    "heads": ("heads", "the head-wise part figure: images x heads, with a part map and consistency scores"),
    "emergence": ("emergence", "train CRATE and a matched ViT on synthetic data and score emergent segmentation"),
    "reconstruct": ("reconstruct", "masked reconstructions by a CRATE-MAE: input, masked, reconstructed, PSNR"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the sub-parser of ``command`` gets its module's arguments."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="crate-vis", description="CRATE white-box transformers toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"crate-vis {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = _module(name)
            add = getattr(module, f"add_arguments_{name.replace('-', '_')}", None) or module.add_arguments
            add(p)
    return parser


def _module(name: str):  # noqa: ANN202
    return importlib.import_module(f"crate_vis.cli.{COMMANDS[name][0]}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``crate-vis``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    module = _module(args.command)
    run = getattr(module, f"run_{args.command.replace('-', '_')}", None) or module.run
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (``crate-vis list-models | head``): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CrateVisError, FileNotFoundError, ValueError, KeyError, OSError) as err:
        # Everything crate-vis raises on purpose is a CrateVisError (or a plain ValueError / FileNotFoundError from
        # a library): one line for the user. A bug keeps its traceback.
        if args.verbose:
            raise
        print(f"crate-vis {args.command}: error: {_message(err)}", file=sys.stderr)
        return 1


def _message(err: BaseException) -> str:
    """One line: a KeyError's message without the quotes repr adds; disk-full errors said as such."""
    import errno

    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full while writing {err.filename or 'a file'}"
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


if __name__ == "__main__":
    sys.exit(main())
