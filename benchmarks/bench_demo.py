"""How long the demo takes to be ready, and to answer a caption, as a user sees it.

    python benchmarks/bench_demo.py --model runs/main_job/pcme [--runs 3] [--queries 20] [--quick]

Each run starts ``demo/app.py --model M --dataset shapes`` in a fresh process (imports, model
load, embedding and indexing the 500 test images and their captions, server start) and times it
until the page answers HTTP 200. It then sends caption queries through the app's HTTP API
(``gradio_client``, the same endpoint the page calls; rendering the HTML included) and times each
answer. Prints the medians against the targets (ready <= 30 s, a caption query <= 1 s).

On a machine shared with other jobs the wall-clock times grow with the load, so the script also
prints the CPU seconds the demo process used (from /proc; all its threads): a time that does not
depend on waiting for a core. On 2 free cores the wall time is at least CPU / 2.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = (
    "a red circle",
    "two shapes: a small blue square and a large yellow triangle",
    "a shape at the top left",
    "some shapes",
    "three shapes: a small red circle at the top left, a large green square at the top right and a small blue "
    "triangle at the bottom left",
    "a green triangle and a yellow circle",
    "a large shape",
)
READY_TARGET_S = 30.0
QUERY_TARGET_S = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the demo was not ready after {timeout_s:.0f} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def one_run(model: str, num_queries: int, timeout_s: float) -> tuple[float, list[float], float, float]:
    from gradio_client import Client

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(REPO_ROOT / "demo" / "app.py"), "--model", model, "--dataset", "shapes",
               "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(url, process, timeout_s)
        ready_s = time.perf_counter() - started
        ready_cpu = cpu_seconds(process.pid)
        client = Client(url, verbose=False)
        queries_cpu = cpu_seconds(process.pid)
        latencies = []
        for i in range(num_queries):
            caption = CAPTIONS[i % len(CAPTIONS)]
            tick = time.perf_counter()
            query_info, _, results = client.predict(caption, 8, api_name="/search_caption")
            latencies.append(time.perf_counter() - tick)
            if "pcme-result" not in results:
                raise RuntimeError(f"no results rendered for {caption!r}: {query_info[:300]}")
        query_cpu = (cpu_seconds(process.pid) - queries_cpu) / num_queries
        return ready_s, latencies, ready_cpu, query_cpu
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        ready_lines = [line for line in (output or "").splitlines() if "ready in" in line]
        if ready_lines:
            print(f"  app: {ready_lines[-1].strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/main_job/pcme", help="a saved PCME model folder")
    parser.add_argument("--runs", type=int, default=3, help="fresh demo processes started")
    parser.add_argument("--queries", type=int, default=20, help="caption queries per run")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a start after this many seconds")
    parser.add_argument("--quick", action="store_true", help="one start, five queries")
    args = parser.parse_args()
    runs, queries = (1, 5) if args.quick else (args.runs, args.queries)

    ready, latencies, ready_cpus, query_cpus = [], [], [], []
    for run in range(runs):
        ready_s, run_latencies, ready_cpu, query_cpu = one_run(args.model, queries, args.timeout)
        ready.append(ready_s)
        latencies.extend(run_latencies)
        ready_cpus.append(ready_cpu)
        query_cpus.append(query_cpu)
        print(f"run {run + 1}: ready in {ready_s:.1f} s ({ready_cpu:.1f} CPU s); caption queries median "
              f"{statistics.median(run_latencies) * 1000:.0f} ms, max {max(run_latencies) * 1000:.0f} ms "
              f"({query_cpu * 1000:.0f} CPU ms each); load average {os.getloadavg()[0]:.1f}", flush=True)
    ready_median, query_median = statistics.median(ready), statistics.median(latencies)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{cores} CPU cores, model {args.model}, shapes test gallery (500 images + captions), {runs} start(s)")
    print(f"ready (process start -> page answers): median {ready_median:.1f} s, all {', '.join(f'{r:.1f}' for r in ready)} s "
          f"(target <= {READY_TARGET_S:.0f} s: {'met' if ready_median <= READY_TARGET_S else 'NOT met'})")
    print(f"caption query (HTTP API, top 8 rendered): median {query_median * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} "
          f"(target <= {QUERY_TARGET_S:.0f} s: {'met' if query_median <= QUERY_TARGET_S else 'NOT met'})")
    print(f"CPU time of the demo process: {statistics.median(ready_cpus):.1f} s until ready, "
          f"{statistics.median(query_cpus) * 1000:.0f} ms per caption query (medians; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
