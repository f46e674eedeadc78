//! The history service's wait queue: requests already parsed and checked
//! wait here, first in first out, for one of the service's slots. It is
//! bounded in requests and in bytes (a full queue refuses at once), and a
//! request that waited past the deadline leaves it unrun.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::HistoryConfig;

/// The queue's bounds (`history.max_queued_requests`, `max_queued_bytes`,
/// `queue_deadline_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_requests: usize,
    pub max_bytes: usize,
    pub deadline: Duration,
}

impl Limits {
    pub fn from_config(config: &HistoryConfig) -> Limits {
        Limits {
            max_requests: config.max_queued_requests,
            max_bytes: config.max_queued_bytes,
            deadline: config.queue_deadline(),
        }
    }
}

struct Waiting<T> {
    item: T,
    bytes: usize,
    arrived: Instant,
}

/// Requests waiting for a slot, oldest first.
pub struct WaitQueue<T> {
    waiting: VecDeque<Waiting<T>>,
    bytes: usize,
    limits: Limits,
}

impl<T> WaitQueue<T> {
    pub fn new(limits: Limits) -> WaitQueue<T> {
        WaitQueue {
            waiting: VecDeque::new(),
            bytes: 0,
            limits,
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Queues `item`, which arrived at `arrived` and counts `bytes`; hands
    /// it back when the queue is full in requests or bytes.
    pub fn push(&mut self, item: T, bytes: usize, arrived: Instant) -> Result<(), T> {
        if self.waiting.len() >= self.limits.max_requests
            || self.bytes + bytes > self.limits.max_bytes
        {
            return Err(item);
        }
        self.bytes += bytes;
        self.waiting.push_back(Waiting {
            item,
            bytes,
            arrived,
        });
        Ok(())
    }

    /// The oldest request that is still within its deadline at `now`, and
    /// how long it waited. Call [`WaitQueue::pop_expired`] first.
    pub fn pop(&mut self, now: Instant) -> Option<(T, Duration)> {
        if self.next_deadline().is_some_and(|deadline| deadline <= now) {
            return None;
        }
        self.take().map(|w| (w.item, now.saturating_duration_since(w.arrived)))
    }

    /// The oldest request when it waited past the deadline at `now`, and how long it waited.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(T, Duration)> {
        if !self.next_deadline().is_some_and(|deadline| deadline <= now) {
            return None;
        }
        self.take().map(|w| (w.item, now.saturating_duration_since(w.arrived)))
    }

    /// When the oldest request expires (they expire in arrival order).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .front()
            .map(|w| w.arrived + self.limits.deadline)
    }

    /// Empties the queue (at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.bytes = 0;
        self.waiting.drain(..).map(|w| w.item)
    }

    fn take(&mut self) -> Option<Waiting<T>> {
        let waiting = self.waiting.pop_front()?;
        self.bytes -= waiting.bytes;
        Some(waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> WaitQueue<u32> {
        WaitQueue::new(Limits {
            max_requests: 3,
            max_bytes: 100,
            deadline: Duration::from_secs(2),
        })
    }

    #[test]
    fn bounded_in_requests_and_in_bytes() {
        let now = Instant::now();
        let mut q = queue();
        assert!(q.push(1, 40, now).is_ok());
        assert!(q.push(2, 40, now).is_ok());
        assert_eq!(q.push(3, 21, now), Err(3), "101 bytes");
        assert!(q.push(4, 20, now).is_ok());
        assert_eq!(q.push(5, 0, now), Err(5), "4 requests");
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(now).map(|(item, _)| item), Some(1));
        assert!(q.push(6, 40, now).is_ok(), "its bytes were given back");
        let rest: Vec<u32> = q.drain().collect();
        assert_eq!(rest, vec![2, 4, 6]);
        assert!(q.is_empty());
        assert!(q.push(7, 100, now).is_ok(), "drain gives every byte back");
    }

    #[test]
    fn a_request_past_its_deadline_leaves_unrun_in_arrival_order() {
        let start = Instant::now();
        let mut q = queue();
        q.push(1, 1, start).unwrap();
        q.push(2, 1, start + Duration::from_secs(1)).unwrap();
        assert_eq!(q.next_deadline(), Some(start + Duration::from_secs(2)));
        let later = start + Duration::from_millis(2500);
        assert!(q.pop(later).is_none(), "never run an expired request");
        assert_eq!(
            q.pop_expired(later),
            Some((1, Duration::from_millis(2500)))
        );
        assert!(q.pop_expired(later).is_none(), "2 is within its deadline");
        assert_eq!(q.pop(later), Some((2, Duration::from_millis(1500))));
        assert_eq!(q.next_deadline(), None);
    }
}
