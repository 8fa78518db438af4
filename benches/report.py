"""Writes BENCHMARKS.md and benches/plots/*.png from the JSON files the benches leave.

    .venv/bin/python benches/report.py --results target/bench --command "scripts/bench"

Inputs (in --results): step_latency.json, reset_cost.json, reset_memory.json,
policy_reaction.json, scale.json, flood.json (the Rust benches), peers.json (benches/peers.py),
python_trials.json (benches/python_trials.py) and machine.json (scripts/bench). A missing file
leaves its section saying so. benches/analysis.md, when present, is appended as the
hand-written reading of the run.

    .venv/bin/python benches/report.py --results target/bench --only python_trials --output FILE

renders only that part's section (with the machine it ran on) into FILE, leaving BENCHMARKS.md
alone: for a run of one part when the other parts' results are not at hand (parts: python_trials,
flood, overshoot, step_latency: its Rust side, TCP and the Unix socket side by side).

Every ratio in the report compares figures measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def us(value: float) -> str:
    return f"{value:,.0f} µs"


def ms(value_us: float) -> str:
    value = value_us / 1e3
    return f"{value:,.2f} ms" if value < 10 else f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def secs(value_us: float) -> str:
    return f"{value_us / 1e6:.2f} s"


def ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "—"
    return f"{a / b:.2f}×"


def times_faster(value: float, peer: float | None) -> str:
    """How many times `value` fits in `peer`: "5,500× less" reads better than "0.00×"."""
    if not peer or not value:
        return "—"
    factor = peer / value
    if factor >= 1.05:
        return f"{factor:,.0f}× less" if factor >= 10 else f"{factor:.1f}× less"
    return f"{value / peer:.2f}×"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def load_note(part: dict | None) -> str:
    if not part:
        return ""
    return f"load average {part.get('load_before', float('nan')):.1f} → {part.get('load_after', float('nan')):.1f}"


# ---------------------------------------------------------------------------------------------
# Plots.


def ecdf_plot(path: Path, title: str, series: dict[str, list[float]]) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, samples in series.items():
        if not samples:
            continue
        ordered = sorted(samples)
        n = len(ordered)
        ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{name} (n={n})")
    ax.set_xscale("log")
    ax.set_xlabel("round trip (µs, log scale)")
    ax.set_ylabel("fraction of steps ≤ x")
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.axhline(0.99, color="grey", lw=0.5, ls=":")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def box_plot(path: Path, title: str, series: dict[str, list[float]], xlabel: str) -> None:
    names = [n for n, s in series.items() if s]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ax.boxplot([series[n] for n in names], orientation="horizontal", whis=(1, 99), showfliers=True)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, which="both", axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_plot(path: Path, rows: list[dict]) -> None:
    groups = sorted({(r["onednn"], r["variable_bytes"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.5), sharey=False)
    axes = axes if len(groups) > 1 else [axes]
    for ax, (onednn, size) in zip(axes, groups):
        mine = [r for r in rows if r["onednn"] == onednn and r["variable_bytes"] == size]
        labels = [r["step"].replace("RecycleSession", "Recycle").replace(" preserve_variables", "\n+preserve")
                  .replace("(init: run big_init)", "init") for r in mine]
        xs = range(len(mine))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [r["private_before_mib"] for r in mine], width,
               label="before", color="#d9822b")
        ax.bar([x + width / 2 for x in xs], [r["private_after_mib"] for r in mine], width,
               label="after", color="#2b7bd9")
        baseline = mine[0]["fresh_baseline_mib"] if mine else 0
        ax.axhline(baseline, color="black", lw=1, ls="--", label=f"fresh worker {baseline:.0f} MiB")
        for r, x in zip(mine, xs):
            for s in r.get("samples", []):
                ax.plot(x + width / 2, s["private_after_mib"], "k.", ms=3)
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=30, ha="right")
        size_label = f"{size >> 30} GiB" if size % (1 << 30) == 0 else f"{size // MIB} MiB"
        ax.set_title(f"{size_label} variable, TF_ENABLE_ONEDNN_OPTS={onednn}", fontsize=9)
        ax.set_ylabel("worker private memory (MiB)")
        ax.legend(fontsize=7)
    fig.suptitle("Private memory before and after each reset (bars: medians; dots: each run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scale_plot(path: Path, levels: list[dict]) -> None:
    sessions = [l["sessions"] for l in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(sessions, [l["supervisor_rss_bytes"] / MIB for l in levels], "o-", label="supervisor RSS")
    a.plot(sessions, [l["supervisor_private_bytes"] / MIB for l in levels], "s-", label="supervisor private")
    a.axhline(50, color="red", ls=":", label="target: RSS < 50 MiB")
    a.set_xlabel("sessions")
    a.set_ylabel("MiB")
    a.set_title("Supervisor memory")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    for key, label in (("list_sessions", "ListSessions"), ("purge_variables", "PurgeVariables")):
        b.plot(sessions, [l[key]["p50_us"] / 1e3 for l in levels], "o-", label=f"{label} p50")
        b.plot(sessions, [l[key]["p99_us"] / 1e3 for l in levels], "x--", label=f"{label} p99")
    b.set_xlabel("sessions")
    b.set_ylabel("ms (4 clients running steps)")
    b.set_yscale("log")
    b.set_title("Control-call latency under load")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Sections.


STEP_SYSTEMS = [
    # (key, source, system, client)
    ("in_process_rust", "rust", "in-process TF_SessionRun (floor)", "Rust `tensorflow` crate"),
    ("tfsd_v1_rust", "rust", "tfsd.v1", "Rust tonic"),
    ("tfsd_v1_rust_unix", "rust", "tfsd.v1, Unix socket", "Rust tonic"),
    ("in_process_python", "py", "in-process `Session.run`", "TF Python"),
    ("tf_server", "py", "TF's server (`tf.distribute.Server`)", "TF Python `Session(\"grpc://…\")`"),
    ("tfsd_master", "py", "tfsd MasterService", "TF Python `Session(\"grpc://…\")`"),
    ("tfsd_v1_python", "py", "tfsd.v1", "Python grpcio stub"),
    # Experiments: the same steps in sessions whose ConfigProto sets inter_op_parallelism_threads
    # = -1 (TensorFlow runs the step in the calling thread).
    ("in_process_rust_inline", "rust", "in-process, inter_op = -1 †", "Rust `tensorflow` crate"),
    ("tfsd_v1_rust_inline", "rust", "tfsd.v1, inter_op = -1 †", "Rust tonic"),
    ("tf_server_inline", "py", "TF's server, inter_op = -1 †", "TF Python `Session(\"grpc://…\")`"),
    ("tfsd_master_inline", "py", "tfsd MasterService, inter_op = -1 †", "TF Python `Session(\"grpc://…\")`"),
]


def steps_section(out: list[str], plots: Path, rust: dict | None, py: dict | None, targets: list) -> None:
    out.append("## 1. Step round trip (fed [4, 4] placeholder → MatMul)\n")
    if not rust and not py:
        out.append("Not measured in this run.\n")
        return
    figures = {}
    if rust:
        figures.update({k: v for k, v in rust["steps"].items()})
    if py:
        figures.update({k: v for k, v in py["steps"].items()})
    tf_server = figures.get("tf_server")
    floor = figures.get("in_process_rust")
    rows = []
    for key, _, system, client in STEP_SYSTEMS:
        f = figures.get(key)
        if key == "tfsd_master" and f is None and py:
            rows.append([system, client, "not available in this build"] + ["—"] * 7)
            continue
        if f is None:
            continue
        t1, t4 = f["t1"], f["t4"]
        vs_server = ratio(t1["latency"]["p50_us"], tf_server["t1"]["latency"]["p50_us"]) if tf_server else "—"
        vs_floor = (f"{t1['latency']['p50_us'] - floor['t1']['latency']['p50_us']:+,.0f} µs"
                    if floor and key != "in_process_rust" else "—")
        rows.append([
            system, client,
            us(t1["latency"]["p50_us"]), us(t1["latency"]["p99_us"]), f"{t1['steps_per_s']:,.0f}",
            us(t4["latency"]["p50_us"]), us(t4["latency"]["p99_us"]), f"{t4['steps_per_s']:,.0f}",
            vs_server, vs_floor,
        ])
    threads = (rust or py or {}).get("threads", 4)
    out.append(table(
        ["system", "client", "p50 (1 thread)", "p99 (1 thread)", "steps/s (1 thread)",
         f"p50 ({threads} threads)", f"p99 ({threads} threads)", f"steps/s ({threads} threads)",
         "p50 vs TF's server", "p50 over the Rust floor"],
        rows, "llrrrrrrrr"))
    out.append(
        "\n† An experiment, not a default: the session's ConfigProto sets "
        "`inter_op_parallelism_threads = -1`, so TensorFlow runs the step in the calling thread "
        "instead of its inter-op pool. \"p50 vs TF's server\" compares each row with TF's server "
        "in its default configuration.\n")
    cpu_rows = []
    for key, _, system, client in STEP_SYSTEMS:
        cpu = (figures.get(key) or {}).get("t1", {}).get("cpu_us_per_step")
        if cpu:
            server_side = {k: v for k, v in cpu.items() if k != "client"}
            server_text = (" + ".join(f"{k} {v:,.0f}" for k, v in server_side.items()) + " µs"
                           if server_side else "— (in-process)")
            cpu_rows.append([system, client, us(cpu.get("client", 0)), server_text,
                             us(sum(cpu.values()))])
    if cpu_rows:
        out.append("CPU per step with 1 client thread (each process's threads summed, from "
                   "schedstat; independent of how busy the machine was):\n")
        out.append(table(["system", "client", "client CPU", "server-side CPU", "total CPU"],
                         cpu_rows, "llrrr"))
        out.append("")
    python_load = f"; Python figures: {load_note(py)}" if py else ""
    out.append(
        f"\n{threads} threads: {threads} concurrent callers on one session and one connection "
        "(TF's Python client shares its channel between threads). Rust figures: "
        f"{load_note(rust)}{python_load}.\n")
    series1 = {}
    series4 = {}
    for key, _, system, client in STEP_SYSTEMS:
        f = figures.get(key)
        if f and "†" not in system:  # the experiments are in the table only
            label = f"{system} — {client}".replace("`", "")
            series1[label] = f["t1"]["latency"].get("samples_us", [])
            series4[label] = f["t4"]["latency"].get("samples_us", [])
    if series1:
        ecdf_plot(plots / "step_latency_1thread.png", "Step round trip, 1 client thread", series1)
        ecdf_plot(plots / "step_latency_4threads.png", f"Step round trip, {threads} client threads", series4)
        out.append("![step latency, 1 thread](benches/plots/step_latency_1thread.png)\n")
        out.append(f"![step latency, {threads} threads](benches/plots/step_latency_4threads.png)\n")

    master = figures.get("tfsd_master")
    if master and tf_server:
        r = master["t1"]["latency"]["p50_us"] / tf_server["t1"]["latency"]["p50_us"]
        targets.append(("tfsd MasterService step p50 ≤ 0.6× TF's server (same Python client)",
                        f"{r:.2f}× ({us(master['t1']['latency']['p50_us'])} vs "
                        f"{us(tf_server['t1']['latency']['p50_us'])})", r <= 0.6))
    else:
        targets.append(("tfsd MasterService step p50 ≤ 0.6× TF's server", "MasterService not measured", None))
    v1 = figures.get("tfsd_v1_rust")
    if v1 and floor:
        overhead = v1["t1"]["latency"]["p50_us"] - floor["t1"]["latency"]["p50_us"]
        targets.append(("tfsd.v1 overhead over in-process ≤ 150 µs p50",
                        f"{overhead:,.0f} µs ({us(v1['t1']['latency']['p50_us'])} − "
                        f"{us(floor['t1']['latency']['p50_us'])})", overhead <= 150))
    unix = figures.get("tfsd_v1_rust_unix")
    if unix and floor:
        overhead = unix["t1"]["latency"]["p50_us"] - floor["t1"]["latency"]["p50_us"]
        targets.append(("tfsd.v1 over the Unix socket: overhead over in-process ≤ 100 µs p50",
                        f"{overhead:,.0f} µs ({us(unix['t1']['latency']['p50_us'])} − "
                        f"{us(floor['t1']['latency']['p50_us'])})", overhead <= 100))


def large_section(out: list[str], rust: dict | None, py: dict | None, targets: list) -> None:
    out.append("## 2. Large tensors (64 MiB float32)\n")
    if not rust and not py:
        out.append("Not measured in this run.\n")
        return
    rows = []
    entries = []
    if rust:
        entries.append(("tfsd.v1", "Rust tonic", rust["large"]["tfsd_v1_rust"]))
        if "tfsd_v1_rust_unix" in rust["large"]:
            entries.append(("tfsd.v1, Unix socket", "Rust tonic", rust["large"]["tfsd_v1_rust_unix"]))
    if py:
        names = {"tf_server": ("TF's server", "TF Python"), "tfsd_master": ("tfsd MasterService", "TF Python"),
                 "tfsd_v1_python": ("tfsd.v1", "Python grpcio (make_tensor_proto / make_ndarray)")}
        for key, (system, client) in names.items():
            if key in py["large"]:
                entries.append((system, client, py["large"][key]))
    server = py["large"].get("tf_server") if py else None
    for system, client, f in entries:
        rows.append([
            system, client,
            f"{f['feed']['mb_per_s']:,.0f} MB/s", f"{f['feed']['median_s'] * 1e3:,.0f} ms",
            f"{f['fetch']['mb_per_s']:,.0f} MB/s", f"{f['fetch']['median_s'] * 1e3:,.0f} ms",
            ratio(f["feed"]["mb_per_s"], server["feed"]["mb_per_s"]) if server else "—",
            ratio(f["fetch"]["mb_per_s"], server["fetch"]["mb_per_s"]) if server else "—",
        ])
    out.append(table(["system", "client", "feed", "feed time (median)", "fetch", "fetch time (median)",
                      "feed vs TF's server", "fetch vs TF's server"], rows, "llrrrrrr"))
    out.append("\nFeed: `Size(big_in)` of a fed 64 MiB tensor (4 bytes come back). Fetch: "
               "`Identity` of a 64 MiB variable. MB = 10⁶ bytes; medians of the repeats after one "
               "warm-up each.\n")
    if rust and rust["large"]["tfsd_v1_rust"]["feed"].get("cpu_us"):
        f = rust["large"]["tfsd_v1_rust"]
        def cpu_text(cpu):
            return ", ".join(f"{k} {v / 1e3:,.0f} ms" for k, v in cpu.items())
        out.append(f"CPU per 64 MiB through tfsd.v1 (Rust client): feed — {cpu_text(f['feed']['cpu_us'])}; "
                   f"fetch — {cpu_text(f['fetch']['cpu_us'])}. {load_note(rust)}.\n")
        unix = rust["large"].get("tfsd_v1_rust_unix")
        if unix and unix["feed"].get("cpu_us"):
            out.append(f"The same over the Unix socket: feed — {cpu_text(unix['feed']['cpu_us'])}; "
                       f"fetch — {cpu_text(unix['fetch']['cpu_us'])}.\n")
    if rust:
        f = rust["large"]["tfsd_v1_rust"]
        worst = min(f["feed"]["mb_per_s"], f["fetch"]["mb_per_s"])
        targets.append(("64 MiB tensors ≥ 1 GB/s each way (tfsd.v1)",
                        f"feed {f['feed']['mb_per_s']:,.0f} MB/s, fetch {f['fetch']['mb_per_s']:,.0f} MB/s",
                        worst >= 1000))
        unix = rust["large"].get("tfsd_v1_rust_unix")
        if unix:
            worst = min(unix["feed"]["mb_per_s"], unix["fetch"]["mb_per_s"])
            targets.append(("64 MiB tensors ≥ 1.5 GB/s each way (tfsd.v1, Unix socket)",
                            f"feed {unix['feed']['mb_per_s']:,.0f} MB/s, "
                            f"fetch {unix['fetch']['mb_per_s']:,.0f} MB/s",
                            worst >= 1500))


def resets_section(out: list[str], plots: Path, resets: dict | None, py: dict | None, targets: list) -> None:
    out.append("## 3. Reset costs\n")
    if not resets and not py:
        out.append("Not measured in this run.\n")
        return
    restart = py["restarts"] if py else {}
    python_restart = restart.get("python_process_restart", {}).get("p50_us")
    server_restart = restart.get("tf_server_restart", {}).get("p50_us")
    rows = []
    series = {}
    names = [
        ("purge_variables", "tfsd PurgeVariables"),
        ("reset_graph", "tfsd ResetGraph"),
        ("recycle_warm", "tfsd RecycleSession, warm worker"),
        ("first_step_after_recycle_warm", "first step in the fresh worker after a warm recycle"),
        (
            "first_step_after_recycle_warm_refilled",
            "the same, once the pool has refilled (no worker starting beside it)",
        ),
        ("recycle_warm_preserve", "tfsd RecycleSession, warm, preserve_variables (256 KiB)"),
        ("recycle_cold", "tfsd RecycleSession, cold (pool_size = 0)"),
        ("recycle_cold_preserve", "tfsd RecycleSession, cold, preserve_variables"),
        ("create_run_close_warm", "tfsd.v1 CreateSession + 1 step + CloseSession, warm"),
        ("create_run_close_cold", "tfsd.v1 CreateSession + 1 step + CloseSession, cold"),
    ]
    for key, label in names:
        if not resets or key not in resets["resets"]:
            continue
        f = resets["resets"][key]
        c = f["client"]
        daemon = ms(f["daemon"]["p50_us"]) if f.get("daemon") else "—"
        rows.append([label, ms(c["p50_us"]), ms(c["p99_us"]), daemon,
                     times_faster(c["p50_us"], python_restart), times_faster(c["p50_us"], server_restart)])
        series[label] = c.get("samples_us", [])
    peer_rows = [
        ("create_run_close", "tfsd_master", "tfsd MasterService: Session create + 1 step + close, warm"),
        ("create_run_close", "tf_server", "TF's server: Session create + 1 step + close"),
        ("tf_server_session_reset", None, "TF's server: `Session.reset` (closes every session on it)"),
        ("tf_server_restart", None, "TF's server process killed and restarted, to a first result"),
        ("python_process_restart", None, "Python process: start, `import tensorflow`, 1 step, exit"),
    ]
    for key, sub, label in peer_rows:
        f = restart.get(key)
        if f and sub:
            f = f.get(sub)
        if not f:
            continue
        rows.append([label, ms(f["p50_us"]), ms(f["p99_us"]), "—",
                     times_faster(f["p50_us"], python_restart), times_faster(f["p50_us"], server_restart)])
        series[label.replace("`", "")] = f.get("samples_us", [])
    out.append(table(["operation", "p50", "p99", "daemon's own p50", "p50 vs Python process restart",
                      "p50 vs TF server restart"], rows, "lrrrrr"))
    if resets:
        n = resets["resets"]["purge_variables"]["client"]["n"]
        out.append(f"\nSmall step graph plus a 256 KiB variable, initialised before each reset; {n} of "
                   "each; client wall time (the daemon's own `duration_us` beside it). A warm "
                   f"recycle starts with a full pool (refilled, untimed, between calls). {load_note(resets)}.\n")
    if series:
        # The samples are µs; the axis shows ms.
        box_plot(plots / "reset_latency.png", "Reset and restart costs (whiskers p1–p99)",
                 {k: [v / 1e3 for v in s] for k, s in series.items()}, "milliseconds (log scale)")
        out.append("![reset costs](benches/plots/reset_latency.png)\n")
    if resets and "recycle_warm" in resets["resets"]:
        p50 = resets["resets"]["recycle_warm"]["client"]["p50_us"]
        targets.append(("RecycleSession p50 ≤ 50 ms with a warm worker (small graph)", ms(p50), p50 <= 50_000))


def memory_section(out: list[str], plots: Path, mem: dict | None, targets: list) -> None:
    out.append("## 4. Memory each reset returns\n")
    if not mem:
        out.append("Not measured in this run.\n")
        return
    rows = []
    for r in mem["rows"]:
        size = f"{r['variable_bytes'] >> 30} GiB" if r["variable_bytes"] % (1 << 30) == 0 else f"{r['variable_bytes'] // MIB} MiB"
        env = "0 (tfsd default)" if r["onednn"] == "0" else r["onednn"]
        init = r["step"].startswith("(init")
        rows.append([env, size, r["step"], f"{r['private_before_mib']:.1f}", f"{r['private_after_mib']:.1f}",
                     f"{r['fresh_baseline_mib']:.1f}", f"{r['after_minus_baseline_mib']:+.1f}",
                     f"{r['after_minus_baseline_percent']:+.0f}%",
                     "—" if init else f"{r['given_back_percent']:.0f}%", f"{r['duration_ms']:,.0f} ms"])
    out.append(table(["TF_ENABLE_ONEDNN_OPTS", "variable", "step", "private before MiB", "private after MiB",
                      "fresh worker MiB", "after − fresh MiB", "after vs fresh", "given back", "time"],
                     rows, "llrrrrrrrr"))
    out.append(f"\nMedians of {mem['repeats']} sessions per row. Private = the worker's RssAnon. "
               "Init: the fresh worker → after filling the variable (the Run as the client saw it). "
               "Resets: memory and duration from ResetResponse; a recycle's \"after\" is the new worker; "
               "a preserving recycle carries the variable over, so its \"after\" holds it again. "
               f"{load_note(mem)}.\n")
    memory_plot(plots / "reset_memory.png", mem["rows"])
    out.append("![memory before and after each reset](benches/plots/reset_memory.png)\n")
    recycles = [r for r in mem["rows"] if r["step"] == "RecycleSession"]
    if recycles:
        worst = max(abs(r["after_minus_baseline_percent"]) for r in recycles)
        targets.append(("RecycleSession returns private memory to within 5% of a fresh worker",
                        f"worst {worst:.1f}% over {len(recycles)} settings", worst <= 5))


def policy_section(out: list[str], policy: dict | None) -> None:
    out.append("## 5. Memory policy: reaction and sampler cost\n")
    if not policy:
        out.append("Not measured in this run.\n")
        return
    rows = []
    for key, label in (("soft", "soft limit 128 MiB → PurgeVariables (VARIABLES_PURGED)"),
                       ("hard", "hard limit 128 MiB → recycle (RECYCLED, or RESTORED after a kill mid-step)")):
        f = policy[key]
        before = f["private_before_mib"]
        before_text = f"{sorted(before)[len(before) // 2]:.0f}" if before else "—"
        after = sorted(f["private_after_mib"])[len(f["private_after_mib"]) // 2]
        rows.append([label, ms(f["reaction"]["p50_us"]), ms(f["reaction"]["p99_us"]), ms(f["reaction"]["max_us"]),
                     f"{before_text} → {after:.0f} MiB", f"{f['killed_mid_step']}/{f['trials']}"])
    out.append(table(["crossing", "memory back: p50", "p99", "max", "private before → after",
                      "killed mid-step"], rows, "lrrrrr"))
    out.append("\nA step fills a 200 MiB variable; the clock starts when that Run returns (memory is "
               "over the limit from then on; a worker killed mid-step returns the Run early) and stops "
               "when the event arrives on WatchEvents, which the daemon publishes after it measured the "
               "memory again. The sampler ticks every 250 ms, so up to one interval of waiting is part "
               "of every figure.\n")
    rows = []
    for s in policy["sampler"]:
        rows.append([s["interval"], str(s["sessions"]), f"{s['window_s']:.0f} s", f"{s['cpu_s'] * 1e3:,.1f} ms",
                     f"{s['cpu_percent']:.3f}%", f"{s['supervisor_rss_bytes'] / MIB:.1f} MiB"])
    out.append(table(["policy.interval", "idle sessions", "window", "supervisor CPU time", "of one core",
                      "supervisor RSS"], rows, "lrrrrr"))
    samplers = {s["interval"]: s for s in policy["sampler"]}
    if "250ms" in samplers and "1h" in samplers:
        extra = samplers["250ms"]["cpu_s"] - samplers["1h"]["cpu_s"]
        ticks = samplers["250ms"]["window_s"] / 0.25
        out.append(f"\nThe sampler's share: {extra * 1e3:,.1f} ms of CPU over {ticks:.0f} ticks ≈ "
                   f"{extra / ticks * 1e6:,.0f} µs per tick for {samplers['250ms']['sessions']} workers "
                   f"({extra / samplers['250ms']['window_s'] * 100:.3f}% of one core). CPU time is the sum "
                   "of the daemon's threads' schedstat (ns). " + load_note(policy) + ".\n")


def scale_section(out: list[str], plots: Path, scale: dict | None, targets: list) -> None:
    out.append("## 6. Scale: sessions in one daemon\n")
    if not scale:
        out.append("Not measured in this run.\n")
        return
    rows = []
    for l in scale["levels"]:
        rows.append([str(l["sessions"]), f"{l['supervisor_rss_bytes'] / MIB:.1f} MiB",
                     f"{l['supervisor_private_bytes'] / MIB:.1f} MiB",
                     f"{l['supervisor_cpu_busy_percent']:.1f}%", f"{l['supervisor_cpu_idle_percent']:.2f}%",
                     ms(l["list_sessions"]["p50_us"]), ms(l["list_sessions"]["p99_us"]),
                     ms(l["purge_variables"]["p50_us"]), ms(l["purge_variables"]["p99_us"]),
                     f"{l['steps_per_s']:,.0f}", us(l["steps"]["p50_us"]),
                     f"{l['workers_private_bytes'] / MIB:,.0f} MiB", f"{l['mem_available_bytes'] / MIB / 1024:.1f} GiB"])
    out.append(table(["sessions", "supervisor RSS", "supervisor private", "supervisor CPU (steps running)",
                      "supervisor CPU (idle)", "ListSessions p50", "p99", "PurgeVariables p50", "p99",
                      "steps/s", "step p50", "workers' private total", "available after"], rows))
    out.append(f"\n{scale['load_clients']} clients run steps on one connection, over the first sessions; "
               "a separate connection times ListSessions every ~50 ms and PurgeVariables on the last "
               "session every ~200 ms. CPU is % of one core. " + load_note(scale) + ".\n")
    if scale.get("stopped_early"):
        out.append(f"**Stopped early:** {scale['stopped_early']}\n")
    scale_plot(plots / "scale.png", scale["levels"])
    out.append("![scale](benches/plots/scale.png)\n")
    biggest = max(scale["levels"], key=lambda l: l["sessions"])
    targets.append((f"supervisor RSS < 50 MiB with 64 sessions",
                    f"{biggest['supervisor_rss_bytes'] / MIB:.1f} MiB with {biggest['sessions']} sessions",
                    biggest["supervisor_rss_bytes"] < 50 * MIB if biggest["sessions"] >= 64 else None))


def ms_text(value_ms: float) -> str:
    """Milliseconds for figures that range from microseconds to seconds."""
    if math.isnan(value_ms):
        return "—"
    if value_ms < 1:
        return f"{value_ms * 1e3:,.0f} µs"
    if value_ms < 10:
        return f"{value_ms:.1f} ms"
    if value_ms < 10_000:
        return f"{value_ms:,.0f} ms"
    return f"{value_ms / 1e3:,.1f} s"


def mib_range(values: list[float]) -> str:
    if not values:
        return "—"
    lo, hi, mid = min(values), max(values), sorted(values)[len(values) // 2]
    return f"{mid:.0f} MiB ({lo:.0f}–{hi:.0f})" if hi - lo >= 0.5 else f"{mid:.0f} MiB"


def python_trials_section(out: list[str], trials: dict | None) -> None:
    out.append("## 7. Keras 3 trials: a fresh, pre-imported process per trial\n")
    if not trials:
        out.append("Not measured in this run.\n")
        return
    n = trials["trials"]
    warm, drained, spawn, inproc = (trials.get(k) for k in ("tfsd_warm", "tfsd_drained", "spawn", "in_process"))
    pool = trials["pool_size"]
    out.append(
        f"The same trial in every system: {trials['model']}, {trials['epochs']} epochs, returning "
        "the loss. Its first statement records `time.time()`; **time to first line** is that minus "
        "the caller's `time.time()` just before the call (one clock, one machine), so it is what a "
        "caller waits before its code runs in a clean process. **Wall** is call to result. "
        f"{n} trials per system after an untimed warm-up; the daemon's Python pool holds {pool} "
        "workers (`[python] pool_size`).\n")
    rows = []

    def start_end(f: dict) -> str:
        return (f"{mib_range(f['worker_private_start_mib'])} → "
                f"{mib_range(f['worker_private_end_mib'])}")

    if warm:
        rows.append(["tfsd `run_isolated`, pool keeps up", "a warm worker from the pool (pool full before each call)",
                     ms_text(warm["time_to_first_line"]["p50_ms"]), ms_text(warm["time_to_first_line"]["p90_ms"]),
                     ms_text(warm["wall"]["p50_ms"]), ms_text(warm["trial_body"]["p50_ms"]),
                     f"{warm['client_rss_growth_mib']:+.2f} MiB", start_end(warm)])
    if drained:
        rows.append(["tfsd `run_isolated`, pool drained", "back to back, no pause: the pool empties",
                     ms_text(drained["time_to_first_line"]["p50_ms"]), ms_text(drained["time_to_first_line"]["p90_ms"]),
                     ms_text(drained["wall"]["p50_ms"]), ms_text(drained["trial_body"]["p50_ms"]),
                     f"{drained['client_rss_growth_mib']:+.2f} MiB", start_end(drained)])
    if spawn:
        rows.append(["`multiprocessing` spawn", "a new process that imports tensorflow and keras, then the trial",
                     ms_text(spawn["time_to_first_line"]["p50_ms"]), ms_text(spawn["time_to_first_line"]["p90_ms"]),
                     ms_text(spawn["wall"]["p50_ms"]), ms_text(spawn["trial_body"]["p50_ms"]),
                     f"{spawn['client_rss_growth_mib']:+.2f} MiB", start_end(spawn)])
    if inproc:
        rows.append(["in-process + `clear_session()`", "the caller's own process; `clear_session()` and "
                     "`gc.collect()` after each trial (in the wall)",
                     ms_text(inproc["time_to_first_line"]["p50_ms"]), ms_text(inproc["time_to_first_line"]["p90_ms"]),
                     ms_text(inproc["wall"]["p50_ms"]), ms_text(inproc["trial_body"]["p50_ms"]),
                     f"{inproc['rss_growth_mib']:+.2f} MiB",
                     f"{inproc['private_after_warmup_mib']:.0f} → {inproc['private_after_each_mib'][-1]:.0f} MiB over the run"])
    out.append(table(["system", "a trial runs in", "time to first line p50", "p90", "wall p50",
                      "trial's own run p50", f"client RSS over {n} trials", "trial process private: first line → end"],
                     rows, "llrrrrrl"))
    ratios = trials.get("ratios", {})
    phases = trials.get("phases", {})

    def phase_load(name: str) -> str:
        p = phases.get(name)
        return f"{p['load_before']:.1f} → {p['load_after']:.1f}" if p else "—"

    out.append(
        f"\nClient RSS: the benchmark process's VmRSS (it imports neither TensorFlow nor Keras; the "
        "in-process case runs in a subprocess of its own, whose RSS is its client's). For the two "
        "cases that take turns in one process (pool keeps up, spawn), each case's growth is the sum "
        "of the RSS changes across its own calls. Trial process private memory: RssAnon read by "
        "the trial itself at its first line and at its end (median, min–max). \"Trial's own run\": "
        "first line to return, inside the trial (a fresh process pays Keras' and TensorFlow's "
        "first-call costs: tracing, optimizer setup). The spawned process's time to first line is "
        f"the interpreter's start plus `import tensorflow, keras`. Load average: rounds of tfsd and "
        f"spawn {phase_load('rounds')}; drained {phase_load('drained')}; in-process "
        f"{phase_load('in_process')}.\n")

    kept = trials.get("kept_session") or {}
    if warm and spawn and warm["trial_body"]["p50_ms"] > 1.2 * spawn["trial_body"]["p50_ms"]:
        text = (f"The trial's own run is longer in tfsd's worker ({ms_text(warm['trial_body']['p50_ms'])} "
                f"p50) than in the spawned process ({ms_text(spawn['trial_body']['p50_ms'])}): the pool "
                "starts the taken worker's replacement at once, so on this 2-core machine the trial "
                "shares the CPUs with a new interpreter importing TensorFlow, while the spawned "
                "process runs alone (the benchmark waits for a full pool before every trial of "
                "either kind).")
        if kept.get("trial_body_ms"):
            bodies = kept["trial_body_ms"]
            text += (f" In a kept session whose refill had finished, the same trial ran in "
                     f"{ms_text(bodies[0])} in the fresh worker"
                     + (f" ({', '.join(ms_text(b) for b in bodies[1:])} for the next ones in that "
                        "worker)" if len(bodies) > 1 else "") + ".")
        out.append(text + "\n")

    targets: list[tuple[str, str, bool | None]] = []
    if warm:
        p50 = warm["time_to_first_line"]["p50_ms"]
        targets.append(("a trial starts in a fresh pre-imported process in ≤ 50 ms p50 (pool keeps up)",
                        ms_text(p50), p50 <= 50))
    if warm and spawn:
        r = ratios.get("spawn_over_tfsd_first_line_p50",
                       spawn["time_to_first_line"]["p50_ms"] / warm["time_to_first_line"]["p50_ms"])
        targets.append(("≥ 40× less overhead (time to first line) than a spawned process",
                        f"{r:,.0f}× ({ms_text(spawn['time_to_first_line']['p50_ms'])} vs "
                        f"{ms_text(warm['time_to_first_line']['p50_ms'])})", r >= 40))
    if warm:
        growths = [("pool keeps up", warm["client_rss_growth_mib"])]
        if drained:
            growths.append(("drained", drained["client_rss_growth_mib"]))
        worst = max(abs(g) for _, g in growths)
        text = ", ".join(f"{name} {g:+.2f} MiB" for name, g in growths)
        targets.append((f"client memory flat: RSS growth ≤ 1 MiB over 20 trials ({n} here)",
                        text, (worst <= 1) if n >= 20 else None))
    out.append(table(["target", "measured", ""],
                     [[t, m, "not measured (fewer than 20 trials)" if ok is None else
                       ("**met**" if ok else "**missed**")] for t, m, ok in targets], "llc"))
    out.append("")

    # The leak.
    out.append("### The leak: `clear_session()` in one process vs a process per trial\n")
    rows = []
    if inproc:
        for measure, start, each, per in (
                ("RSS", inproc["rss_after_warmup_mib"], inproc["rss_after_each_mib"], inproc["leak_rss_mib_per_trial"]),
                ("private (RssAnon)", inproc["private_after_warmup_mib"], inproc["private_after_each_mib"],
                 inproc["leak_private_mib_per_trial"])):
            rows.append(["in-process, `clear_session()` + `gc.collect()` after each trial", measure,
                         f"{start:.1f} MiB", f"{each[-1]:.1f} MiB", f"{each[-1] - start:+.1f} MiB", f"{per:+.2f} MiB"])
    if kept:
        private = kept["private_mib"]
        steps = len(private) - 1
        rows.append([f"tfsd `python_session`: {steps} trials in one kept worker, no reset between",
                     "private (the daemon's `info()`)", f"{private[0]:.1f} MiB (fresh)",
                     f"{private[-1]:.1f} MiB (after {steps})", f"{private[-1] - private[0]:+.1f} MiB",
                     f"{slope_of(private[1:] if steps >= 2 else private):+.2f} MiB"
                     + (" (after the first trial)" if steps >= 2 else "")])
    for key, label in (("tfsd_warm", "tfsd `run_isolated`, pool keeps up: the client"),
                       ("tfsd_drained", "tfsd `run_isolated`, back to back: the client")):
        f = trials.get(key)
        if f:
            rss = f["client_rss_mib"]
            rows.append([label, "RSS", f"{f['client_rss_before_first_mib']:.1f} MiB", f"{rss[-1]:.1f} MiB",
                         f"{f['client_rss_growth_mib']:+.2f} MiB", f"{slope_of(rss):+.3f} MiB"])
    out.append(table(["process", "memory", "start (after the warm-up)", f"after {n} trials", "growth",
                      "per trial (linear fit)"], rows, "llrrrr"))
    if inproc and warm:
        starts = warm["worker_private_start_mib"]
        out.append(
            f"\nIn-process, every trial leaves memory behind that `clear_session()` and `gc.collect()` "
            f"do not return: {inproc['leak_rss_mib_per_trial']:+.2f} MiB RSS per trial "
            f"({inproc['rss_growth_mib']:+.1f} MiB over {n} trials after a warm-up trial; private "
            f"{inproc['leak_private_mib_per_trial']:+.2f} MiB per trial), and the process keeps "
            f"its {inproc['rss_after_warmup_mib']:.0f} MiB RSS (TensorFlow and Keras loaded, one trial "
            f"run) for as long as it lives. With `run_isolated` each trial starts in a fresh worker at "
            f"{mib_range(starts)} private whatever ran before it, its process and every byte are "
            f"gone when the call returns, and the client, which never imports TensorFlow, stays at "
            f"{warm['client_rss_mib'][-1]:.0f} MiB. In-process, the cleanup itself costs "
            f"{ms_text(inproc['cleanup']['p50_ms'])} p50 per trial; importing TensorFlow and Keras "
            f"took {inproc['import_s']:.1f} s once.\n")

    # How the pool keeps up.
    if drained:
        starts = trials.get("worker_start_s") or {}
        samples = drained["time_to_first_line"]["samples_ms"]
        served = sum(1 for v in samples if v < 1000)
        waited = sorted(v for v in samples if v >= 1000)
        wait_text = (f"the {len(waited)} that found it empty waited {ms_text(percentile_of(waited, 50))} "
                     f"p50 ({ms_text(waited[0])}–{ms_text(waited[-1])}) for their first line"
                     if waited else "none found it empty")
        start_text = (f"{starts['p50']:.1f} s p50 (max {starts['max']:.1f} s, {starts['n']} workers, "
                      "from each worker's own log line)" if starts else "not recorded")
        spawns = drained.get("spawns")
        out.append("### How the pool keeps up with back-to-back trials\n")
        text = (f"The Python pool holds {pool} ready workers. A worker's start — a new interpreter "
                "that imports tensorflow and keras and runs one eager op — took ")
        if starts:
            text += (f"{starts['p50']:.1f} s p50 (max {starts['max']:.1f} s, {starts['n']} workers, "
                     "from each worker's own log line) on this machine during the run. The pool "
                     "refills one worker at a time, starting the next as soon as one is taken, so "
                     "its steady refill rate is about one worker per start time "
                     f"(~{1 / starts['p50']:.2f} workers/s here). ")
        else:
            text += "an unrecorded time (no worker logged it). The pool refills one worker at a time. "
        text += (
            "A caller that finds the pool empty gets a worker started for it (beside the one the "
            "refill is starting) and waits for that cold start, the import included; the refill's "
            "worker is then usually ready for the next caller. "
            f"With {n} trials back to back (each runs ~{ms_text(drained['trial_body']['p50_ms'])} "
            f"in its worker), {served} of {n} were served from a ready worker (first line < 1 s), and "
            f"{wait_text} (two workers starting at once on 2 cores). Over the phase "
            f"({drained['phase_s']:.0f} s) the daemon started {spawns if spawns is not None else '?'} "
            f"workers ({drained.get('spawn_rate_per_s', float('nan')):.2f}/s, metric "
            f"`tfsd_worker_spawns_total`), {drained['workers_ready']} became ready during it (the "
            f"{n} the trials took, less the pool's own change; {drained['ready_rate_per_s']:.2f} "
            f"workers/s), and callers completed {drained['trials_per_s']:.2f} trials/s; the pool was "
            f"empty {drained['empty_fraction'] * 100:.0f}% of the time (its status sampled every "
            f"100 ms). So the pool absorbs a burst of {pool} trials at warm-pool speed and then "
            "sustains about one trial per worker start; trials that come no faster than that always "
            "find a warm worker, and a larger `[python] pool_size` absorbs bigger bursts")
        if warm and warm["worker_private_start_mib"]:
            text += (f" (each ready worker holds ~{sorted(warm['worker_private_start_mib'])[len(warm['worker_private_start_mib']) // 2]:.0f} "
                     "MiB private memory)")
        text += "."
        if warm and warm.get("refill_waits_s"):
            waits = [w * 1e3 for w in warm["refill_waits_s"]]
            text += (" In the pool-keeps-up rounds, the pool was full again "
                     f"{ms_text(percentile_of(waits, 50))} p50 (max {ms_text(max(waits))}) after a "
                     "tfsd trial returned: the refill starts when the trial takes its worker, so "
                     "part of each start overlaps the trial (and slows it, as above).")
        out.append(text + "\n")


def slope_of(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


def percentile_of(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = int(-(-p / 100.0 * len(ordered) // 1))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def flood_plot(path: Path, configurations: list[dict]) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for c in configurations:
        series = c.get("workers_series") or []
        if series:
            a.step([t for t, _ in series], [n for _, n in series], where="post", label=c["name"])
        done = sorted(s / 1e6 for s in c["time_to_session"].get("samples_us", []))
        if done:
            b.step([0] + done, range(len(done) + 1), where="post", label=c["name"])
    a.set_xlabel("seconds since the flood started")
    a.set_ylabel("live worker processes")
    a.set_title("Workers alive (sampled every 50 ms)")
    b.set_xlabel("seconds since the flood started")
    b.set_ylabel("sessions created")
    b.set_title("Sessions created so far")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def flood_section(out: list[str], plots: Path, flood: dict | None) -> None:
    out.append("## 8. Create flood: admission for worker starts\n")
    if not flood:
        out.append("Not measured in this run.\n")
        return
    configurations = flood["configurations"]
    n = flood["creates"]
    out.append(
        f"{n} CreateSessions sent at once, each on a gRPC connection of its own (connected before "
        f"the flood), to a daemon with `[workers] pool_size = {flood['pool_size']}` and §1's step "
        f"graph (a [4, 4] MatMul and a 256 KiB variable), on {flood['cores']} cores. **unbounded**: "
        "`max_concurrent_starts = 256`, `max_waiting_creates = 100000`, what the daemon did before "
        "it had admission for worker starts (every create that finds the pool empty starts a worker at once). **bounded**: the "
        "defaults. Both configurations in one run, one daemon each, one after the other.\n")

    def secs_text(value_us: float, count: int) -> str:
        return secs(value_us) if count else "—"

    def cell(c: dict, key: str) -> str:
        t = c["time_to_session"]
        h = c["health"]
        failed = ", ".join(f"{count} {code}" for code, count in c["failed"].items()) or "0"
        refusal = c.get("time_to_refusal") or {}
        return {
            "limits": (f"{c['max_concurrent_starts']} starts at once, {c['max_waiting_creates']:,} "
                       f"creates may wait ({c['start_wait_s']:.0f} s)"),
            "succeeded": f"{c['succeeded']} of {c['creates']}",
            "refused": (f"{c['refused']}" + (f" (each answered within {ms(refusal['max_us'])})"
                                             if c["refused"] and refusal.get("n") else "")),
            "failed": failed,
            "p50": secs_text(t["p50_us"], t["n"]),
            "p90": secs_text(t["p90_us"], t["n"]),
            "max": secs_text(t["max_us"], t["n"]),
            "flood": f"{c['flood_s']:.1f} s",
            "peak_workers": str(c["peak_workers"]),
            "peak_not_serving": str(c.get("peak_workers_not_serving", "—")),
            "workers_seen": str(c["workers_seen"]),
            "load": f"{c['load_at_start']:.1f} → {c['peak_load1']:.1f}",
            "runnable": str(c["peak_runnable"]),
            "health": (f"{h['not_serving']} of {h['checks']} NOT_SERVING "
                       f"({h['into_not_serving']} times into it)"),
            "health_latency": (f"{ms(h['latency']['p50_us'])} / {ms(h['latency']['p99_us'])} / "
                               f"{ms(h['latency']['max_us'])}" if h["latency"]["n"] else "—"),
            "unanswered": f"{h['no_answer']}" + (f", {h['other']} other answers" if h["other"] else ""),
            "after": (f"{c['workers_after_close']} ({c['pooled_after_close']} ready in the pool)"
                      if "pooled_after_close" in c else str(c["workers_after_close"])),
        }[key]

    figures = [
        ("worker starts", "limits"),
        ("sessions created", "succeeded"),
        ("refused (RESOURCE_EXHAUSTED)", "refused"),
        ("failed otherwise", "failed"),
        ("time to session p50", "p50"),
        ("time to session p90", "p90"),
        ("time to session max", "max"),
        ("last answer after", "flood"),
        ("peak live workers", "peak_workers"),
        ("peak live workers not serving a session yet", "peak_not_serving"),
        ("distinct workers seen", "workers_seen"),
        ("1-min load average: at start → peak", "load"),
        ("peak runnable threads (machine)", "runnable"),
        ("health check answers", "health"),
        ("health check p50 / p99 / max (answered)", "health_latency"),
        (f"health checks unanswered in {flood['health_check_deadline_s']} s", "unanswered"),
        ("workers alive after closing every session", "after"),
    ]
    out.append(table(["", *(c["name"] for c in configurations)],
                     [[label, *(cell(c, key) for c in configurations)] for label, key in figures],
                     "l" + "r" * len(configurations)))
    out.append(
        "\nTime to session: from each create's send to its answer, for those that succeeded. Live "
        "workers: the daemon's children in `/proc` that are not zombies, sampled every "
        f"{flood['process_sample_ms']} ms from the flood's start to its last answer (workers starting, "
        "ready in the pool, or serving a session); not serving a session yet: live workers less the "
        "sessions answered so far, so a worker starting, loading its graph or ready in the pool, "
        "and a create's worker until its answer arrives (bounded by the starts at once, plus the "
        "pool, plus the graphs loading); distinct workers seen counts each pid once, the "
        "warm worker the flood began with included. Runnable threads: `procs_running` of the whole "
        "machine, sampled with them. Health: grpc.health.v1 `Check` of `tfsd.v1.SessionService` every "
        f"{flood['health_check_ms']} ms on a connection of its own while the flood ran. After the "
        "flood every session ran one step, was closed, and the bench waited until no worker was left "
        "but the warm pool's ready ones (the pool grows by one each time a take finds it empty, up "
        f"to `workers.pool_max`, and shrinks back after a minute without takes). A create "
        f"unanswered after {flood['create_deadline_s']} s would count as NO_ANSWER. "
        f"{load_note(flood)}; the load average is a 1-minute mean, so the second configuration "
        "starts with some of the first one's load.\n")
    examples = [(c["name"], code, message) for c in configurations
                for code, message in c.get("examples", {}).items()]
    if examples:
        out.append("What the creates that got no session were told (one per configuration and code):\n")
        for name, code, message in examples:
            out.append(f"- {name}, {code}: \"{message}\"")
        out.append("")
    flood_plot(plots / "flood.png", configurations)
    out.append("![create flood](benches/plots/flood.png)\n")


def overshoot_section(out: list[str], overshoot: dict | None) -> None:
    out.append("## 9. Hard limit: how far one step gets past it\n")
    if not overshoot:
        out.append("Not measured in this run.\n")
        return
    limit = overshoot["hard_limit_bytes"] / MIB
    step = overshoot["step_bytes"] / MIB
    labels = {"sampling": "sampling only (before per-worker cgroups)",
              "cgroup": "cgroup per worker (the kernel)",
              "rlimit": "RLIMIT_DATA backstop"}
    rows = []
    for mode in overshoot["modes"]:
        trials = mode["trials"]
        dips = sorted(t["available_dip_mib"] for t in trials)
        peaks = sorted(t["peak_private_mib"] for t in trials)
        answered = sorted(t["answered_ms"] for t in trials)
        back = sorted(t["serving_again_ms"] for t in trials)
        codes = sorted({t["code"] for t in trials})
        worker = "kept" if all("OOM when allocating" in t["message"] for t in trials) else "killed, restored"
        rows.append([labels.get(mode["mode"], mode["mode"]), "/".join(codes),
                     f"{peaks[len(peaks) // 2]:,.0f} MiB (max {peaks[-1]:,.0f})",
                     f"{dips[len(dips) // 2]:,.0f} MiB (max {dips[-1]:,.0f})",
                     f"{answered[len(answered) // 2]:,.0f} ms", f"{back[len(back) // 2]:,.0f} ms", worker])
    out.append(table(["workers.memory_enforcement", "step answered", "worker's peak private: median",
                      "machine's memory taken: median", "answer", "serving again", "worker"], rows,
                     "llrrrrl"))
    reasons = [t["exit_reason"] for m in overshoot["modes"] if m["mode"] == "sampling"
               for t in m["trials"] if t["exit_reason"]]
    seen = f" The policy's kill reason in one sampling trial: “{reasons[0]}”." if reasons else ""
    out.append(f"\nOne step fills a {step:,.0f} MiB variable in a session whose hard limit is "
               f"{limit:,.0f} MiB, {len(overshoot['modes'][0]['trials'])} trials per mode, side by side "
               "in one run (policy.interval 250 ms in every mode). The worker's private memory (RssAnon) "
               "and MemAvailable are sampled every millisecond from before the step until its answer: "
               "the highest private figure, and the lowest MemAvailable against the figure before. Sampling stops the step only at its next tick, after the worker went "
               "past the limit by however much it allocated meanwhile (more, the faster it allocates); "
               "the cgroup stops the allocation at the limit itself; the rlimit refuses it inside "
               "TensorFlow (ResourceExhausted \"OOM when allocating\", the worker and its session "
               f"untouched).{seen} " + load_note(overshoot) + ".\n")


def write_only(args, machine: dict, trials: dict | None) -> None:
    """One part's section with the machine and load it ran on, in a file of its own."""
    if args.output == REPO_ROOT / "BENCHMARKS.md":
        raise SystemExit("--only writes a section of its own: give --output another file")
    out = ["# tfsd benchmarks: one part\n",
           f"Generated by `benches/report.py --only {args.only}`; the section as it would appear "
           "in BENCHMARKS.md, rendered alone.\n"]
    if trials and trials.get("quick"):
        out.append("> **Smoke run (BENCH_QUICK=1):** few repeats; the figures below only show that "
                   "the harness works.\n")
    out.append("## How this was measured\n")
    out.append(f"- command: `{args.command}`")
    for key, label in (("date", "date"), ("commit", "commit"), ("cpu", "CPU"), ("cores", "cores"),
                       ("memory", "memory"), ("kernel", "kernel"), ("load", "load average at start")):
        if key in machine:
            out.append(f"- {label}: {machine[key]}")
    if trials:
        duration_s = trials.get("duration_s")
        run_time = ("" if duration_s is None else
                    f"; run time {duration_s / 60:.0f} min" if duration_s >= 120 else
                    f"; run time {duration_s:.0f} s")
        out.append(f"- load average: {trials['load_before']:.2f} at the start of this part, "
                   f"{trials['load_after']:.2f} at its end{run_time}")
        if trials.get("python_runtime"):
            out.append(f"- tfsd's Python workers: {trials['python_runtime']}")
    out.append("- every TensorFlow process runs with `TF_ENABLE_ONEDNN_OPTS=0` (tfsd's worker default)")
    out.append("- the machine is shared with other engineers' builds and tests: compare the ratios "
               "(measured in the same run), not absolute times\n")
    if args.only == "step_latency":
        # The Rust side of §1 and §2 (TCP and the Unix socket side by side), with their targets;
        # the Python peers are not in this run, so nothing compares with TF's server.
        targets: list[tuple[str, str, bool | None]] = []
        steps_section(out, args.plots, trials, None, targets)
        large_section(out, trials, None, targets)
        rows = [[name, measured, "not measured" if met is None else ("**met**" if met else "**missed**")]
                for name, measured, met in targets if "MasterService" not in name]
        out.append("### Targets measured by this part\n")
        out.append(table(["target", "measured", ""], rows, "llc"))
    elif args.only == "flood":
        flood_section(out, args.plots, trials)
    elif args.only == "overshoot":
        overshoot_section(out, trials)
    else:
        python_trials_section(out, trials)
    args.output.write_text("\n".join(out).rstrip() + "\n")
    print(f"report: wrote {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=REPO_ROOT / "benches" / "plots")
    parser.add_argument("--command", default="scripts/bench")
    parser.add_argument("--only", choices=["python_trials", "flood", "overshoot", "step_latency"],
                        help="render only this part's section into --output")
    args = parser.parse_args()
    args.plots.mkdir(parents=True, exist_ok=True)

    machine = load(args.results, "machine") or {}
    rust_steps = load(args.results, "step_latency")
    py = load(args.results, "peers")
    resets = load(args.results, "reset_cost")
    mem = load(args.results, "reset_memory")
    policy = load(args.results, "policy_reaction")
    scale = load(args.results, "scale")
    trials = load(args.results, "python_trials")
    flood = load(args.results, "flood")
    overshoot = load(args.results, "overshoot")
    quick = any(part and part.get("quick")
                for part in (rust_steps, py, resets, mem, policy, scale, trials, flood, overshoot))

    if args.only:
        write_only(args, machine, {"flood": flood, "overshoot": overshoot,
                                   "step_latency": rust_steps}.get(args.only, trials))
        return

    body: list[str] = []
    targets: list[tuple[str, str, bool | None]] = []
    steps_section(body, args.plots, rust_steps, py, targets)
    large_section(body, rust_steps, py, targets)
    resets_section(body, args.plots, resets, py, targets)
    memory_section(body, args.plots, mem, targets)
    policy_section(body, policy)
    scale_section(body, args.plots, scale, targets)
    python_trials_section(body, trials)
    flood_section(body, args.plots, flood)
    overshoot_section(body, overshoot)

    out: list[str] = ["# tfsd benchmarks\n"]
    out.append("tfsd side by side with what users would pick instead — TensorFlow in-process and "
               "TensorFlow's own gRPC server — measured in one run on one machine. This file and the "
               "plots in `benches/plots/` are generated by the harness; do not edit them by hand.\n")
    if quick:
        out.append("> **Smoke run (BENCH_QUICK=1):** few repeats; the figures below only show that the "
                   "harness works.\n")
    out.append("## How this was measured\n")
    out.append(f"- command: `{args.command}` (builds release, runs every part, writes this file; "
               "`BENCH_QUICK=1 scripts/bench` is a fast smoke run of the same harness)")
    for key, label in (("date", "date"), ("commit", "commit"), ("cpu", "CPU"), ("cores", "cores"),
                       ("memory", "memory"), ("kernel", "kernel"), ("tensorflow", "TensorFlow"),
                       ("rustc", "rustc"), ("load", "load average at start"), ("duration", "total run time")):
        if key in machine:
            out.append(f"- {label}: {machine[key]}")
    if py and py.get("versions"):
        v = py["versions"]
        out.append(f"- Python {v['python']}, grpcio {v['grpcio']}")
    if trials and trials.get("python_runtime"):
        out.append(f"- tfsd's Python workers (§7): {trials['python_runtime']}")
    out.append("- every TensorFlow process (tfsd's workers, the in-process floors, TF's server, the Python "
               "client) runs with `TF_ENABLE_ONEDNN_OPTS=0`, tfsd's worker default, so all run the same "
               "kernels and the differences are transport and process costs (except in §4, which "
               "compares both settings)")
    out.append("- the machine is shared with other engineers' builds and tests: the load average is "
               "noted per part; compare the ratios (measured in the same run), not absolute times\n")

    out.append("## Targets (issue 7)\n")
    rows = []
    for name, measured, met in targets:
        verdict = "not measured" if met is None else ("**met**" if met else "**missed**")
        rows.append([name, measured, verdict])
    out.append(table(["target", "measured", ""], rows, "llc"))
    out.append("")
    out.extend(body)

    analysis = REPO_ROOT / "benches" / "analysis.md"
    if analysis.exists():
        out.append(analysis.read_text().rstrip() + "\n")
    args.output.write_text("\n".join(out).rstrip() + "\n")
    print(f"report: wrote {args.output} and {len(list(args.plots.glob('*.png')))} plots in {args.plots}")


if __name__ == "__main__":
    main()
