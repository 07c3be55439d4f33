"""Training-loop overhead: a Trainer step vs the bare forward + backward + optimiser step, interleaved.

A Trainer step (``Trainer._optimizer_step`` + ``progress.update`` + ``Trainer._after_step``, the
body of its loop) adds data loading (reading rows, transforms, collation, the accelerate loader),
loss bookkeeping, logging and the progress bar around the model's own work. The bare step is that
work alone on an already collated batch: forward, ``accelerator.backward``, gradient clipping,
optimiser and schedule steps, with the *same* prepared module, optimiser and schedule.

The two kinds of step alternate, one of each per round and on the same batch, so that both see the
same data and the same machine: on a
shared 2-core VM the speed drifts by +-15 % within a minute, which made separate back-to-back loops
disagree by more than the effect measured. Printed: the median of each step time, ``overhead =
median(trainer) / median(bare) - 1`` (target: <= 10 %), and the median wait for a batch inside the
Trainer step, for 1 process and for 2 CPU processes (``accelerate launch --multi_gpu
--num_processes 2``, gloo; embeddings gathered across the processes and gradients all-reduced in
both steps). Denormal floats are flushed to zero: on CPU they slow the arithmetic by a
value-dependent amount.

    python benchmarks/bench_train_loop.py                    # shapes_pcme towers, batch 64, 60 rounds
    python benchmarks/bench_train_loop.py --quick            # smoke run
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
WARMUP_ROUNDS = 3


def _recipe(output_dir: str, rounds: int, batch_size: int, cache_dir: str, num_workers: int, cache_pixels: bool):
    from hf_pcme.training.config import load_recipe

    return load_recipe(
        REPO / "configs" / "shapes_pcme.yaml",
        [
            f"output_dir={output_dir}",
            f"data.options={{num_images: 400, num_eval_images: 10, cache_dir: {cache_dir}}}",
            f"train.batch_size={batch_size}",
            "train.phase1_steps=0",
            f"train.phase2_steps={2 * rounds}",
            "train.checkpoint_every=100000",
            "eval.enabled=false",
            f"data.num_workers={num_workers}",
            f"data.cache_pixel_values={str(cache_pixels).lower()}",
        ],
    )


def measure(rounds: int, batch_size: int, cache_dir: str, num_workers: int, cache_pixels: bool) -> dict:
    """Per-round seconds of a Trainer step and of a bare step, in this process (1 or more via accelerate)."""
    import torch
    from tqdm.auto import tqdm

    from hf_pcme.training.trainer import Trainer, TrainerState, plan_phases

    torch.set_num_threads(1)  # two processes share two cores
    torch.set_flush_denormal(True)
    out = os.path.join(cache_dir, f"run_{os.environ.get('WORLD_SIZE', '1')}")
    trainer = Trainer(_recipe(out, rounds, batch_size, cache_dir, num_workers, cache_pixels))
    accelerator, train = trainer.accelerator, trainer.recipe.train
    trainer.setup()
    steps_per_epoch = len(trainer._make_train_loader())
    phase = plan_phases(trainer.recipe, steps_per_epoch)[-1]
    trainer._prepare_phase(phase)  # the module, optimiser, schedule and loader a run would use
    trainer.progress = tqdm(total=2 * rounds, disable=True)
    trainer.module.train()
    state = TrainerState(phase=phase.index)

    # The Trainer's loader, waits for the next batch timed.
    waits: list[float] = []
    loader = iter(trainer.train_loader)

    def next_timed():
        started = time.perf_counter()
        batch = next(loader)
        waits.append(time.perf_counter() - started)
        return batch

    trainer_batches = iter(next_timed, None)
    # The bare step's batches: the same ones, in the same order (epoch 0), collated before the timing.
    bare_loader = accelerator.prepare(trainer._make_train_loader())
    bare_batches = [batch for _, batch in zip(range(rounds), bare_loader)]
    parameters = [p for group in trainer.optimizer.param_groups for p in group["params"]]

    def bare_step(batch) -> None:
        output = trainer.module(**batch)
        accelerator.backward(output.loss)
        if train.grad_clip is not None:
            accelerator.clip_grad_norm_(parameters, train.grad_clip)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    trainer_s, bare_s = [], []
    for batch in bare_batches:
        started = time.perf_counter()
        logs = trainer._optimizer_step(trainer_batches)
        state.global_step += 1
        trainer.progress.update(1)
        trainer._after_step(state, logs)
        middle = time.perf_counter()
        bare_step(batch)
        trainer_s.append(middle - started)
        bare_s.append(time.perf_counter() - middle)
    accelerator.wait_for_everyone()
    return {
        "processes": accelerator.num_processes,
        "trainer_s": trainer_s[WARMUP_ROUNDS:],
        "bare_s": bare_s[WARMUP_ROUNDS:],
        "wait_s": waits[WARMUP_ROUNDS:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, small batch")
    parser.add_argument("--rounds", type=int, default=60, help="rounds of one Trainer step + one bare step")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers per process")
    parser.add_argument("--no_pixel_cache", action="store_true",
                        help="decode and process images for every batch (data.cache_pixel_values=false)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds, batch = (WARMUP_ROUNDS + 5, 16) if args.quick else (WARMUP_ROUNDS + args.rounds, 64)
    cache_pixels = not args.no_pixel_cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:
        result = measure(rounds, batch, args.cache_dir, args.num_workers, cache_pixels)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        rows.append(measure(rounds, batch, cache_dir, args.num_workers, cache_pixels))
        result_file = Path(cache_dir) / "two.json"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            __file__, "--worker", "--result", str(result_file), "--cache_dir", cache_dir,
            "--num_workers", str(args.num_workers), "--rounds", str(args.rounds),
        ] + (["--quick"] if args.quick else []) + (["--no_pixel_cache"] if args.no_pixel_cache else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0 or not result_file.exists():
            print(completed.stderr[-3000:], file=sys.stderr)
            raise SystemExit("the 2-process run failed")
        rows.append(json.loads(result_file.read_text()))

    print(f"Trainer step vs bare forward+backward+clip+step, interleaved (shapes_pcme towers, global batch {batch}, "
          f"{args.num_workers} loader worker(s) per process, pixel cache {'on' if cache_pixels else 'off'}; "
          f"medians of {rounds - WARMUP_ROUNDS} rounds)")
    print(f"{'processes':>9} | {'trainer ms/step':>15} | {'bare ms/step':>12} | {'overhead':>8} | {'batch wait':>10} | "
          "per-round trainer/bare - 1: quartiles")
    print("-" * 110)
    for row in rows:
        trainer_s, bare_s = statistics.median(row["trainer_s"]), statistics.median(row["bare_s"])
        wait_s = statistics.median(row["wait_s"])
        quartiles = statistics.quantiles([t / b - 1 for t, b in zip(row["trainer_s"], row["bare_s"])], n=4)
        print(f"{row['processes']:>9} | {trainer_s * 1e3:>15.1f} | {bare_s * 1e3:>12.1f} | "
              f"{trainer_s / bare_s - 1:>7.1%} | {wait_s / bare_s:>9.1%} | "
              + ", ".join(f"{q:+.1%}" for q in quartiles))
    print("target: overhead <= 10 %. batch wait: the Trainer step's median wait for its next batch (reading, "
          "transforms, collation, the accelerate loader) as a fraction of the bare step; the rest is bookkeeping.")


if __name__ == "__main__":
    main()
