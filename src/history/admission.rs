//! The history service's admission control: a budget of waiting requests,
//! bounded in requests and in bytes, taken on arrival before anything else
//! is done with a request (a request over budget is refused at once, so
//! nothing piles up in memory), and the wait queue where checked requests
//! wait, first in first out, for one of the service's slots; a request that
//! waited past the deadline leaves it unrun.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::HistoryConfig;

/// Requests received and not yet started or answered: how many, how many bytes.
#[derive(Debug, Default)]
struct Held {
    requests: usize,
    bytes: usize,
}

/// The bounds of waiting requests (`history.max_queued_requests`,
/// `history.max_queued_bytes`), shared by the intake and the dispatcher.
#[derive(Debug)]
pub struct Budget {
    max_requests: usize,
    max_bytes: usize,
    held: Mutex<Held>,
}

/// One waiting request's share of the [`Budget`], given back when dropped
/// (the request started, or was answered without running).
#[derive(Debug)]
pub struct Ticket {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(config: &HistoryConfig) -> Arc<Budget> {
        Arc::new(Budget {
            max_requests: config.max_queued_requests,
            max_bytes: config.max_queued_bytes,
            held: Mutex::new(Held::default()),
        })
    }

    /// A ticket for a request of `bytes`, unless the budget is spent.
    pub fn admit(self: &Arc<Self>, bytes: usize) -> Option<Ticket> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.requests >= self.max_requests || held.bytes + bytes > self.max_bytes {
            return None;
        }
        held.requests += 1;
        held.bytes += bytes;
        Some(Ticket {
            budget: self.clone(),
            bytes,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|e| e.into_inner());
        held.requests -= 1;
        held.bytes -= self.bytes;
    }
}

struct Waiting<T> {
    item: T,
    arrived: Instant,
}

/// Checked requests waiting for a slot, oldest first.
pub struct WaitQueue<T> {
    waiting: VecDeque<Waiting<T>>,
    deadline: Duration,
}

impl<T> WaitQueue<T> {
    /// A queue whose requests may wait `deadline` (`history.queue_deadline_ms`).
    pub fn new(deadline: Duration) -> WaitQueue<T> {
        WaitQueue {
            waiting: VecDeque::new(),
            deadline,
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Queues `item`, which arrived at `arrived` (its wait counts from then).
    pub fn push(&mut self, item: T, arrived: Instant) {
        self.waiting.push_back(Waiting { item, arrived });
    }

    /// The oldest request, unless it waited past the deadline at `now`, and
    /// how long it waited.
    pub fn pop(&mut self, now: Instant) -> Option<(T, Duration)> {
        if self.expired(now) {
            return None;
        }
        self.take(now)
    }

    /// The oldest request when it waited past the deadline at `now`, and how long it waited.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(T, Duration)> {
        if !self.expired(now) {
            return None;
        }
        self.take(now)
    }

    /// Whether the oldest request waited past the deadline at `now`.
    fn expired(&self, now: Instant) -> bool {
        self.next_deadline().is_some_and(|deadline| deadline <= now)
    }

    /// When the oldest request expires (they expire in arrival order).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.front().map(|w| w.arrived + self.deadline)
    }

    /// Empties the queue (at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.waiting.drain(..).map(|w| w.item)
    }

    fn take(&mut self, now: Instant) -> Option<(T, Duration)> {
        let waiting = self.waiting.pop_front()?;
        Some((waiting.item, now.saturating_duration_since(waiting.arrived)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Arc<Budget> {
        Budget::new(&HistoryConfig {
            max_queued_requests: 3,
            max_queued_bytes: 100,
            ..HistoryConfig::default()
        })
    }

    #[test]
    fn the_budget_is_bounded_in_requests_and_in_bytes_and_tickets_give_it_back() {
        let budget = budget();
        let first = budget.admit(40).unwrap();
        let second = budget.admit(40).unwrap();
        assert!(budget.admit(21).is_none(), "101 bytes");
        let third = budget.admit(20).unwrap();
        assert!(budget.admit(0).is_none(), "4 requests");
        drop(first);
        let fourth = budget.admit(40).expect("its bytes were given back");
        drop((second, third, fourth));
        assert!(budget.admit(100).is_some(), "every byte is back");
    }

    #[test]
    fn a_request_past_its_deadline_leaves_unrun_in_arrival_order() {
        let start = Instant::now();
        let mut q = WaitQueue::new(Duration::from_secs(2));
        q.push(1, start);
        q.push(2, start + Duration::from_secs(1));
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_deadline(), Some(start + Duration::from_secs(2)));
        let later = start + Duration::from_millis(2500);
        assert!(q.pop(later).is_none(), "never run an expired request");
        assert_eq!(q.pop_expired(later), Some((1, Duration::from_millis(2500))));
        assert!(q.pop_expired(later).is_none(), "2 is within its deadline");
        assert_eq!(q.pop(later), Some((2, Duration::from_millis(1500))));
        assert_eq!(q.next_deadline(), None);
        q.push(3, later);
        assert_eq!(q.drain().collect::<Vec<_>>(), vec![3]);
        assert!(q.is_empty());
    }
}
