//! Capped exponential backoff with jitter, for every reconnect and retry.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next attempt: doubles up to the cap, ±20 % jitter
    /// so replicas do not retry in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::rng().random_range(0.8..1.2))
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// From now on wait the longest: for a failure only an operator can fix.
    pub fn jump_to_max(&mut self) {
        self.next = self.max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert!((80..=120).contains(&delays[0]), "{delays:?}");
        assert!((160..=240).contains(&delays[1]), "{delays:?}");
        assert!(
            delays[3..].iter().all(|d| (320..=480).contains(d)),
            "{delays:?}"
        );
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(120));
        backoff.jump_to_max();
        assert!(backoff.next_delay() >= Duration::from_millis(320));
    }
}
