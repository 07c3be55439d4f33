"""Train a model from a recipe, on any number of processes.

    accelerate launch scripts/train.py --config configs/coco_pcme.yaml [key=value ...] [--resume] [--push_to_hub user/repo]
    python scripts/train.py --config configs/shapes_pcme.yaml train.max_steps=20 output_dir=runs/x

Overrides are dotted ``section.key=value`` pairs parsed as YAML scalars. The recipe is checked
completely (unknown keys, wrong types) before anything is built or written. ``--resume``
continues from the newest complete checkpoint in ``output_dir/checkpoints``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=20")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the trained model to this Hub repo")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    from hf_pcme.training.config import load_recipe

    try:
        recipe = load_recipe(args.config, args.overrides)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2 before anything is built

    from hf_pcme.training.trainer import train

    result = train(recipe, resume=args.resume, push_to_hub=args.push_to_hub)
    from accelerate import PartialState

    if PartialState().is_main_process:
        from hf_pcme.training.summary import run_summary

        print("\n" + run_summary(result, recipe), flush=True)
    return 0 if not result.interrupted else 3


if __name__ == "__main__":
    sys.exit(main())
