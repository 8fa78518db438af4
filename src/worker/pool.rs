//! The warm pool: workers started ahead of time, so that creating or recycling a session
//! does not wait for TensorFlow to load (a process linked to libtensorflow takes ~0.25 s from
//! exec to a first graph and holds ~280 MiB of RSS, most of it library pages; a Python worker
//! importing TensorFlow and Keras takes seconds).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{WorkerError, WorkerProcess, WorkerSpec};

/// How long the pool must go without a take before it shrinks by one worker toward its
/// configured size.
const SHRINK_AFTER_IDLE: Duration = Duration::from_secs(60);
/// Pause after a failed background start, so a broken installation does not spin.
const REFILL_RETRY_DELAY: Duration = Duration::from_secs(2);
/// Failed starts in a row before the pool reports that workers cannot be started. One
/// failure is often a worker killed while it loaded (the OOM killer, an operator): not a
/// reason to tell load balancers that the daemon is down.
const FAILURES_BEFORE_UNSTARTABLE: u32 = 3;

/// How many workers start at once, and how many creates may wait for one, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartLimits {
    /// Worker processes starting at once, across every pool (workers.max_concurrent_starts).
    pub max_concurrent: usize,
    /// Requests that may wait for a start slot at once (workers.max_waiting_creates).
    pub max_waiting: usize,
    /// How long one waits before it is refused (workers.start_wait).
    pub wait: Duration,
}

/// Admission to worker starts, shared by every pool: at most `max_concurrent` processes
/// load TensorFlow at once, so that a flood of creates queues instead of starting hundreds
/// of workers that all miss their start timeout on a saturated CPU.
#[derive(Debug)]
pub struct StartGate {
    limits: StartLimits,
    slots: Semaphore,
    /// Everything waiting for a slot (creates, recycles, restores, the pools' refills).
    waiting: AtomicUsize,
    /// The creates among them: what `max_waiting` bounds.
    waiting_creates: AtomicUsize,
}

/// Whether a start may be refused because too many wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A new session: refused when `max_waiting` already wait.
    Create,
    /// A session that exists (recycle, restore) or the pool's own refill: waits its turn.
    Existing,
}

impl StartGate {
    pub fn new(limits: StartLimits) -> Arc<StartGate> {
        Arc::new(StartGate {
            limits,
            slots: Semaphore::new(limits.max_concurrent.max(1)),
            waiting: AtomicUsize::new(0),
            waiting_creates: AtomicUsize::new(0),
        })
    }

    pub fn limits(&self) -> StartLimits {
        self.limits
    }

    /// Requests waiting for a start slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// A start slot, or why none: too many already wait (RESOURCE_EXHAUSTED for the
    /// client), or none came free within `limits.wait` (UNAVAILABLE).
    async fn enter(&self, urgency: Urgency) -> Result<SemaphorePermit<'_>, WorkerError> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _counted = WaitCount(&self.waiting);
        // Only creates count against the queue's length: background starts (the pools'
        // refills, recycles, restores) must not take a new session's place.
        let _create = (urgency == Urgency::Create).then(|| {
            let waiting = self.waiting_creates.fetch_add(1, Ordering::SeqCst);
            (waiting, WaitCount(&self.waiting_creates))
        });
        if let Some((waiting, _)) = &_create
            && *waiting >= self.limits.max_waiting
        {
            let waiting = *waiting;
            return Err(WorkerError::Busy(format!(
                "{waiting} creates already wait for a worker to start (at most {} start at \
                 once; workers.max_waiting_creates = {}); retry in a few seconds",
                self.limits.max_concurrent, self.limits.max_waiting
            )));
        }
        // An existing session (a recycle, a restore) waits as long as it takes: refusing it
        // would leave it broken. The drain stops such waits (the caller selects on it).
        if urgency == Urgency::Existing {
            return self
                .slots
                .acquire()
                .await
                .map_err(|_| WorkerError::StartWait("worker starts are closed".to_string()));
        }
        match tokio::time::timeout(self.limits.wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(WorkerError::StartWait(
                "worker starts are closed".to_string(),
            )),
            Err(_) => Err(WorkerError::StartWait(format!(
                "no worker could be started within {:?} (workers.start_wait): {} start at once \
                 and {} requests wait; retry later",
                self.limits.wait,
                self.limits.max_concurrent,
                self.waiting()
            ))),
        }
    }
}

/// Counts one waiter until dropped.
struct WaitCount<'a>(&'a AtomicUsize);

impl Drop for WaitCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Ready workers plus a background task that keeps `target` of them.
#[derive(Debug)]
pub struct WarmPool {
    spec: WorkerSpec,
    /// The configured size: the pool never keeps fewer ready workers.
    target: usize,
    /// The most it grows to under demand.
    max: usize,
    /// What it keeps now, between `target` and `max`: one more each time a take finds the
    /// pool empty, one less after `SHRINK_AFTER_IDLE` without a take.
    want: AtomicUsize,
    last_take: Mutex<tokio::time::Instant>,
    gate: Arc<StartGate>,
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
        (target, max): (usize, usize),
        gate: Arc<StartGate>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<WarmPool> {
        let pool = Arc::new(WarmPool {
            spec,
            target,
            max: max.max(target),
            want: AtomicUsize::new(target),
            last_take: Mutex::new(tokio::time::Instant::now()),
            gate,
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

    /// How many ready workers the pool keeps now (it grows under demand, up to its max).
    pub fn wanted(&self) -> usize {
        self.want.load(Ordering::SeqCst)
    }

    /// One worker less, toward the configured size, once no take came for a while.
    fn shrink_if_idle(&self) {
        let idle = self
            .last_take
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if idle < SHRINK_AFTER_IDLE {
            return;
        }
        let shrunk = self
            .want
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |want| {
                (want > self.target).then(|| want - 1)
            });
        if shrunk.is_ok() {
            *self.last_take.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
            let surplus = {
                let mut ready = self.lock();
                (ready.len() > self.wanted())
                    .then(|| ready.pop_back())
                    .flatten()
            };
            if let Some(worker) = surplus {
                tracing::debug!(
                    worker_pid = worker.pid(),
                    "warm pool shrinking after idle time"
                );
                worker.kill_expected();
            }
        }
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

    /// A ready worker from the pool, or a freshly started one when the pool is empty (once
    /// the start gate admits it).
    pub async fn take(&self, urgency: Urgency) -> Result<Arc<WorkerProcess>, WorkerError> {
        *self.last_take.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        loop {
            let worker = self.lock().pop_front();
            if worker.is_none() {
                // Drained: demand is above what the pool keeps; keep one more, up to max.
                let _ = self
                    .want
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |want| {
                        (want < self.max).then_some(want + 1)
                    });
            }
            self.wake_refill.notify_one();
            match worker {
                // A pooled worker may have died, or been stopped, while it waited; skip it.
                Some(worker)
                    if worker.exit_description().is_none()
                        && !matches!(worker.process_state(), Some('T' | 't')) =>
                {
                    return Ok(worker);
                }
                Some(worker) => {
                    worker.kill_expected();
                    continue;
                }
                None => {
                    let waited = std::time::Instant::now();
                    let spawned = self.spawn(urgency).await;
                    self.spec.metrics.record_pool_miss(waited.elapsed());
                    return spawned;
                }
            }
        }
    }

    /// A worker whose environment is the pool's with `overrides` on top: a ready one from
    /// the pool when the overrides change nothing, else one started for this take alone
    /// (through the start gate). What a worker sees at start-up it keeps: CUDA reads
    /// `CUDA_VISIBLE_DEVICES` once, at initialisation, so a session asking for other GPUs
    /// than the pool's cannot be served by a warm worker.
    pub async fn take_with_env(
        &self,
        urgency: Urgency,
        overrides: &std::collections::BTreeMap<String, String>,
    ) -> Result<Arc<WorkerProcess>, WorkerError> {
        if overrides
            .iter()
            .all(|(key, value)| self.spec.env.get(key) == Some(value))
        {
            return self.take(urgency).await;
        }
        let mut spec = self.spec.clone();
        spec.env
            .extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.spawn_from(&spec, urgency).await
    }

    async fn spawn(&self, urgency: Urgency) -> Result<Arc<WorkerProcess>, WorkerError> {
        self.spawn_from(&self.spec, urgency).await
    }

    async fn spawn_from(
        &self,
        spec: &WorkerSpec,
        urgency: Urgency,
    ) -> Result<Arc<WorkerProcess>, WorkerError> {
        let _slot = self.gate.enter(urgency).await?;
        let started = WorkerProcess::spawn(spec).await;
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
            if self.ready_count() < self.wanted() {
                let started = tokio::select! {
                    started = self.spawn(Urgency::Existing) => started,
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
                _ = tokio::time::sleep(SHRINK_AFTER_IDLE), if self.wanted() > self.target => {
                    self.shrink_if_idle();
                }
                _ = shutdown.cancelled() => break,
            }
        }
        self.drain().await;
    }
}
