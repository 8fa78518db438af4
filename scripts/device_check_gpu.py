"""The GPU device check's driver (see scripts/device-check-gpu, which runs it only where NVML
sees a GPU, with this repository's packages on PYTHONPATH).

It starts the release `tfsd` with a Python pool whose workers preload the GPU framework found
here, creates one Python session with a GPU hard limit, and checks, printing one JSON line:
1. attribution: after the session allocates a known amount on GPU 0, tfsd's per-session figure
   is within 5% of what NVML reports for the worker's pid;
2. the hard limit: allocating past the session's GPU hard limit makes the policy recycle it
   (a RECYCLED event with trigger "gpu_hard_limit", or WORKER_EXITED and RESTORED if the
   sample fell inside the allocating call, and a new worker pid);
3. memory given back: after the recycle the device's free memory is within 1% (of the
   device's total) of what it was before the session allocated anything;
4. nothing else touched: every process on the device that was not tfsd's before is still there.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pynvml

from tfsd_client._gen.tfsd.v1 import control_pb2 as pb

SERVICE = "/tfsd.v1.SessionService/"
MIB = 1024 * 1024
ALLOCATE = 2 << 30  # what the session holds for the attribution check
HARD_LIMIT = 4 << 30  # the session's GPU hard limit
DEADLINE = 90.0  # seconds, for each wait


def framework(python: str) -> str:
    """The GPU framework the session preloads: TensorFlow where it exists, else torch."""
    for name in ("tensorflow", "torch"):
        found = subprocess.run(
            [python, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{name}') is None)"],
            check=False,
        )
        if found.returncode == 0:
            return name
    raise SystemExit("device-check-gpu: neither tensorflow nor torch is importable here")


ALLOCATE_SOURCE = {
    "torch": (
        "import sys, torch, tfsd_worker\n"
        "n = int(sys.argv[1])\n"
        "blocks = tfsd_worker.state.get('blocks', [])\n"
        "blocks.append(torch.ones(n, dtype=torch.uint8, device='cuda:0'))\n"
        "torch.cuda.synchronize()\n"
        "tfsd_worker.state.blocks = blocks\n"
        "print(sum(b.numel() for b in blocks))\n"
    ),
    "tensorflow": (
        "import sys, tensorflow as tf, tfsd_worker\n"
        "n = int(sys.argv[1])\n"
        "blocks = tfsd_worker.state.get('blocks', [])\n"
        "with tf.device('/GPU:0'):\n"
        "    blocks.append(tf.ones([n], dtype=tf.uint8))\n"
        "tfsd_worker.state.blocks = blocks\n"
        "print(sum(int(b.shape[0]) for b in blocks))\n"
    ),
}


class Daemon:
    def __init__(self, tfsd: str, python: str, preload: str, directory: str) -> None:
        config = os.path.join(directory, "tfsd.toml")
        with open(config, "w") as file:
            file.write(
                "[workers]\n"
                # No graph sessions here (no libtensorflow): the graph pool stays empty.
                'binary = "/bin/true"\npool_size = 0\npool_max = 0\n'
                "[python]\n"
                f"interpreter = {json.dumps(python)}\n"
                f"preload = [{json.dumps(preload)}]\npool_size = 1\n"
                f"env = {{ PYTHONPATH = {json.dumps(os.environ.get('PYTHONPATH', ''))} }}\n"
                "[policy]\n"
                # No host hard limit: its rlimit backstop would cap CUDA's address space.
                'hard_limit = "off"\nmax_hard_limit = "off"\ninterval = "250ms"\n'
                "[sandbox]\nenabled = false\n"
            )
        env = dict(os.environ, RUST_LOG="info", TFSD_METRICS_LISTEN="", TFSD_MASTER_LISTEN="")
        self.process = subprocess.Popen(
            [tfsd, "serve", "--config", config, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(directory, "tfsd.log"), "w"),
            env=env,
            text=True,
        )
        self.log = os.path.join(directory, "tfsd.log")
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        started = time.monotonic()
        while True:
            if time.monotonic() - started > DEADLINE:
                self.stop()
                raise RuntimeError(f"tfsd did not start within {DEADLINE} s: {self.log_tail()}")
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tfsd exited with {self.process.returncode}: {self.log_tail()}")
                continue
            if line.startswith("tfsd listening on "):
                self.address = line.split()[-1]
                break
        self.channel = grpc.insecure_channel(self.address)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log) as file:
                return "".join(file.readlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"

    def unary(self, method: str, request, response):
        call = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return call(request, timeout=DEADLINE)

    def stream(self, method: str, request, response):
        call = self.channel.unary_stream(
            SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return call(request, timeout=DEADLINE * 3)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_script(daemon: Daemon, session_id: str, source: str, argv: list[str]) -> str:
    request = pb.CallRequest(
        session_id=session_id,
        script=pb.Script(path="allocate.py", source=source.encode(), argv=argv),
        timeout_ms=int(DEADLINE * 1000),
    )
    stdout = []
    for event in daemon.stream("Call", request, pb.CallEvent):
        kind = event.WhichOneof("event")
        if kind == "output" and event.output.stream == pb.STREAM_STDOUT:
            stdout.append(event.output.data.decode())
        elif kind == "exception":
            raise RuntimeError(f"the session's script raised {event.exception.type_name}: {event.exception.message}")
    return "".join(stdout)


def nvml_bytes(handle, pid: int) -> int | None:
    for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if process.pid == pid:
            return process.usedGpuMemory
    return None


def other_pids(handle, ours: set[int]) -> set[int]:
    return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)} - ours


def wait_for(what: str, check):
    started = time.monotonic()
    while time.monotonic() - started < DEADLINE:
        value = check()
        if value is not None:
            return value
        time.sleep(0.2)  # polling an outside figure (NVML); no event to wait on
    raise TimeoutError(f"{what} within {DEADLINE:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tfsd", required=True)
    parser.add_argument("--python", required=True)
    args = parser.parse_args()
    began = time.monotonic()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    preload = framework(args.python)
    figures: dict = {
        "check": "device-check-gpu",
        "gpu": True,
        "device": pynvml.nvmlDeviceGetName(handle),
        "total_bytes": total,
        "framework": preload,
    }
    failures: list[str] = []
    directory = tempfile.mkdtemp(prefix="tfsd-device-check-")
    # A daemon started as root runs its workers as nobody, who must import the worker
    # package and the framework from where they are: say so now rather than after the
    # pool's retries.
    if os.geteuid() == 0:
        probe = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", args.python, "-c",
             f"import tfsd_worker, {preload}"],
            capture_output=True, text=True, env=dict(os.environ), timeout=DEADLINE,
        )
        if probe.returncode != 0:
            failures.append(
                "running as root, tfsd runs its workers as nobody, who cannot import "
                f"tfsd_worker and {preload} with PYTHONPATH={os.environ.get('PYTHONPATH', '')}: "
                f"{probe.stderr.strip()[-500:]} (put the repository where every user can read "
                "it, or run the check as an unprivileged user)"
            )
    if not failures:
        try:
            daemon = Daemon(args.tfsd, args.python, preload, directory)
        except Exception as error:  # noqa: BLE001 - reported in the JSON line
            failures.append(f"{type(error).__name__}: {error}")
    if failures:
        figures["elapsed_s"] = round(time.monotonic() - began, 1)
        figures["failures"] = failures
        figures["ok"] = False
        print(json.dumps(figures), flush=True)
        return 1
    try:
        status = daemon.unary("GetDaemonStatus", pb.GetDaemonStatusRequest(), pb.DaemonStatus)
        figures["tfsd_gpu"] = status.gpu
        others_before = other_pids(handle, set())
        session = daemon.unary(
            "CreateSession",
            pb.CreateSessionRequest(
                runtime=pb.RUNTIME_PYTHON,
                memory_policy=pb.MemoryPolicy(gpu_hard_limit_bytes=HARD_LIMIT),
                gpus=pb.GpuPlacement(devices=[0]),
            ),
            pb.CreateSessionResponse,
        ).session
        first_pid = session.worker_pid
        free_before = pynvml.nvmlDeviceGetMemoryInfo(handle).free
        figures["free_before_bytes"] = free_before
        events = daemon.stream("WatchEvents", pb.WatchEventsRequest(session_id=session.session_id), pb.SessionEvent)

        # 1. Attribution.
        source = ALLOCATE_SOURCE[preload]
        figures["allocated_bytes"] = int(run_script(daemon, session.session_id, source, [str(ALLOCATE)]).strip())

        def both():
            info = daemon.unary("GetSession", pb.GetSessionRequest(session_id=session.session_id), pb.SessionInfo)
            ours = sum(g.used_bytes for g in info.memory.gpu)
            nvml = nvml_bytes(handle, first_pid)
            return (ours, nvml) if ours and nvml else None

        ours, nvml = wait_for("tfsd and NVML both report the session's GPU memory", both)
        figures["tfsd_session_gpu_bytes"] = ours
        figures["nvml_pid_bytes"] = nvml
        figures["attribution_error_pct"] = round(abs(ours - nvml) / nvml * 100, 3)
        if figures["attribution_error_pct"] > 5:
            failures.append("tfsd's per-session figure is more than 5% off NVML's")

        # 2. The hard limit: past it, the policy recycles the session.
        try:
            run_script(daemon, session.session_id, source, [str(HARD_LIMIT)])
        except (grpc.RpcError, RuntimeError) as error:
            # The recycle may kill the worker under the call itself.
            figures["breaching_call"] = str(error)[:200]
        # Between calls the policy recycles (RECYCLED); if its sample falls inside the call,
        # it kills the worker under it and restores the session (WORKER_EXITED, RESTORED).
        # Either way the event names the trigger.
        acted = None
        for event in events:
            if event.kind in (pb.EVENT_KIND_RECYCLED, pb.EVENT_KIND_WORKER_EXITED) and event.trigger:
                acted = event
                break
        if acted is None:
            failures.append("no RECYCLED event after the GPU hard limit was passed")
        else:
            figures["action"] = pb.EventKind.Name(acted.kind)
            figures["action_trigger"] = acted.trigger
            figures["action_reason"] = acted.reason
            if acted.HasField("memory_before"):
                figures["gpu_before_action_bytes"] = sum(g.used_bytes for g in acted.memory_before.gpu)
            if acted.trigger != "gpu_hard_limit":
                failures.append(f"the policy acted for {acted.trigger!r}, not 'gpu_hard_limit'")

        def replaced():
            info = daemon.unary("GetSession", pb.GetSessionRequest(session_id=session.session_id), pb.SessionInfo)
            ready = info.state == pb.SESSION_STATE_READY and info.worker_pid not in (0, first_pid)
            return info if ready else None

        info = wait_for("the session back in a fresh worker", replaced)
        figures["worker_pid_before"] = first_pid
        figures["worker_pid_after"] = info.worker_pid

        # 3. Memory back: the old worker's pool is gone from the device.
        def given_back():
            if nvml_bytes(handle, first_pid) is not None:
                return None
            free = pynvml.nvmlDeviceGetMemoryInfo(handle).free
            return free if abs(free - free_before) <= total * 0.01 else None

        try:
            free_after = wait_for("the device's free memory back within 1%", given_back)
        except TimeoutError as error:
            failures.append(str(error))
            free_after = pynvml.nvmlDeviceGetMemoryInfo(handle).free
        figures["free_after_bytes"] = free_after
        figures["free_diff_pct_of_total"] = round(abs(free_after - free_before) / total * 100, 3)

        # 4. Nothing else touched.
        missing = others_before - other_pids(handle, set())
        figures["other_processes_before"] = len(others_before)
        if missing:
            failures.append(f"processes not tfsd's left the device: {sorted(missing)}")
    except grpc.RpcError as error:
        failures.append(f"{error.code().name}: {error.details()}")
    except Exception as error:  # every failure ends in the JSON line, not a traceback alone
        failures.append(f"{type(error).__name__}: {error}")
    finally:
        daemon.stop()
        figures["elapsed_s"] = round(time.monotonic() - began, 1)
        figures["failures"] = failures
        figures["ok"] = not failures
        if failures:
            figures["log"] = daemon.log
            figures["log_tail"] = daemon.log_tail()
        print(json.dumps(figures), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
