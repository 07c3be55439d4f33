"""Training-loop overhead: the full Trainer vs the bare forward + backward + optimiser step on the same batches.

The Trainer adds data loading (decoding, transforms, collation, the accelerate loader), gradient
clipping, the schedule, logging and progress bars around the model's own work. This measures the
per-step time of both on identical global batches (the Trainer's own loader, collated once for the
bare loop) and prints ``overhead = trainer / bare - 1`` (target: <= 10 %), for 1 process and for 2
CPU processes (``accelerate launch --multi_gpu --num_processes 2``, gloo; embeddings gathered
across the processes in both loops).

Both loops start from the same weights with the same optimiser, schedule and gradient clipping,
so they compute on the same values and the difference is data loading and bookkeeping; denormal floats are flushed to zero in both, because on CPU they slow the
arithmetic by a value-dependent amount (in an earlier version, the bare loop's different learning
rate produced denormals that made it 40 % slower than the full trainer).

    python benchmarks/bench_train_loop.py            # shapes_pcme towers, batch 64, 30 timed steps
    python benchmarks/bench_train_loop.py --quick    # smoke run
    python benchmarks/bench_train_loop.py --no_pixel_cache   # images decoded + processed every batch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 3


def _recipe(output_dir: str, steps: int, batch_size: int, cache_dir: str, num_workers: int = 0):
    cache_pixels = os.environ.get("BENCH_PIXEL_CACHE", "1") == "1"
    from hf_pcme.training.config import load_recipe

    return load_recipe(
        REPO / "configs" / "shapes_pcme.yaml",
        [
            f"output_dir={output_dir}",
            f"data.options={{num_images: 400, num_eval_images: 10, cache_dir: {cache_dir}}}",
            f"train.batch_size={batch_size}",
            "train.phase1_steps=0",
            f"train.phase2_steps={steps}",
            "train.checkpoint_every=100000",  # only the final checkpoint, outside the timed steps
            "eval.enabled=false",
            f"data.num_workers={num_workers}",
            f"data.cache_pixel_values={str(cache_pixels).lower()}",
        ],
    )


def _median_step(times: list[float]) -> float:
    diffs = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(diffs[WARMUP_STEPS:])


def measure(steps: int, batch_size: int, cache_dir: str, num_workers: int = 0, repeats: int = 3) -> dict:
    """Per-step seconds of the Trainer and of the bare loop, ``repeats`` times each, alternating.

    Step times on this kind of machine drift by +-10 % between back-to-back runs of the same loop,
    as much as the effect measured; alternating the two loops and taking medians over repeats keeps
    that drift from landing on one side.
    """
    trainer_s, bare_s, loading_s = [], [], []
    for repeat in range(repeats):
        one_trainer, one_bare, one_loading, processes = measure_once(steps, batch_size, cache_dir, num_workers, repeat)
        trainer_s.append(one_trainer)
        bare_s.append(one_bare)
        loading_s.append(one_loading)
    return {
        "processes": processes,
        "trainer_s": trainer_s,
        "bare_s": bare_s,
        "loading_s": loading_s,
        "batch": batch_size,
        "steps": steps,
        "workers": num_workers,
    }


def measure_once(
    steps: int, batch_size: int, cache_dir: str, num_workers: int, repeat: int
) -> tuple[float, float, float, int]:
    """Median per-step seconds of the Trainer, of the bare loop and of the Trainer's wait for a batch."""
    import torch

    from hf_pcme.training.module import ContrastiveTrainingModule
    from hf_pcme.training.optim import build_optimizer, build_scheduler, freeze_towers
    from hf_pcme.training.trainer import Trainer

    torch.set_num_threads(1)  # two processes share two cores
    torch.set_flush_denormal(True)
    # One fresh output folder shared by all processes (checkpoints are written together).
    out = os.path.join(cache_dir, f"run_{os.environ.get('WORLD_SIZE', '1')}_{repeat}")
    trainer = Trainer(_recipe(out, steps, batch_size, cache_dir, num_workers))
    accelerator = trainer.accelerator
    trainer.setup()
    initial_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    # Full loop: timestamps taken after every optimiser step.
    stamps: list[float] = []
    original_after_step = trainer._after_step

    def after_step(state, logs):
        original_after_step(state, logs)
        stamps.append(time.perf_counter())

    # Time spent waiting for the next batch, measured inside the same run.
    waits: list[float] = []
    original_optimizer_step = trainer._optimizer_step

    def next_timed(batches):
        started = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - started)
        return batch

    def optimizer_step(batches):
        return original_optimizer_step(iter(lambda: next_timed(batches), None))

    trainer._after_step = after_step
    trainer._optimizer_step = optimizer_step
    trainer.train()
    trainer_step = _median_step(stamps)
    loading = statistics.median(waits[WARMUP_STEPS + 1 :])

    # Bare loop: the same (local) batches, collated beforehand, same module and optimiser.
    # Drop the trainer's DDP wrapper first: its gradient hooks would also fire in the bare loop.
    trainer.module = trainer.optimizer = trainer.scheduler = trainer.train_loader = None
    accelerator.free_memory()
    trainer.model.load_state_dict(initial_state)
    freeze_towers(trainer.model, [])
    loader = accelerator.prepare(trainer._make_train_loader())
    loader.set_epoch(100_000)  # phase 2, epoch 0: the batches the trainer saw
    batches = [batch for _, batch in zip(range(steps), loader)]
    module = ContrastiveTrainingModule(trainer.model)
    train = trainer.recipe.train
    optimizer = build_optimizer(trainer.model, train.lr, train.weight_decay, train.tower_lr_multiplier, train.optimizer)
    scheduler = build_scheduler(optimizer, steps, train.warmup_steps, train.min_lr_ratio)
    module, optimizer = accelerator.prepare(module, optimizer)
    module.train()
    stamps = [time.perf_counter()]
    for batch in batches:
        loss = module(**batch).loss
        accelerator.backward(loss)
        if train.grad_clip is not None:
            accelerator.clip_grad_norm_(trainer.model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    bare_step = _median_step(stamps)
    accelerator.wait_for_everyone()
    return trainer_step, bare_step, loading, accelerator.num_processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, small batch")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers per process")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of the two loops")
    parser.add_argument("--no_pixel_cache", action="store_true",
                        help="decode and process images for every batch (data.cache_pixel_values=false)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps, batch = (8, 16) if args.quick else (WARMUP_STEPS + 30, 64)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.no_pixel_cache:
        os.environ["BENCH_PIXEL_CACHE"] = "0"  # read by _recipe, here and in the launched processes

    if args.worker:
        result = measure(steps, batch, args.cache_dir, args.num_workers, args.repeats)
        if result is not None and int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        rows.append(measure(steps, batch, cache_dir, args.num_workers, args.repeats))
        result_file = Path(cache_dir) / "two.json"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            __file__, "--worker", "--result", str(result_file), "--cache_dir", cache_dir,
            "--num_workers", str(args.num_workers), "--repeats", str(args.repeats),
        ] + (["--quick"] if args.quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0 or not result_file.exists():
            print(completed.stderr[-3000:], file=sys.stderr)
            raise SystemExit("the 2-process run failed")
        rows.append(json.loads(result_file.read_text()))

    print(f"Training loop vs bare forward+backward+clip+step (shapes_pcme towers, global batch {batch}, "
          f"{args.num_workers} loader worker(s) per process; median step of {steps - WARMUP_STEPS - 1} steps, "
          f"then median of {args.repeats} alternating repeats)")
    print(f"{'processes':>9} | {'trainer ms/step':>15} | {'bare ms/step':>12} | {'overhead':>8} | "
          f"{'batch wait':>10} | overhead per repeat")
    print("-" * 95)
    for row in rows:
        trainer_s, bare_s = statistics.median(row["trainer_s"]), statistics.median(row["bare_s"])
        loading_s = statistics.median(row["loading_s"])
        each = ", ".join(f"{t / b - 1:+.1%}" for t, b in zip(row["trainer_s"], row["bare_s"]))
        print(f"{row['processes']:>9} | {trainer_s * 1e3:>15.1f} | {bare_s * 1e3:>12.1f} | "
              f"{trainer_s / bare_s - 1:>7.1%} | {loading_s / bare_s:>9.1%} | {each}")
    print("batch wait: the Trainer's median wait for the next batch (decoding, transforms, collation, the "
          "accelerate loader), as a fraction of the bare step; the rest of the overhead is bookkeeping.")


if __name__ == "__main__":
    main()
