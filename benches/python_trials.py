"""Keras 3 trials, side by side in one run: tfsd's `run_isolated` (a fresh, pre-imported Python
process from the daemon's warm pool), a `multiprocessing` spawn that imports TensorFlow and
Keras, and the same trial in-process with `keras.backend.clear_session()` between trials.

    .venv/bin/python benches/python_trials.py --tfsd target/release/tfsd --out target/bench [--quick]

The trial builds Dense 8→32→1, compiles it, fits it on 256 random rows and returns the loss.
Its first statement records `time.time()`, so "time to the trial's first line" is that minus
the caller's `time.time()` just before the call (same clock, same machine). Measured (and
written to `python_trials.json` in --out):

- tfsd, pool keeps up: `run_isolated` with the pool full before each trial (the benchmark
  waits, untimed, until `status()` shows every warm Python worker ready), in rounds with the
  spawn case below so that both see the same load;
- spawn: `multiprocessing` with the spawn start method, a fresh process per trial that
  imports tensorflow and keras (the daemon's preload list) and then runs the trial;
- tfsd, pool drained: `run_isolated` back to back with no pause: what a caller waits once the
  pool is empty, and how fast the daemon starts workers (tfsd_worker_spawns_total from the
  metrics endpoint over the phase; each worker's own start time from its log line);
- a kept `python_session`: the worker's private memory (the daemon's `info()`: RssAnon) when
  fresh and after each of a few trials in the same process, with no refill running beside them;
- in-process, in a subprocess (so that this process never imports TensorFlow or Keras and its
  RSS is the tfsd/spawn client's): the trial, then `clear_session()` and `gc.collect()`, and
  the process's RSS after each trial: the leak tfsd exists to fix, as MiB per trial (a linear
  fit over the trials).

Client RSS: this process's VmRSS before and after each trial (it imports neither TensorFlow
nor Keras). Every process here runs with TF_ENABLE_ONEDNN_OPTS=0, as tfsd's workers do.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 300.0  # a Python worker imports TensorFlow and Keras: seconds, more when loaded
MIB = 1 << 20
PRELOAD = ("tensorflow", "keras")  # what the daemon's Python workers import (config default)
ROWS = 256


def log(message: str) -> None:
    print(message, flush=True)


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def proc_memory(pid: str | int = "self") -> dict:
    """VmRSS and RssAnon (private: what the daemon reports as private_bytes), in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields.get("VmRSS", 0), "anon": fields.get("RssAnon", 0)}


# ---------------------------------------------------------------------------------------------
# The trial: the same function in every system. Self-contained (cloudpickle carries it by value
# to tfsd's worker; the spawned process imports it from this file).


def trial(seed: int, epochs: int) -> dict:
    started = time.time()  # first statement: "time to the trial's first line"
    memory_start = proc_memory()
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((ROWS, 8), dtype=np.float32)
    y = rng.random((ROWS, 1), dtype=np.float32)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    loss = model.fit(x, y, epochs=epochs, verbose=0).history["loss"][-1]
    memory_end = proc_memory()
    return {
        "started": started,
        "finished": time.time(),
        "loss": float(loss),
        "pid": os.getpid(),
        "rss_start": memory_start["rss"],
        "anon_start": memory_start["anon"],
        "rss_end": memory_end["rss"],
        "anon_end": memory_end["anon"],
    }


def spawned_trial(connection, seed: int, epochs: int) -> None:
    """The spawned process's target: import what tfsd's workers preload, then the trial."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    connection.send(trial(seed, epochs))
    connection.close()


# ---------------------------------------------------------------------------------------------
# Statistics.


def percentile(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = int(-(-p / 100.0 * len(ordered) // 1))  # ceil
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "min_ms": min(ms) if ms else float("nan"),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "samples_ms": [round(v, 3) for v in ms],
    }


def slope(values: list[float]) -> float:
    """Least-squares slope of values against their index (per trial)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean_x = (n - 1) / 2
    mean_y = statistics.fmean(values)
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def figures(calls: list[float], results: list[dict], returned: list[float],
            rss_before: list[int], rss_after: list[int]) -> dict:
    """One system's figures from its trials: the caller's time before each call, the trials'
    own results, the caller's time when each returned, and this process's RSS around each."""
    first_line = [r["started"] - c for r, c in zip(results, calls)]
    wall = [t - c for t, c in zip(returned, calls)]
    growth = [after - before for before, after in zip(rss_before, rss_after)]
    return {
        "time_to_first_line": summary_ms(first_line),
        "wall": summary_ms(wall),
        "trial_body": summary_ms([r["finished"] - r["started"] for r in results]),
        "client_rss_mib": [round(v / MIB, 3) for v in rss_after],
        "client_rss_before_first_mib": rss_before[0] / MIB if rss_before else float("nan"),
        # Growth attributed to this system's trials: the sum of its own trials' deltas (the
        # warm-pool and spawn trials take turns in one process).
        "client_rss_growth_mib": sum(growth) / MIB,
        "worker_private_start_mib": [round(r["anon_start"] / MIB, 2) for r in results],
        "worker_private_end_mib": [round(r["anon_end"] / MIB, 2) for r in results],
        "worker_rss_start_mib": [round(r["rss_start"] / MIB, 2) for r in results],
        "worker_rss_end_mib": [round(r["rss_end"] / MIB, 2) for r in results],
        "worker_pids": [r["pid"] for r in results],
        "losses": [r["loss"] for r in results],
    }


# ---------------------------------------------------------------------------------------------
# The daemon.


class Daemon:
    """tfsd with Python sessions on: a config file for [python] (its pool size has no
    environment override), free ports, its log (with each Python worker's start timings) in a
    file."""

    def __init__(self, binary: Path, pool_size: int, workdir: Path) -> None:
        interpreter = REPO_ROOT / ".venv" / "bin" / "python"
        config = workdir / "tfsd.toml"
        config.write_text(
            "[workers]\n"
            "# Graph sessions are not used here: no graph worker kept warm.\n"
            "pool_size = 0\n"
            "[python]\n"
            f"interpreter = {json.dumps(str(interpreter))}\n"
            f"preload = {json.dumps(list(PRELOAD))}\n"
            f"pool_size = {pool_size}\n"
            'start_timeout = "300s"\n'
            "[python.env]\n"
            '# Each worker logs how long its start took (imports, warm-up).\n'
            'TFSD_PYTHON_WORKER_TIMING = "1"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFSD_")}
        env.update(
            TFSD_METRICS_LISTEN="127.0.0.1:0",
            TFSD_MASTER_LISTEN="127.0.0.1:0",
            TFSD_PYTHON_INTERPRETER=str(interpreter),
            TFSD_LOG_FILTER=os.environ.get("PYTHON_TRIALS_TFSD_LOG", "info"),
        )
        self.log_path = workdir / "tfsd.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [str(binary), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        self.address: str | None = None
        self.metrics: str | None = None
        said: list[str] = []

        def reader() -> None:
            for line in self.process.stdout:
                if line.startswith("tfsd metrics on "):
                    self.metrics = line.split(" on ", 1)[1].strip()
                if line.startswith("tfsd listening on "):
                    self.address = line.split(" on ", 1)[1].strip()
                    said.append("ok")
                    break
            for _ in self.process.stdout:  # never let it block on a full pipe
                pass

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + 60.0
        while not said and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.02)
        if not said:
            self.process.kill()
            raise RuntimeError(
                f"tfsd did not print 'tfsd listening on ADDR' within 60 s; its log: "
                f"{self.log_path.read_text()[-3000:]}"
            )

    def spawns(self) -> int | None:
        """tfsd_worker_spawns_total (graph and Python workers; the graph pool is 0 here)."""
        if not self.metrics:
            return None
        text = urllib.request.urlopen(self.metrics, timeout=10).read().decode()
        match = re.search(r"^tfsd_worker_spawns_total(?:\{[^}]*\})? (\d+)", text, re.M)
        return int(match.group(1)) if match else None

    def worker_starts(self) -> list[dict]:
        """Each Python worker's 'ready N s after start (...)' line: its own start time."""
        starts = []
        pattern = re.compile(r"tfsd python worker (\d+): ready ([\d.]+) s after start \(([^;]*);")
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = pattern.search(line)
            if match:
                starts.append({"pid": int(match.group(1)), "seconds": float(match.group(2)),
                               "stages": match.group(3)})
        return starts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def wait_for_pool(tfsd, deadline_s: float = DEADLINE_S) -> float:
    """Waits until every warm Python worker is ready; returns the seconds it waited."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        status = tfsd.status()
        if status.warm_python_pool_size and status.warm_python_workers >= status.warm_python_pool_size:
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"tfsd's Python pool did not fill within {deadline_s:.0f} s")


# ---------------------------------------------------------------------------------------------
# The systems.


def tfsd_trial(tfsd, seed: int, epochs: int) -> tuple[float, dict, float]:
    call = time.time()
    result = tfsd.run_isolated(trial, seed, epochs)
    return call, result, time.time()


def spawn_trial(context, seed: int, epochs: int) -> tuple[float, dict, float]:
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=spawned_trial, args=(send, seed, epochs))
    call = time.time()
    process.start()
    send.close()
    result = receive.recv()
    process.join()
    returned = time.time()
    receive.close()
    if process.exitcode != 0:
        raise RuntimeError(f"the spawned trial exited with {process.exitcode}")
    return call, result, returned


def in_process_main(trials: int, epochs: int) -> None:
    """The in-process case (run as a subprocess): prints one JSON line with its figures."""
    before_import = proc_memory()
    started = time.monotonic()
    import keras
    import tensorflow as tf  # noqa: F401 - what the others preload

    import_s = time.monotonic() - started
    after_import = proc_memory()

    def one(seed: int) -> dict:
        call = time.time()
        result = trial(seed, epochs)
        returned = time.time()
        keras.backend.clear_session()
        gc.collect()
        cleaned = time.time()
        memory = proc_memory()
        return {"call": call, "result": result, "returned": returned, "cleaned": cleaned,
                "rss": memory["rss"], "anon": memory["anon"]}

    warmup = one(10_000)
    runs = [one(seed) for seed in range(trials)]
    rss = [r["rss"] / MIB for r in runs]
    anon = [r["anon"] / MIB for r in runs]
    out = {
        "import_s": import_s,
        "rss_before_import_mib": before_import["rss"] / MIB,
        "rss_after_import_mib": after_import["rss"] / MIB,
        "rss_after_warmup_mib": warmup["rss"] / MIB,
        "private_after_warmup_mib": warmup["anon"] / MIB,
        "time_to_first_line": summary_ms([r["result"]["started"] - r["call"] for r in runs]),
        # A trial's wall in-process includes the cleanup that follows it.
        "wall": summary_ms([r["cleaned"] - r["call"] for r in runs]),
        "trial_body": summary_ms([r["result"]["finished"] - r["result"]["started"] for r in runs]),
        "cleanup": summary_ms([r["cleaned"] - r["returned"] for r in runs]),
        "rss_after_each_mib": [round(v, 3) for v in rss],
        "private_after_each_mib": [round(v, 3) for v in anon],
        "rss_growth_mib": rss[-1] - warmup["rss"] / MIB,
        "private_growth_mib": anon[-1] - warmup["anon"] / MIB,
        "leak_rss_mib_per_trial": slope(rss),
        "leak_private_mib_per_trial": slope(anon),
        "losses": [r["result"]["loss"] for r in runs],
        "versions": {"tensorflow": sys.modules["tensorflow"].__version__,
                     "keras": keras.__version__},
    }
    print("IN_PROCESS_RESULT " + json.dumps(out), flush=True)


def run_in_process(trials: int, epochs: int) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "in-process", str(trials), str(epochs)],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("IN_PROCESS_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(
        f"the in-process run failed ({completed.returncode}): {completed.stderr[-3000:]}"
    )


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tfsd", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    quick = args.quick or os.environ.get("BENCH_QUICK", "0") not in ("", "0")
    trials = args.trials or (5 if quick else 20)
    kept_trials = 2 if quick else 3
    epochs = args.epochs

    import tfsd_client

    assert "tensorflow" not in sys.modules and "keras" not in sys.modules
    results: dict = {
        "bench": "python_trials", "quick": quick, "trials": trials, "epochs": epochs,
        "rows": ROWS, "pool_size": args.pool_size, "load_before": load_average(),
        "model": "Dense 8→32(relu)→1, Adam, mse, fit on 256 random rows",
        "phases": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="tfsd-python-trials-"))
    started_at = time.monotonic()
    daemon = Daemon(args.tfsd, args.pool_size, workdir)
    log(f"python_trials: tfsd at {daemon.address} (Python pool {args.pool_size}), "
        f"{trials} trials of {epochs} epochs; load {results['load_before']:.2f}; log {daemon.log_path}")
    try:
        # A deadline above a loaded machine's cold start: a caller that finds the pool empty
        # waits in CreateSession for a worker to import TensorFlow (the default is 60 s).
        tfsd = tfsd_client.connect(daemon.address, timeout=DEADLINE_S)
        first_fill = wait_for_pool(tfsd)
        status = tfsd.status()
        results["python_runtime"] = status.python_runtime
        results["first_pool_fill_s"] = first_fill
        log(f"- pool full after {first_fill:.1f} s ({status.python_runtime})")
        context = multiprocessing.get_context("spawn")

        # Warm-ups, untimed: the client's lazy imports (cloudpickle, the stubs), the spawn
        # machinery, and the page cache for both.
        wait_for_pool(tfsd)
        tfsd_trial(tfsd, 9_000, epochs)
        wait_for_pool(tfsd)
        spawn_trial(context, 9_001, epochs)

        # 1 and 2: the pool keeps up, in rounds with spawn (the order alternates).
        load = load_average()
        raw = {"tfsd_warm": ([], [], [], [], []), "spawn": ([], [], [], [], [])}
        pool_waits = []  # (the trial before, seconds waited for a full pool)
        previous = "spawn"  # the last warm-up
        for i in range(trials):
            order = ["tfsd_warm", "spawn"] if i % 2 == 0 else ["spawn", "tfsd_warm"]
            for name in order:
                pool_waits.append((previous, wait_for_pool(tfsd)))
                previous = name
                before = proc_memory()["rss"]
                if name == "tfsd_warm":
                    call, result, returned = tfsd_trial(tfsd, i, epochs)
                else:
                    call, result, returned = spawn_trial(context, i, epochs)
                after = proc_memory()["rss"]
                for bucket, value in zip(raw[name], (call, result, returned, before, after)):
                    bucket.append(value)
            log(f"  round {i + 1}/{trials}: tfsd first line "
                f"{(raw['tfsd_warm'][1][-1]['started'] - raw['tfsd_warm'][0][-1]) * 1e3:.1f} ms, "
                f"spawn {(raw['spawn'][1][-1]['started'] - raw['spawn'][0][-1]) * 1e3:.0f} ms")
        for name, (calls, res, returned, before, after) in raw.items():
            results[name] = figures(calls, res, returned, before, after)
        # Waiting for a full pool after a tfsd trial: what is left of the refill's worker start
        # when the trial returns (the refill starts when the trial takes its worker).
        results["tfsd_warm"]["refill_waits_s"] = [w for before, w in pool_waits if before == "tfsd_warm"]
        results["pool_waits"] = [{"after": before, "s": w} for before, w in pool_waits]
        results["phases"]["rounds"] = {"load_before": load, "load_after": load_average()}
        for name in raw:
            f = results[name]
            log(f"- {name}: first line p50 {f['time_to_first_line']['p50_ms']:.1f} ms "
                f"p90 {f['time_to_first_line']['p90_ms']:.1f} ms; wall p50 {f['wall']['p50_ms']:.0f} ms; "
                f"client RSS {f['client_rss_growth_mib']:+.2f} MiB")

        # A kept Python session: the daemon's view of the worker's private memory. The pool
        # refills (untimed) before the first call, so these trials run with no worker starting
        # beside them: their own run, next to the run_isolated ones, shows what the refill's
        # import costs a trial that runs while it goes on.
        wait_for_pool(tfsd)
        with tfsd.python_session(labels={"bench": "python_trials"}) as session:
            wait_for_pool(tfsd)
            info = session.info()
            private = [info.memory.private_bytes / MIB]
            rss = [info.memory.rss_bytes / MIB]
            bodies = []
            for k in range(kept_trials):
                result = session.call(trial, 5_000 + k, epochs)
                bodies.append((result["finished"] - result["started"]) * 1e3)
                info = session.info()
                private.append(info.memory.private_bytes / MIB)
                rss.append(info.memory.rss_bytes / MIB)
            results["kept_session"] = {
                "worker_pid": info.worker_pid, "private_mib": private, "rss_mib": rss,
                "trial_body_ms": bodies,
                "note": "the daemon's SessionInfo.memory: fresh worker, then after each trial "
                        "in the same process (no reset between); the pool full before the first "
                        "call (no worker starting beside the trials)",
            }
        log(f"- kept session: private {' → '.join(f'{v:.0f}' for v in private)} MiB; trial's own "
            f"run {', '.join(f'{v:.0f}' for v in bodies)} ms with no refill running")

        # 1b: back to back, no pause: the pool drains.
        wait_for_pool(tfsd)
        load = load_average()
        spawns_before = daemon.spawns()
        status_before = tfsd.status()
        samples: list[tuple[float, int]] = []
        sampling = threading.Event()

        def sample_pool() -> None:
            sampler = tfsd_client.connect(daemon.address)
            while not sampling.is_set():
                samples.append((time.time(), sampler.status().warm_python_workers))
                time.sleep(0.1)
            sampler.close()

        sampler = threading.Thread(target=sample_pool, daemon=True)
        sampler.start()
        phase_start = time.time()
        calls, res, returned, before, after = [], [], [], [], []
        for i in range(trials):
            before.append(proc_memory()["rss"])
            call, result, done = tfsd_trial(tfsd, 1_000 + i, epochs)
            after.append(proc_memory()["rss"])
            calls.append(call)
            res.append(result)
            returned.append(done)
        phase_s = time.time() - phase_start
        sampling.set()
        sampler.join()
        spawns_after = daemon.spawns()
        status_after = tfsd.status()
        drained = figures(calls, res, returned, before, after)
        drained["phase_s"] = phase_s
        drained["warm_at_start"] = status_before.warm_python_workers
        drained["warm_at_end"] = status_after.warm_python_workers
        drained["pool_samples"] = [(round(t - phase_start, 2), n) for t, n in samples]
        if spawns_before is not None and spawns_after is not None:
            drained["spawns"] = spawns_after - spawns_before
            drained["spawn_rate_per_s"] = drained["spawns"] / phase_s
        # Workers made ready over the phase: the N the trials took, less the pool's own change.
        ready = trials - status_before.warm_python_workers + status_after.warm_python_workers
        drained["workers_ready"] = ready
        drained["ready_rate_per_s"] = ready / phase_s
        drained["trials_per_s"] = trials / phase_s
        drained["empty_fraction"] = (
            sum(1 for _, n in samples if n == 0) / len(samples) if samples else float("nan"))
        results["tfsd_drained"] = drained
        results["phases"]["drained"] = {"load_before": load, "load_after": load_average()}
        log(f"- tfsd_drained: first line p50 {drained['time_to_first_line']['p50_ms']:.0f} ms "
            f"p90 {drained['time_to_first_line']['p90_ms']:.0f} ms; wall p50 "
            f"{drained['wall']['p50_ms']:.0f} ms; {trials / phase_s:.2f} trials/s; workers "
            f"started {drained.get('spawns')} ({drained.get('spawn_rate_per_s', float('nan')):.2f}/s); "
            f"client RSS {drained['client_rss_growth_mib']:+.2f} MiB")
        results["worker_starts"] = daemon.worker_starts()
        results["versions"] = {"python": sys.version.split()[0],
                               "tfsd_client": getattr(tfsd_client, "__version__", "")}
        tfsd.close()
    finally:
        daemon.stop()

    # 3: in-process, last, in a subprocess of its own; the daemon is stopped by now.
    load = load_average()
    results["in_process"] = run_in_process(trials, epochs)
    results["phases"]["in_process"] = {"load_before": load, "load_after": load_average()}
    f = results["in_process"]
    log(f"- in_process: first line p50 {f['time_to_first_line']['p50_ms']:.3f} ms; wall p50 "
        f"{f['wall']['p50_ms']:.0f} ms (clear_session + gc p50 {f['cleanup']['p50_ms']:.0f} ms); "
        f"RSS {f['rss_after_warmup_mib']:.0f} → {f['rss_after_each_mib'][-1]:.0f} MiB, "
        f"{f['leak_rss_mib_per_trial']:+.2f} MiB/trial (private {f['leak_private_mib_per_trial']:+.2f})")

    warm = results["tfsd_warm"]["time_to_first_line"]["p50_ms"]
    spawn = results["spawn"]["time_to_first_line"]["p50_ms"]
    results["ratios"] = {
        "spawn_over_tfsd_first_line_p50": spawn / warm,
        "spawn_over_tfsd_wall_p50": results["spawn"]["wall"]["p50_ms"] / results["tfsd_warm"]["wall"]["p50_ms"],
        "drained_over_warm_first_line_p50":
            results["tfsd_drained"]["time_to_first_line"]["p50_ms"] / warm,
    }
    starts = [s["seconds"] for s in results.get("worker_starts", [])]
    if starts:
        results["worker_start_s"] = {"n": len(starts), "p50": percentile(starts, 50),
                                     "max": max(starts)}
    results["load_after"] = load_average()
    results["duration_s"] = time.monotonic() - started_at
    log(f"- spawn / tfsd time to first line (p50): {results['ratios']['spawn_over_tfsd_first_line_p50']:.0f}×")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "python_trials.json"
        path.write_text(json.dumps(results, indent=1))
        log(f"- results in {path}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "in-process":
        in_process_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
