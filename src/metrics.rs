//! Prometheus metrics (text exposition, OpenMetrics format) and the HTTP endpoint that
//! serves them.
//!
//! Counters are fed where things happen (events, runs, worker starts and exits); gauges that
//! describe the present (per-session memory, pool size, system memory and pressure) are
//! refreshed at scrape time from the `SessionManager`, so a scrape always shows the truth
//! and nothing samples in the background for it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::memory::MemoryUsage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
    /// Who or what caused it: "client", or the memory policy's trigger ("soft_limit", ...).
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    session_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionGpuLabels {
    session_id: String,
    /// The device's NVML index.
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
}

/// Every metric tfsd exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    actions: Family<ActionLabels, Counter>,
    runs: Histogram,
    /// How long takes that found the warm pool empty waited for a worker to start.
    pool_miss_waits: Histogram,
    run_errors: Counter,
    worker_spawns: Counter,
    worker_exits: Family<ExitLabels, Counter>,
    session_private: Family<SessionLabels, Gauge>,
    session_rss: Family<SessionLabels, Gauge>,
    session_gpu: Family<SessionGpuLabels, Gauge>,
    gpu_used: Family<GpuLabels, Gauge>,
    gpu_total: Family<GpuLabels, Gauge>,
    sessions: Gauge,
    warm_workers: Gauge,
    supervisor_rss: Gauge,
    system_total: Gauge,
    system_available: Gauge,
    pressure_some_avg10: Gauge<f64, AtomicU64>,
    pressure_full_avg10: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tfsd");
        let metrics = Metrics {
            registry: Registry::default(),
            actions: Family::default(),
            // 50 µs to ~26 s.
            runs: Histogram::new(exponential_buckets(0.000_05, 2.0, 20)),
            pool_miss_waits: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            run_errors: Counter::default(),
            worker_spawns: Counter::default(),
            worker_exits: Family::default(),
            session_private: Family::default(),
            session_rss: Family::default(),
            session_gpu: Family::default(),
            gpu_used: Family::default(),
            gpu_total: Family::default(),
            sessions: Gauge::default(),
            warm_workers: Gauge::default(),
            supervisor_rss: Gauge::default(),
            system_total: Gauge::default(),
            system_available: Gauge::default(),
            pressure_some_avg10: Gauge::default(),
            pressure_full_avg10: Gauge::default(),
        };
        registry.register(
            "session_actions",
            "Lifecycle actions on sessions, by action (created, extended, graph_reset, \
             variables_purged, recycled, worker_exited, restored, closed, ...) and trigger \
             (client, soft_limit, hard_limit, system_pressure, idle, worker_exit, ...)",
            metrics.actions.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "Run latency as the supervisor sees it (worker round trip included)",
            metrics.runs.clone(),
        );
        registry.register("run_errors", "Runs that failed", metrics.run_errors.clone());
        registry.register(
            "worker_spawns",
            "Worker processes started",
            metrics.worker_spawns.clone(),
        );
        registry.register(
            "worker_exits",
            "Worker processes reaped, by cause (stopped = by tfsd; otherwise the signal or exit code)",
            metrics.worker_exits.clone(),
        );
        registry.register(
            "session_private_bytes",
            "Private (anonymous resident) memory of each session's worker",
            metrics.session_private.clone(),
        );
        registry.register(
            "session_rss_bytes",
            "Resident set size of each session's worker, shared library pages included",
            metrics.session_rss.clone(),
        );
        registry.register(
            "session_gpu_bytes",
            "GPU memory NVML lists for each session's worker and its processes, per device \
             (absent without an NVIDIA driver)",
            metrics.session_gpu.clone(),
        );
        registry.register(
            "gpu_memory_used_bytes",
            "Memory in use on each GPU, by every process (NVML)",
            metrics.gpu_used.clone(),
        );
        registry.register(
            "gpu_memory_total_bytes",
            "Memory of each GPU (NVML)",
            metrics.gpu_total.clone(),
        );
        registry.register("sessions", "Open sessions", metrics.sessions.clone());
        registry.register(
            "warm_pool_miss_wait_seconds",
            "Creates, recycles and restores that found the warm pool empty, and how long each \
             waited for a worker to start",
            metrics.pool_miss_waits.clone(),
        );
        registry.register(
            "warm_pool_workers",
            "Ready workers in the warm pool",
            metrics.warm_workers.clone(),
        );
        registry.register(
            "supervisor_rss_bytes",
            "Resident set size of the supervisor process",
            metrics.supervisor_rss.clone(),
        );
        registry.register(
            "system_memory_total_bytes",
            "Total memory of the machine",
            metrics.system_total.clone(),
        );
        registry.register(
            "system_memory_available_bytes",
            "Available memory of the machine",
            metrics.system_available.clone(),
        );
        registry.register(
            "memory_pressure_some_avg10",
            "Kernel memory pressure (PSI some avg10, percent); 0 where PSI is absent",
            metrics.pressure_some_avg10.clone(),
        );
        registry.register(
            "memory_pressure_full_avg10",
            "Kernel memory pressure (PSI full avg10, percent); 0 where PSI is absent",
            metrics.pressure_full_avg10.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// One lifecycle action on a session: `action` is the event's name ("created",
    /// "recycled", ...), `trigger` who asked ("client", "soft_limit", ...).
    pub fn record_action(&self, action: &str, trigger: &str) {
        self.actions
            .get_or_create(&ActionLabels {
                action: action.to_string(),
                trigger: trigger.to_string(),
            })
            .inc();
    }

    pub fn record_run(&self, took: Duration, ok: bool) {
        self.runs.observe(took.as_secs_f64());
        if !ok {
            self.run_errors.inc();
        }
    }

    /// A take that found the warm pool empty waited `took` for a fresh worker.
    pub fn record_pool_miss(&self, took: Duration) {
        self.pool_miss_waits.observe(took.as_secs_f64());
    }

    pub fn record_worker_spawn(&self) {
        self.worker_spawns.inc();
    }

    /// `cause` is "stopped" for a worker tfsd stopped, else how it died ("SIGKILL", ...).
    pub fn record_worker_exit(&self, cause: &str) {
        self.worker_exits
            .get_or_create(&ExitLabels {
                cause: cause.to_string(),
            })
            .inc();
    }

    /// Refreshes the gauges from the present state and renders the exposition.
    pub fn render(&self, present: &Present) -> String {
        self.session_private.clear();
        self.session_rss.clear();
        self.session_gpu.clear();
        self.gpu_used.clear();
        self.gpu_total.clear();
        for device in &present.gpus {
            let labels = GpuLabels {
                gpu: device.index.to_string(),
            };
            self.gpu_used
                .get_or_create(&labels)
                .set(device.used_bytes as i64);
            self.gpu_total
                .get_or_create(&labels)
                .set(device.total_bytes as i64);
        }
        for (session_id, memory) in &present.sessions {
            for usage in &memory.gpu {
                self.session_gpu
                    .get_or_create(&SessionGpuLabels {
                        session_id: session_id.clone(),
                        gpu: usage.gpu.to_string(),
                    })
                    .set(usage.used_bytes as i64);
            }
            let labels = SessionLabels {
                session_id: session_id.clone(),
            };
            self.session_private
                .get_or_create(&labels)
                .set(memory.private_bytes as i64);
            self.session_rss
                .get_or_create(&labels)
                .set(memory.rss_bytes as i64);
        }
        self.sessions.set(present.sessions.len() as i64);
        self.warm_workers.set(present.warm_workers as i64);
        self.supervisor_rss.set(present.supervisor.rss_bytes as i64);
        self.system_total.set(present.system.total_bytes as i64);
        self.system_available
            .set(present.system.available_bytes as i64);
        let pressure = crate::system::memory_pressure().unwrap_or_default();
        self.pressure_some_avg10.set(pressure.some_avg10);
        self.pressure_full_avg10.set(pressure.full_avg10);

        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "could not encode metrics");
        }
        text
    }
}

/// What the gauges show, read at scrape time (by whoever owns the sessions: `daemon.rs`).
#[derive(Debug, Clone, Default)]
pub struct Present {
    /// Each session's id and its worker's memory.
    pub sessions: Vec<(String, MemoryUsage)>,
    /// Ready workers in the warm pools.
    pub warm_workers: usize,
    pub supervisor: MemoryUsage,
    pub system: crate::system::SystemMemory,
    /// Each GPU's figures; empty without an NVIDIA driver.
    pub gpus: Vec<crate::gpu::DeviceSample>,
}

/// Serves `GET /metrics` on `listener` until `shutdown`; `present` is read at each scrape.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    present: impl Fn() -> Present + Clone + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render(&present());
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DeviceSample, GpuUsage};

    #[test]
    fn gpu_figures_are_exported_per_session_and_per_device() {
        let metrics = Metrics::new();
        let present = Present {
            sessions: vec![(
                "s-1".to_string(),
                MemoryUsage {
                    gpu: vec![GpuUsage {
                        gpu: 1,
                        used_bytes: 4096,
                    }],
                    ..MemoryUsage::default()
                },
            )],
            gpus: vec![DeviceSample {
                index: 1,
                name: "NVIDIA Test".to_string(),
                uuid: "GPU-1".to_string(),
                total_bytes: 1 << 30,
                used_bytes: 8192,
                free_bytes: (1 << 30) - 8192,
                processes: Vec::new(),
            }],
            ..Present::default()
        };
        let text = metrics.render(&present);
        assert!(
            text.contains("tfsd_session_gpu_bytes{session_id=\"s-1\",gpu=\"1\"} 4096"),
            "{text}"
        );
        assert!(
            text.contains("tfsd_gpu_memory_used_bytes{gpu=\"1\"} 8192"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "tfsd_gpu_memory_total_bytes{{gpu=\"1\"}} {}",
                1u64 << 30
            )),
            "{text}"
        );
        // Without GPUs, no series at all.
        let text = metrics.render(&Present::default());
        assert!(!text.contains("tfsd_session_gpu_bytes{"), "{text}");
        assert!(!text.contains("tfsd_gpu_memory_used_bytes{"), "{text}");
    }
}
