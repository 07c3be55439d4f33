"""Convert a checkpoint of the original PCME code (naver-ai/pcme) into a PCMEModel folder.

    python scripts/convert_pcme_original_checkpoint.py --checkpoint model_best.pth \
        --vocab coco_vocab.pkl --config pcme_coco.yaml --output pcme-coco [--push_to_hub user/pcme-coco]

The folder holds the model (safetensors), the processor (image processor + tokenizer.json built
from the vocabulary: no pickle) and a model card; ``AutoModel.from_pretrained``,
``AutoProcessor.from_pretrained`` and ``pipeline("cross-modal-retrieval", model=...)`` load it.
The same works for the CUB release (``--vocab cub_vocab.pkl --config pcme_cub.yaml``). See
:mod:`hf_pcme.conversion.pcme_original` for the mapping and its checks.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from hf_pcme.conversion.pcme_original import ConversionError, convert_checkpoint, load_original_config, save_converted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the original model_best.pth")
    parser.add_argument("--vocab", help="coco_vocab.pkl / cub_vocab.pkl, or a JSON {word: id} (default: the checkpoint's word2idx)")
    parser.add_argument("--config", help="the original YAML, e.g. pcme_coco.yaml (default: the checkpoint's config)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load the checkpoint with full unpickling (only for files you trust)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    result = convert_checkpoint(args.checkpoint, vocab=args.vocab, config=args.config, allow_pickle=args.allow_pickle)
    cnn_type = None
    if args.config:
        cnn_type = load_original_config(args.config, {})["model"].get("cnn_type")
    folder = save_converted(result, args.output, checkpoint_name=args.checkpoint, cnn_type=cnn_type,
                            push_to_hub=args.push_to_hub)  # fmt: skip
    arch = result.architecture
    parameters = sum(p.numel() for p in result.model.parameters())
    print(f"Converted {result.num_tensors} tensors: ResNet stages {arch.depths} ({arch.block}), D = {arch.embed_dim}, "
          f"{arch.vocab_size} words; {parameters / 1e6:.1f}M parameters -> {folder}")
    if args.push_to_hub:
        print(f"Uploaded to https://huggingface.co/{args.push_to_hub}")


def run(argv: list[str] | None = None) -> int:
    """``main`` with the exit status of a command: 2 and a one-line message for a bad input."""
    try:
        with torch.no_grad():
            main(argv)
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
