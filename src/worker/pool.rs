//! The warm pool: workers started ahead of time, so that creating or recycling a session
//! does not wait for TensorFlow to load (a process linked to libtensorflow takes ~0.25 s from
//! exec to a first graph and holds ~280 MiB of RSS, most of it library pages; a Python worker
//! importing TensorFlow and Keras takes seconds).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{WorkerError, WorkerProcess, WorkerSpec};

/// Pause after a failed background start, so a broken installation does not spin.
const REFILL_RETRY_DELAY: Duration = Duration::from_secs(2);
/// Failed starts in a row before the pool reports that workers cannot be started. One
/// failure is often a worker killed while it loaded (the OOM killer, an operator): not a
/// reason to tell load balancers that the daemon is down.
const FAILURES_BEFORE_UNSTARTABLE: u32 = 3;

/// Ready workers plus a background task that keeps `target` of them.
#[derive(Debug)]
pub struct WarmPool {
    spec: WorkerSpec,
    target: usize,
    ready: Mutex<VecDeque<Arc<WorkerProcess>>>,
    wake_refill: Notify,
    /// Whether workers can be started: `None` before the first attempt, `Some(false)` after
    /// `FAILURES_BEFORE_UNSTARTABLE` failures in a row, `Some(true)` after a success.
    startable: watch::Sender<Option<bool>>,
    consecutive_failures: std::sync::atomic::AtomicU32,
    /// TensorFlow's version and the runtime's description as the last started worker
    /// reported them.
    tensorflow_version: Mutex<String>,
    runtime_description: Mutex<String>,
    /// Every worker this pool started, pooled or handed out, for a last-resort kill.
    started: Mutex<Vec<Weak<WorkerProcess>>>,
}

impl WarmPool {
    /// Creates the pool and starts its refill task on `tracker`, stopped by `shutdown`.
    pub fn start(
        spec: WorkerSpec,
        target: usize,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<WarmPool> {
        let pool = Arc::new(WarmPool {
            spec,
            target,
            ready: Mutex::new(VecDeque::new()),
            wake_refill: Notify::new(),
            startable: watch::channel(None).0,
            consecutive_failures: std::sync::atomic::AtomicU32::new(0),
            tensorflow_version: Mutex::new(String::new()),
            runtime_description: Mutex::new(String::new()),
            started: Mutex::new(Vec::new()),
        });
        tracker.spawn(pool.clone().refill_loop(shutdown));
        pool
    }

    /// The configured number of ready workers.
    pub fn target(&self) -> usize {
        self.target
    }

    /// TensorFlow's version as workers report it; empty before the first worker started.
    pub fn tensorflow_version(&self) -> String {
        self.tensorflow_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the workers say they run; empty before the first worker started.
    pub fn runtime_description(&self) -> String {
        self.runtime_description
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Number of ready workers now.
    pub fn ready_count(&self) -> usize {
        self.lock().len()
    }

    /// A ready worker from the pool, or a freshly started one when the pool is empty.
    pub async fn take(&self) -> Result<Arc<WorkerProcess>, WorkerError> {
        loop {
            let worker = self.lock().pop_front();
            self.wake_refill.notify_one();
            match worker {
                // A pooled worker may have died while it waited; skip it.
                Some(worker) if worker.exit_description().is_none() => return Ok(worker),
                Some(_) => continue,
                None => return self.spawn().await,
            }
        }
    }

    async fn spawn(&self) -> Result<Arc<WorkerProcess>, WorkerError> {
        let started = WorkerProcess::spawn(&self.spec).await;
        if let Ok(worker) = &started {
            let mut all = self.started.lock().unwrap_or_else(|e| e.into_inner());
            all.retain(|weak| weak.strong_count() > 0);
            all.push(Arc::downgrade(worker));
            drop(all);
            *self
                .tensorflow_version
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = worker.tensorflow_version().to_string();
            *self
                .runtime_description
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = worker.runtime_description().to_string();
        }
        use std::sync::atomic::Ordering;
        if started.is_ok() {
            self.consecutive_failures.store(0, Ordering::SeqCst);
            self.startable.send_replace(Some(true));
        } else {
            let failures = self.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1;
            if failures >= FAILURES_BEFORE_UNSTARTABLE {
                self.startable.send_replace(Some(false));
            }
        }
        started
    }

    /// Follows whether workers can be started: `Some(false)` after a failed start (e.g.
    /// libtensorflow missing), `Some(true)` after a successful one.
    pub fn startable(&self) -> watch::Receiver<Option<bool>> {
        self.startable.subscribe()
    }

    /// Kills every worker this pool ever started that is still alive, pooled or serving a
    /// session, and waits until each is reaped: the second-signal path, where no session
    /// gets to finish.
    pub async fn kill_all_workers(&self) {
        let workers: Vec<_> = self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for worker in workers {
            worker.stop().await;
        }
    }

    /// Stops every pooled worker and waits until each is reaped.
    pub async fn drain(&self) {
        let workers: Vec<_> = self.lock().drain(..).collect();
        for worker in workers {
            worker.stop().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<WorkerProcess>>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn refill_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            self.lock()
                .retain(|worker| worker.exit_description().is_none());
            if self.ready_count() < self.target {
                let started = tokio::select! {
                    started = self.spawn() => started,
                    _ = shutdown.cancelled() => break,
                };
                match started {
                    Ok(worker) => {
                        tracing::debug!(worker_pid = worker.pid(), "warm worker ready");
                        // A pooled worker that dies is replaced at once, not at the next take.
                        let exited = worker.exit_signal();
                        let pool = Arc::downgrade(&self);
                        tokio::spawn(async move {
                            exited.await;
                            if let Some(pool) = pool.upgrade() {
                                pool.wake_refill.notify_one();
                            }
                        });
                        self.lock().push_back(worker);
                        continue;
                    }
                    Err(error) => {
                        tracing::error!(%error, "could not start a warm worker; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(REFILL_RETRY_DELAY) => continue,
                            _ = shutdown.cancelled() => break,
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.wake_refill.notified() => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.drain().await;
    }
}
