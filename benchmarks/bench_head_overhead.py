"""Train-step cost of the probabilistic head (PCME) vs a deterministic head on the same towers.

One step = forward of both towers + heads + loss, backward, optimizer step. The probabilistic
model adds the log-variance branch, J samples per item and the sampled contrastive loss over
(B J) x (B J) sample pairs; the deterministic model uses InfoNCE on the means. Steps of the two
models are interleaved so machine noise affects both alike; the median of each is reported.

    python benchmarks/bench_head_overhead.py            # ResNet-18-like + bi-GRU, B=64, D=1024, J=7
    python benchmarks/bench_head_overhead.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_pcme import PCMEConfig, PCMEModel


def build(head_type: str, loss_type: str, args: argparse.Namespace) -> PCMEModel:
    torch.manual_seed(0)
    config = PCMEConfig(
        vision_config={
            "model_type": "resnet",
            "embedding_size": args.width,
            "hidden_sizes": [args.width, args.width * 2, args.width * 4, args.width * 8],
            "depths": [2, 2, 2, 2],
            "layer_type": "basic",
        },
        text_config={"model_type": "pcme_bigru", "vocab_size": 10000, "word_dim": 300, "hidden_size": 1024},
        embed_dim=args.embed_dim,
        head_type=head_type,
        loss_type=loss_type,
        num_samples=args.num_samples,
    )
    return PCMEModel(config).train()


def step(model: PCMEModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch, return_loss=True).loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--width", type=int, default=64, help="ResNet stem width (64 = ResNet-18)")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="small towers and batch, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.image_size, args.width, args.steps = 16, 64, 16, 3

    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
        "input_ids": torch.randint(2, 10000, (args.batch_size, 12), generator=generator),
        "attention_mask": torch.ones(args.batch_size, 12, dtype=torch.long),
    }
    models = {
        "deterministic (InfoNCE)": build("deterministic", "infonce", args),
        "probabilistic (PCME sampled)": build("probabilistic", "pcme", args),
    }
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for index in range(args.steps + 1):
        for name, model in models.items():
            elapsed = step(model, optimizers[name], batch)
            if index > 0:  # the first step of each model is a warm-up
                times[name].append(elapsed)

    print(
        f"B={args.batch_size} image={args.image_size} ResNet width={args.width} D={args.embed_dim} "
        f"J={args.num_samples} threads={torch.get_num_threads()} steps={args.steps}"
    )
    print(f"{'model':<30}{'median step (s)':>18}")
    for name, values in times.items():
        print(f"{name:<30}{statistics.median(values):>18.3f}")
    names = list(times)
    ratio = statistics.median(times[names[1]]) / statistics.median(times[names[0]])
    print(f"overhead probabilistic / deterministic: {ratio:.3f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
