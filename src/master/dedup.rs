//! `request_id` de-duplication. TensorFlow's client retries a call that failed with
//! UNAVAILABLE with the same request (same `request_id`), so a step whose answer was lost
//! on the way back arrives twice. The step must not run twice: the retry gets the first
//! answer, or waits for it while the first is still running.
//!
//! Bounded twice over: answers are kept for the most recent `ANSWERS_KEPT` requests and
//! `ANSWER_BYTES_KEPT` bytes, ids for the most recent `IDS_KEPT`. A duplicate whose answer is
//! no longer kept is refused with ABORTED (what TensorFlow's own server answers to every
//! duplicate), never run again. `request_id` 0 means the client sent none. Ids are kept per
//! session handle: a request names its session, and another session's answer to the same id
//! is never given out.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tonic::Status;

/// Answers kept for replay.
pub const ANSWERS_KEPT: usize = 256;
/// Bytes of answers kept for replay. A single larger answer is not kept once delivered (a
/// retry of it is refused with ABORTED): kept answers hold their share of the daemon's
/// budget for tensors in transit (`worker::budget`), and a kept answer as large as that
/// budget would hold every later fetch back.
pub const ANSWER_BYTES_KEPT: usize = 64 << 20;
/// Request ids remembered after their answers are dropped.
pub const IDS_KEPT: usize = 65_536;

type Slot<T> = watch::Receiver<Option<Arc<T>>>;
/// A request: the session handle it names and its `request_id`.
type Key = (String, i64);

/// The answers to recent requests of one method, by request id.
#[derive(Debug)]
pub struct RecentRequests<T> {
    state: Mutex<State<T>>,
    /// The size of an answer, for the byte bound.
    size: fn(&T) -> usize,
    /// Makes an answer that is kept independent of the buffers it was decoded from: a
    /// fetched tensor is a slice of its worker's frame, which holds the daemon's budget for
    /// tensors in transit (`worker::budget`) while any slice of it lives. Kept answers are
    /// bounded here, not there.
    detach: fn(T) -> T,
}

#[derive(Debug)]
struct State<T> {
    /// Every remembered id; `None` once its answer was dropped.
    slots: HashMap<Key, Option<Slot<T>>>,
    /// Ids in arrival order, for forgetting the oldest.
    ids: VecDeque<Key>,
    /// Ids whose answers are kept, oldest first, with the answers' sizes once known.
    answers: VecDeque<(Key, usize)>,
    answer_bytes: usize,
}

impl<T: Send + Sync + 'static> RecentRequests<T> {
    pub fn new(size: fn(&T) -> usize) -> RecentRequests<T> {
        RecentRequests::detaching(size, |answer| answer)
    }

    /// `new`, for answers that may hold slices of a worker's frame (see `detach`).
    pub fn detaching(size: fn(&T) -> usize, detach: fn(T) -> T) -> RecentRequests<T> {
        RecentRequests {
            state: Mutex::new(State {
                slots: HashMap::new(),
                ids: VecDeque::new(),
                answers: VecDeque::new(),
                answer_bytes: 0,
            }),
            size,
            detach,
        }
    }

    /// Runs `work` once per `request_id` of session `handle` and gives every caller with
    /// that id its answer. The work runs as its own task, so a caller that goes away does not
    /// cancel it.
    pub async fn run<F>(
        self: &Arc<Self>,
        handle: &str,
        request_id: i64,
        work: F,
    ) -> Result<Arc<T>, Status>
    where
        F: Future<Output = T> + Send + 'static,
    {
        if request_id == 0 {
            return Ok(Arc::new(work.await));
        }
        let key: Key = (handle.to_string(), request_id);
        let mut slot = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.slots.get(&key) {
                Some(Some(slot)) => slot.clone(),
                Some(None) => {
                    return Err(Status::aborted(format!(
                        "request {request_id} was already handled and its answer is no longer \
                         kept; tfsd does not run a request twice"
                    )));
                }
                None => {
                    let (sender, slot) = watch::channel(None);
                    state.remember(key.clone(), slot.clone());
                    let recent = self.clone();
                    tokio::spawn(async move {
                        let answer = Arc::new((recent.detach)(work.await));
                        let size = (recent.size)(&answer);
                        let _ = sender.send(Some(answer));
                        recent.answered(&key, size);
                    });
                    slot
                }
            }
        };
        let answer = slot
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::internal(format!("request {request_id} was lost")))?;
        Ok(answer.clone().expect("wait_for returned a value"))
    }

    fn answered(&self, key: &Key, size: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if size > ANSWER_BYTES_KEPT {
            // Delivered to the callers waiting now, and not kept for later ones.
            state.answers.retain(|(id, _)| id != key);
            if let Some(slot) = state.slots.get_mut(key) {
                *slot = None;
            }
            return;
        }
        if let Some(entry) = state.answers.iter_mut().find(|(id, _)| id == key) {
            entry.1 = size;
            state.answer_bytes += size;
        }
        state.trim();
    }
}

impl<T> State<T> {
    fn remember(&mut self, key: Key, slot: Slot<T>) {
        self.slots.insert(key.clone(), Some(slot));
        self.ids.push_back(key.clone());
        self.answers.push_back((key, 0));
        self.trim();
    }

    /// Drops the oldest answers beyond the bounds (always keeping the newest), then the
    /// oldest ids.
    fn trim(&mut self) {
        while self.answers.len() > 1
            && (self.answers.len() > ANSWERS_KEPT || self.answer_bytes > ANSWER_BYTES_KEPT)
        {
            let Some((id, size)) = self.answers.pop_front() else {
                break;
            };
            self.answer_bytes -= size;
            if let Some(slot) = self.slots.get_mut(&id) {
                *slot = None;
            }
        }
        while self.ids.len() > IDS_KEPT {
            if let Some(id) = self.ids.pop_front() {
                self.slots.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn counter() -> (
        Arc<AtomicU32>,
        impl Fn() -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>>,
    ) {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let work = move || {
            let runs = counted.clone();
            Box::pin(async move { runs.fetch_add(1, Ordering::SeqCst) + 1 })
                as std::pin::Pin<Box<dyn Future<Output = u32> + Send>>
        };
        (runs, work)
    }

    #[tokio::test]
    async fn a_duplicate_gets_the_first_answer_without_running_again() {
        let recent = Arc::new(RecentRequests::new(|_: &u32| 4));
        let (runs, work) = counter();
        assert_eq!(*recent.run("s-1", 7, work()).await.expect("first"), 1);
        assert_eq!(*recent.run("s-1", 7, work()).await.expect("duplicate"), 1);
        assert_eq!(*recent.run("s-1", 8, work()).await.expect("another"), 2);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn another_sessions_answer_to_the_same_id_is_never_given_out() {
        let recent = Arc::new(RecentRequests::new(|_: &u32| 4));
        let (runs, work) = counter();
        assert_eq!(*recent.run("s-1", 7, work()).await.expect("s-1"), 1);
        assert_eq!(
            *recent
                .run("s-2", 7, work())
                .await
                .expect("s-2 runs its own"),
            2
        );
        assert_eq!(
            *recent.run("s-1", 7, work()).await.expect("s-1 replayed"),
            1
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn requests_without_an_id_always_run() {
        let recent = Arc::new(RecentRequests::new(|_: &u32| 4));
        let (runs, work) = counter();
        recent.run("s-1", 0, work()).await.expect("first");
        recent.run("s-1", 0, work()).await.expect("second");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_duplicate_waits_for_the_first_while_it_runs() {
        let recent = Arc::new(RecentRequests::new(|_: &u32| 4));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let recent = recent.clone();
            async move {
                recent
                    .run("s-1", 9, async move {
                        let _ = released.await;
                        42
                    })
                    .await
            }
        });
        let duplicate = tokio::spawn({
            let recent = recent.clone();
            async move { recent.run("s-1", 9, async { 0 }).await }
        });
        release.send(()).expect("first is waiting");
        assert_eq!(*first.await.expect("join").expect("first"), 42);
        assert_eq!(*duplicate.await.expect("join").expect("duplicate"), 42);
    }

    #[tokio::test]
    async fn old_answers_are_dropped_and_their_duplicates_refused() {
        let recent = Arc::new(RecentRequests::new(|_: &u32| 4));
        let (runs, work) = counter();
        for id in 1..=(ANSWERS_KEPT as i64 + 1) {
            recent.run("s-1", id, work()).await.expect("run");
        }
        let status = recent
            .run("s-1", 1, work())
            .await
            .expect_err("answer dropped");
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert_eq!(*recent.run("s-1", 2, work()).await.expect("still kept"), 2);
        assert_eq!(runs.load(Ordering::SeqCst), ANSWERS_KEPT as u32 + 1);
    }

    #[tokio::test]
    async fn big_answers_are_dropped_first() {
        let recent = Arc::new(RecentRequests::new(|size: &usize| *size));
        recent
            .run("s-1", 1, async { ANSWER_BYTES_KEPT })
            .await
            .expect("big");
        assert!(
            recent.run("s-1", 1, async { 0 }).await.is_ok(),
            "the newest is kept"
        );
        recent.run("s-1", 2, async { 1 }).await.expect("small");
        let status = recent
            .run("s-1", 1, async { 0 })
            .await
            .expect_err("dropped");
        assert_eq!(status.code(), tonic::Code::Aborted);
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_byte_bound_is_not_kept_once_delivered() {
        let recent = Arc::new(RecentRequests::new(|size: &usize| *size));
        recent.run("s-1", 1, async { 1 }).await.expect("small");
        let big = recent
            .run("s-1", 2, async { ANSWER_BYTES_KEPT + 1 })
            .await
            .expect("the first caller gets its answer");
        assert_eq!(*big, ANSWER_BYTES_KEPT + 1);
        let status = recent
            .run("s-1", 2, async { 0 })
            .await
            .expect_err("not kept");
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert_eq!(*recent.run("s-1", 1, async { 0 }).await.expect("kept"), 1);
    }
}
