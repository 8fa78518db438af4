"""The Python side of the tfsd benchmarks: TensorFlow's own gRPC server and tfsd's MasterService,
both through TensorFlow's Python client (`tf.compat.v1.Session("grpc://...")`), tfsd.v1 through a
grpcio client, and TensorFlow in-process, on the same graphs as the Rust benches.

    .venv/bin/python benches/peers.py --tfsd target/release/tfsd --out target/bench [--quick]

Measures (and writes `peers.json` in --out):
- steps: a fed [4, 4] float32 placeholder through a tiny MatMul; p50/p99 and steps/s with 1 and 4
  client threads, for in-process `Session.run`, TF's server (`tf.distribute.Server` in its own
  Python process), tfsd's MasterService, and tfsd.v1 from grpcio;
- large tensors: a 64 MiB float32 feed and fetch through TF's server, tfsd's MasterService and
  tfsd.v1 from grpcio;
- restarts: a Python process that imports TensorFlow and runs one step, from spawn to exit;
  TF's server killed and started again, from the kill to the client's first result; a session
  created, run once and closed on TF's server and on tfsd's MasterService; TF's `Session.reset`.

Every process here runs with TF_ENABLE_ONEDNN_OPTS=0, as tfsd's workers do, so every system runs
TensorFlow's same kernels and the differences are transport and process costs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SIDE = 4  # common::MATMUL_SIDE in benches/common/mod.rs
LARGE_BYTES = 64 << 20
THREADS = 4
DEADLINE_S = 120.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Statistics, in the shape the Rust benches write (benches/common/mod.rs, Latencies::summary).


def percentile(samples: list[float], p: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = int(-(-p / 100.0 * len(ordered) // 1))  # ceil
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def summary(micros: list[float], keep_samples: bool = True) -> dict:
    result = {
        "n": len(micros),
        "p50_us": percentile(micros, 50),
        "p90_us": percentile(micros, 90),
        "p99_us": percentile(micros, 99),
        "min_us": percentile(micros, 0),
        "max_us": percentile(micros, 100),
        "mean_us": sum(micros) / len(micros) if micros else 0.0,
    }
    if keep_samples:
        result["samples_us"] = [round(us, 1) for us in micros]
    return result


def cpu_seconds(pid: int) -> float:
    """CPU time of a process so far, summed over its live threads (schedstat, ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread exited meanwhile
    return total / 1e9


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# ---------------------------------------------------------------------------------------------
# Processes: TF's server and the tfsd daemon.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_line_with(process: subprocess.Popen, prefix: str, deadline_s: float) -> str:
    """Reads the process's stdout until a line starts with `prefix`; returns the rest."""
    found: list[str] = []

    def reader() -> None:
        for line in process.stdout:
            if line.startswith(prefix):
                found.append(line[len(prefix) :].strip())
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(deadline_s)
    if not found:
        process.kill()
        raise RuntimeError(f"{process.args!r} did not print {prefix!r} within {deadline_s} s")
    return found[0]


def drain(process: subprocess.Popen) -> None:
    """Keeps reading a child's stdout so that it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()


class TfServer:
    """TensorFlow's own gRPC server, `tf.distribute.Server`, in its own Python process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "serve-tf", str(self.port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        read_line_with(self.process, "ready", DEADLINE_S)
        drain(self.process)
        self.target = f"grpc://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(DEADLINE_S)


def serve_tf(port: int) -> None:
    import tensorflow as tf

    cluster = tf.train.ClusterSpec({"local": [f"127.0.0.1:{port}"]})
    server = tf.distribute.Server(cluster, job_name="local", task_index=0, start=True)
    print("ready", flush=True)
    server.join()


class Tfsd:
    """The tfsd daemon with tfsd.v1 and MasterService on free ports."""

    def __init__(self, binary: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFSD_")}
        env.update(
            TFSD_METRICS_LISTEN="",
            TFSD_MASTER_LISTEN="127.0.0.1:0",
            RUST_LOG=os.environ.get("PEERS_TFSD_LOG", "warn"),
        )
        self.process = subprocess.Popen(
            [str(binary), "serve", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        self.master: str | None = None
        self.address: str | None = None
        deadline = time.monotonic() + DEADLINE_S
        # "tfsd master on ADDR" comes before "tfsd listening on ADDR" (src/daemon.rs).
        result: list[str] = []

        def reader() -> None:
            for line in self.process.stdout:
                if line.startswith("tfsd master on "):
                    self.master = line.split(" on ", 1)[1].strip()
                if line.startswith("tfsd listening on "):
                    self.address = line.split(" on ", 1)[1].strip()
                    result.append("ok")
                    return

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
        if not result:
            self.process.kill()
            raise RuntimeError("tfsd did not say it listens")
        drain(self.process)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(DEADLINE_S)


# ---------------------------------------------------------------------------------------------
# tfsd.v1 stubs, generated like python/tests/conftest.py does.


def tfsd_v1_stubs(out: Path):
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # In a child process: grpc_tools' compiler crashes in a process that has loaded TensorFlow.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={REPO_ROOT / 'proto'}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "tfsd/v1/tfsd.proto",
        ],
        check=True,
        cwd=REPO_ROOT,
    )
    # TensorFlow's TensorProto first, so tfsd.proto's import resolves to TensorFlow's class.
    from tensorflow.core.framework import tensor_pb2  # noqa: F401

    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    return (
        importlib.import_module("tfsd.v1.tfsd_pb2"),
        importlib.import_module("tfsd.v1.tfsd_pb2_grpc"),
    )


# ---------------------------------------------------------------------------------------------
# Graphs: the same as benches/common/mod.rs builds.


def step_graph(tf):
    import numpy as np

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [SIDE, SIDE], name="x")
        w = tf.constant(np.arange(SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE), name="w")
        y = tf.linalg.matmul(x, w, name="y")
    feed = (np.arange(SIDE * SIDE, dtype=np.float32) * 0.5).reshape(SIDE, SIDE)
    return graph, x, y, feed


def large_graph(tf, elements: int):
    graph = tf.Graph()
    with graph.as_default():
        big_in = tf.compat.v1.placeholder(tf.float32, None, name="big_in")
        big_in_size = tf.size(big_in, out_type=tf.int32, name="big_in_size")
        big_out = tf.raw_ops.VariableV2(shape=[elements], dtype=tf.float32, name="big_out")
        fill = tf.compat.v1.placeholder(tf.float32, [], name="big_out_fill")
        big_init = tf.raw_ops.Assign(
            ref=big_out, value=tf.fill([elements], fill), name="big_out_init"
        )
        big_read = tf.identity(big_out, name="big_out_read")
    return graph, big_in, big_in_size, fill, big_init, big_read


# ---------------------------------------------------------------------------------------------
# Measurements.


def measure_interleaved(
    contenders: dict[str, tuple], warmup: int, sequential: int, concurrent_s: float, rounds: int
) -> dict:
    """Measures every contender (name → (step function, {process name: pid})) in turns.

    `rounds` rounds of sequential steps, the order rotating each round, so that a burst of load
    from other users of the shared machine falls on every system alike; then the same with
    THREADS concurrent callers. The processes are metered (with this client process) during the
    sequential steps, for the CPU each spends per step."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name][0]()
    per_round = -(-sequential // rounds)
    t1: dict[str, list[float]] = {name: [] for name in names}
    t1_elapsed = dict.fromkeys(names, 0.0)
    cpu = {name: dict.fromkeys(["client", *contenders[name][1]], 0.0) for name in names}
    for round_ in range(rounds):
        for turn in range(len(names)):
            name = names[(round_ + turn) % len(names)]
            step, processes = contenders[name]
            meter = {"client": os.getpid(), **processes}
            before = {k: cpu_seconds(pid) for k, pid in meter.items()}
            started = time.perf_counter()
            for _ in range(per_round):
                t = time.perf_counter()
                step()
                t1[name].append((time.perf_counter() - t) * 1e6)
            t1_elapsed[name] += time.perf_counter() - started
            for k, pid in meter.items():
                cpu[name][k] += cpu_seconds(pid) - before[k]

    concurrent_rounds = max(1, -(-rounds // 2))
    block = concurrent_s / concurrent_rounds
    t4: dict[str, list[float]] = {name: [] for name in names}
    t4_elapsed = dict.fromkeys(names, 0.0)
    for round_ in range(concurrent_rounds):
        for turn in range(len(names)):
            name = names[(round_ + turn) % len(names)]
            step = contenders[name][0]
            per_thread: list[list[float]] = [[] for _ in range(THREADS)]
            errors: list[BaseException] = []
            deadline = time.perf_counter() + block

            def loop(samples: list[float]) -> None:
                try:
                    while time.perf_counter() < deadline:
                        t = time.perf_counter()
                        step()
                        samples.append((time.perf_counter() - t) * 1e6)
                except BaseException as error:  # reported below, in the main thread
                    errors.append(error)

            started = time.perf_counter()
            threads = [threading.Thread(target=loop, args=(s,)) for s in per_thread]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            t4_elapsed[name] += time.perf_counter() - started
            if errors:
                raise errors[0]
            t4[name].extend(us for samples in per_thread for us in samples)

    return {
        name: {
            "t1": {
                "latency": summary(t1[name]),
                "steps_per_s": len(t1[name]) / t1_elapsed[name],
                "cpu_us_per_step": {k: v * 1e6 / len(t1[name]) for k, v in cpu[name].items()},
            },
            "t4": {"latency": summary(t4[name]), "steps_per_s": len(t4[name]) / t4_elapsed[name]},
        }
        for name in names
    }


def describe_steps(name: str, figures: dict) -> None:
    t1, t4 = figures["t1"], figures["t4"]
    cpu = ", ".join(f"{k} {v:.0f} µs" for k, v in t1["cpu_us_per_step"].items())
    log(
        f"- {name}: 1 thread p50 {t1['latency']['p50_us']:.0f} µs p99 "
        f"{t1['latency']['p99_us']:.0f} µs {t1['steps_per_s']:.0f} steps/s; {THREADS} threads "
        f"p50 {t4['latency']['p50_us']:.0f} µs p99 {t4['latency']['p99_us']:.0f} µs "
        f"{t4['steps_per_s']:.0f} steps/s"
    )
    log(f"  CPU per step (1 thread): {cpu}")


def timed(fn, repeats: int) -> list[float]:
    """Seconds per call, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def transfer_figures(feed_s: list[float], fetch_s: list[float]) -> dict:
    def one(samples):
        median = percentile(samples, 50)
        return {"median_s": median, "mb_per_s": LARGE_BYTES / 1e6 / median, "samples_s": samples}

    return {"feed": one(feed_s), "fetch": one(fetch_s)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tfsd", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("BENCH_QUICK", "0") not in ("", "0")
    warmup, sequential, concurrent_s = (50, 300, 0.5) if quick else (500, 5000, 4.0)
    rounds = 2 if quick else 10
    large_repeats = 2 if quick else 7
    restart_repeats = 2 if quick else 5
    cycle_repeats = 5 if quick else 20
    load_before = load_average()

    stub_dir = Path(tempfile.mkdtemp(prefix="tfsd-bench-stubs-"))
    # Stubs before TensorFlow is imported (see tfsd_v1_stubs).
    import grpc

    tf_server = TfServer()
    tfsd = Tfsd(args.tfsd)
    log(
        f"peers: TF server at {tf_server.target}, tfsd.v1 at {tfsd.address}, "
        f"MasterService at {tfsd.master or 'not available'}; load {load_before:.2f}"
    )
    pb, rpc = tfsd_v1_stubs(stub_dir)
    import numpy as np
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    results: dict = {"steps": {}, "large": {}, "restarts": {}, "threads": THREADS}
    results["master_available"] = tfsd.master is not None
    results["versions"] = {"tensorflow": tf.__version__, "grpcio": grpc.__version__,
                           "python": sys.version.split()[0]}
    try:
        channel = grpc.insecure_channel(tfsd.address, options=CHANNEL_OPTIONS)
        stub = rpc.SessionServiceStub(channel)

        def newest_worker() -> int:
            """The worker of the MasterService session created last."""
            sessions = [s for s in stub.ListSessions(pb.ListSessionsRequest()).sessions
                        if s.labels.get("tfsd.origin") == "master"]
            newest = max(sessions, key=lambda s: (s.created_at.seconds, s.created_at.nanos))
            return newest.worker_pid

        graph, x, y, feed = step_graph(tf)
        targets = {"in_process_python": "", "tf_server": tf_server.target}
        if tfsd.master:
            targets["tfsd_master"] = f"grpc://{tfsd.master}"
        # An experiment beside the defaults: a ConfigProto that makes TensorFlow run each step
        # in the calling thread (inter_op_parallelism_threads = -1), for both servers.
        inline = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=-1)
        runs = [(name, target, None) for name, target in targets.items()]
        runs.append(("tf_server_inline", tf_server.target, inline))
        if tfsd.master:
            runs.append(("tfsd_master_inline", f"grpc://{tfsd.master}", inline))
        # Every system's session open at once, so that they can take turns.
        contenders: dict[str, tuple] = {}
        sessions = []
        expected = feed @ np.arange(SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)
        for name, target, config in runs:
            session = tf.compat.v1.Session(target, graph=graph, config=config)
            sessions.append(session)
            assert np.allclose(session.run(y, {x: feed}), expected), name
            if name.startswith("tf_server"):
                processes = {"server": tf_server.process.pid}
            elif name.startswith("tfsd_master"):
                processes = {"supervisor": tfsd.process.pid, "worker": newest_worker()}
            else:
                processes = {}
            contenders[name] = (lambda s=session: s.run(y, {x: feed}), processes)
        created = stub.CreateSession(
            pb.CreateSessionRequest(graph_def=graph.as_graph_def().SerializeToString())
        )
        request = pb.RunRequest(
            session_id=created.session.session_id,
            feeds={"x": tf.make_tensor_proto(feed)},
            fetches=["y:0"],
        )
        contenders["tfsd_v1_python"] = (
            lambda: stub.Run(request),
            {"supervisor": tfsd.process.pid, "worker": created.session.worker_pid},
        )
        results["steps"] = measure_interleaved(contenders, warmup, sequential, concurrent_s, rounds)
        for name, figures in results["steps"].items():
            describe_steps(name, figures)
        for session in sessions:
            session.close()
        stub.CloseSession(pb.CloseSessionRequest(session_id=created.session.session_id))

        # 64 MiB each way.
        elements = LARGE_BYTES // 4
        big = np.arange(elements, dtype=np.float32) % 1000
        lgraph, big_in, big_in_size, fill, big_init, big_read = large_graph(tf, elements)
        large_targets = {"tf_server": tf_server.target}
        if tfsd.master:
            large_targets["tfsd_master"] = f"grpc://{tfsd.master}"
        for name, target in large_targets.items():
            with tf.compat.v1.Session(target, graph=lgraph) as session:

                def feed_once():
                    assert session.run(big_in_size, {big_in: big}) == elements

                def fetch_once():
                    assert session.run(big_read).nbytes == LARGE_BYTES

                feed_s = timed(feed_once, large_repeats)
                # As a target: fetching a ref-typed output crashes the worker (see BENCHMARKS.md).
                session.run(big_init.op, {fill: 1.0})
                fetch_s = timed(fetch_once, large_repeats)
            results["large"][name] = transfer_figures(feed_s, fetch_s)
            log(
                f"- 64 MiB via {name}: feed {results['large'][name]['feed']['mb_per_s']:.0f} MB/s,"
                f" fetch {results['large'][name]['fetch']['mb_per_s']:.0f} MB/s"
            )
        created = stub.CreateSession(
            pb.CreateSessionRequest(graph_def=lgraph.as_graph_def().SerializeToString())
        )
        sid = created.session.session_id
        big_proto = tf.make_tensor_proto(big)
        feed_request = pb.RunRequest(
            session_id=sid, feeds={"big_in": big_proto}, fetches=["big_in_size:0"]
        )

        def v1_feed_once():
            out = stub.Run(feed_request).outputs[0]
            assert tf.make_ndarray(out) == elements

        def v1_fetch_once():
            out = stub.Run(pb.RunRequest(session_id=sid, fetches=["big_out_read:0"])).outputs[0]
            assert tf.make_ndarray(out).nbytes == LARGE_BYTES

        feed_s = timed(v1_feed_once, large_repeats)
        stub.Run(
            pb.RunRequest(
                session_id=sid,
                feeds={"big_out_fill": tf.make_tensor_proto(1.0, dtype=tf.float32)},
                targets=["big_out_init"],
            )
        )
        fetch_s = timed(v1_fetch_once, large_repeats)
        results["large"]["tfsd_v1_python"] = transfer_figures(feed_s, fetch_s)
        log(
            f"- 64 MiB via tfsd_v1_python (make_tensor_proto once, make_ndarray per fetch): feed "
            f"{results['large']['tfsd_v1_python']['feed']['mb_per_s']:.0f} MB/s, fetch "
            f"{results['large']['tfsd_v1_python']['fetch']['mb_per_s']:.0f} MB/s"
        )
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))

        # Create, run once, close: TF's server and tfsd's MasterService (a warm worker each
        # time: the pool is refilled, untimed, between cycles).
        def cycle(target):
            with tf.compat.v1.Session(target, graph=graph) as session:
                session.run(y, {x: feed})

        def wait_for_pool():
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline:
                status = stub.GetDaemonStatus(pb.GetDaemonStatusRequest())
                if status.warm_workers >= status.warm_pool_size:
                    return
                time.sleep(0.01)
            raise RuntimeError("tfsd's warm pool did not refill")

        cycles = {"tf_server": []}
        cycle(tf_server.target)
        for _ in range(cycle_repeats):
            t = time.perf_counter()
            cycle(tf_server.target)
            cycles["tf_server"].append((time.perf_counter() - t) * 1e6)
        if tfsd.master:
            cycles["tfsd_master"] = []
            for _ in range(cycle_repeats):
                wait_for_pool()
                t = time.perf_counter()
                cycle(f"grpc://{tfsd.master}")
                cycles["tfsd_master"].append((time.perf_counter() - t) * 1e6)
        results["restarts"]["create_run_close"] = {k: summary(v) for k, v in cycles.items()}
        for name, samples in cycles.items():
            log(f"- create+run+close on {name}: p50 {percentile(samples, 50) / 1e3:.1f} ms")

        # TF's Session.reset: the closest TF's server has to a reset (it closes every session).
        resets = []
        for _ in range(cycle_repeats):
            session = tf.compat.v1.Session(tf_server.target, graph=graph)
            session.run(y, {x: feed})
            t = time.perf_counter()
            tf.compat.v1.Session.reset(tf_server.target)
            resets.append((time.perf_counter() - t) * 1e6)
            try:
                session.close()
            except tf.errors.AbortedError:
                pass  # Reset already closed it on the server, as it closes every session.
        results["restarts"]["tf_server_session_reset"] = summary(resets)
        log(f"- TF server Session.reset: p50 {percentile(resets, 50) / 1e3:.2f} ms")

        # Restarting TF's server: kill it, start it again, first result on the client.
        restarts = []
        for _ in range(restart_repeats):
            t = time.perf_counter()
            tf_server.kill()
            tf_server = TfServer()
            cycle(tf_server.target)
            restarts.append((time.perf_counter() - t) * 1e6)
        results["restarts"]["tf_server_restart"] = summary(restarts)
        log(f"- TF server restart to a first result: p50 {percentile(restarts, 50) / 1e6:.2f} s")
    finally:
        tf_server.kill()
        tfsd.stop()

    # A Python process that imports TensorFlow and runs one step: spawn to exit.
    snippet = (
        "import numpy as np, tensorflow as tf; tf.compat.v1.disable_eager_execution(); "
        "x = tf.compat.v1.placeholder(tf.float32, [4, 4]); y = tf.linalg.matmul(x, x); "
        "tf.compat.v1.Session().run(y, {x: np.ones((4, 4), np.float32)})"
    )
    imports = []
    for _ in range(restart_repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", snippet], check=True)
        imports.append((time.perf_counter() - t) * 1e6)
    results["restarts"]["python_process_restart"] = summary(imports)
    log(f"- Python process importing TF, one step, exit: p50 {percentile(imports, 50) / 1e6:.2f} s")

    results["bench"] = "peers"
    results["quick"] = quick
    results["load_before"] = load_before
    results["load_after"] = load_average()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "peers.json"
        path.write_text(json.dumps(results, indent=1))
        log(f"- results in {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve-tf":
        serve_tf(int(sys.argv[2]))
    else:
        main()
