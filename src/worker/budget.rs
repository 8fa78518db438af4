//! The byte budget for tensors the daemon itself holds (`limits.max_buffered_size`).
//!
//! Between a worker and a client every large payload sits in the supervisor's memory for a
//! while: a request frame being written to a worker, a response frame read from one and
//! decoded (the fetched tensors are slices of that frame: prost hands `tensor_content` out
//! as `Bytes` of the buffer it decodes) until tonic has encoded the client's answer and
//! dropped the message. Without a bound, a few concurrent large fetches take the daemon's
//! own memory with them (three 381 MiB fetches: 2 MiB to 1.2 GiB).
//!
//! A worker's answer of `SMALL_FRAME_BYTES` or more reserves its size from one daemon-wide
//! semaphore before a byte of it is read: until there is room, the worker waits on its full
//! socket, which is the backpressure. The reservation travels inside the frame's `Bytes`
//! (`Bytes::from_owner`), so it is released exactly when the last tensor sliced out of it is
//! dropped, wherever that happens: once tonic has encoded the client's answer, once a
//! checkpoint is written, once a recycle has handed the variables to the fresh worker. A
//! frame larger than the whole budget waits until the budget is entirely free and then goes
//! alone. Small frames (every control call, small steps) never touch the semaphore.
//! Nothing that waits for the budget holds any of it, so waits cannot form a cycle; what
//! keeps answers for longer copies them out of the frame (the MasterService's replay cache,
//! `master::dedup`, bounded there). A worker that stops sending in the middle of a frame is
//! killed (`process::next_frame`), so a reservation never waits on a silent worker.
//!
//! Not covered: requests. A client's request is decoded in full by tonic before tfsd sees
//! it (bounded per request by `limits.max_message_size`), and its frame to the worker is a
//! copy that lives while the worker reads it. Nor the encoded answer tonic keeps until a
//! slow client has read it.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Frames below this size are not counted: the semaphore would cost more than they hold.
pub const SMALL_FRAME_BYTES: usize = 64 * 1024;

/// The budget is kept in units of this many bytes, so that one reservation of up to the
/// largest frame (2 GiB) fits a semaphore's u32 permit count with room to spare.
const UNIT_BYTES: u64 = 64 * 1024;

/// The daemon-wide budget, shared by every worker's reader and writer.
#[derive(Debug, Clone)]
pub struct BufferBudget {
    semaphore: Arc<Semaphore>,
    total_units: u32,
}

/// Bytes reserved from the budget, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
}

impl BufferBudget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: u64) -> BufferBudget {
        let units = (bytes / UNIT_BYTES).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        BufferBudget {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            total_units: units,
        }
    }

    /// No bound (`limits.max_buffered_bytes = "off"`).
    pub fn unlimited() -> BufferBudget {
        BufferBudget::new(u64::MAX)
    }

    /// Waits until `bytes` can be held: the frame's size in units, or the whole budget for a
    /// frame larger than it. A frame below `SMALL_FRAME_BYTES` reserves nothing.
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        if bytes < SMALL_FRAME_BYTES {
            return Reservation { permit: None };
        }
        let units = (bytes as u64)
            .div_ceil(UNIT_BYTES)
            .min(u64::from(self.total_units)) as u32;
        // The semaphore is never closed, so acquiring fails only if it were.
        let permit = self.semaphore.clone().acquire_many_owned(units).await.ok();
        Reservation { permit }
    }

    /// Bytes held right now (a gauge).
    pub fn held_bytes(&self) -> u64 {
        let free = self.semaphore.available_permits() as u64;
        (u64::from(self.total_units) - free.min(u64::from(self.total_units))) * UNIT_BYTES
    }

    /// The budget in bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_units) * UNIT_BYTES
    }
}

/// A frame's bytes that keep their reservation until the last slice of them is dropped.
pub fn hold(body: Vec<u8>, reservation: Reservation) -> Bytes {
    if reservation.permit.is_none() {
        return Bytes::from(body);
    }
    Bytes::from_owner(HeldFrame {
        body,
        _reservation: reservation,
    })
}

struct HeldFrame {
    body: Vec<u8>,
    _reservation: Reservation,
}

impl AsRef<[u8]> for HeldFrame {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reservation_lives_as_long_as_the_last_slice_of_its_frame() {
        let budget = BufferBudget::new(4 << 20);
        let frame = hold(vec![7; 1 << 20], budget.reserve(1 << 20).await);
        assert_eq!(budget.held_bytes(), 1 << 20);
        let slice = frame.slice(10..20);
        drop(frame);
        assert_eq!(
            budget.held_bytes(),
            1 << 20,
            "the slice still holds the frame"
        );
        assert_eq!(&slice[..], &[7; 10]);
        drop(slice);
        assert_eq!(budget.held_bytes(), 0);
    }

    #[tokio::test]
    async fn small_frames_are_free_and_a_frame_larger_than_the_budget_waits_for_all_of_it() {
        let budget = BufferBudget::new(1 << 20);
        let small = budget.reserve(SMALL_FRAME_BYTES - 1).await;
        assert_eq!(budget.held_bytes(), 0);
        drop(small);
        let first = budget.reserve(SMALL_FRAME_BYTES).await;
        assert_eq!(budget.held_bytes(), SMALL_FRAME_BYTES as u64);
        // 8 MiB against a 1 MiB budget: waits for the whole budget, then takes it.
        let big = budget.reserve(8 << 20);
        tokio::pin!(big);
        assert!(
            futures::poll!(big.as_mut()).is_pending(),
            "waits while any of the budget is held"
        );
        drop(first);
        let big = big.await;
        assert_eq!(budget.held_bytes(), 1 << 20);
        drop(big);
        assert_eq!(budget.held_bytes(), 0);
    }
}
