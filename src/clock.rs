//! The clock: the only reader of "now". The daemon runs on the system clock; tests hand
//! the app a manual one and move time forward instead of waiting for it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::domain::Millis;
use crate::domain::time::millis;

/// Where "now" comes from.
pub trait TimeSource: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
}

/// A cheap handle on a time source, passed to every part that reads the time.
#[derive(Clone)]
pub struct Clock(Arc<dyn TimeSource>);

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(SystemClock))
    }

    /// Any time source.
    pub fn from_source(source: Arc<dyn TimeSource>) -> Clock {
        Clock(source)
    }

    /// Milliseconds since the Unix epoch, now.
    pub fn now(&self) -> Millis {
        self.0.now()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Clock({})", self.now())
    }
}

impl TimeSource for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(millis)
            .unwrap_or_default()
    }
}

impl ManualClock {
    /// A clock standing at `start` (epoch milliseconds).
    pub fn new(start: Millis) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(start)))
    }

    /// A clock standing at the system clock's present moment.
    pub fn starting_now() -> ManualClock {
        ManualClock::new(SystemClock.now())
    }

    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(millis(by), Ordering::SeqCst);
    }

    /// The `Clock` handle the app reads.
    pub fn clock(&self) -> Clock {
        Clock(Arc::new(self.clone()))
    }
}

impl TimeSource for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let manual = ManualClock::new(1_000);
        let clock = manual.clock();
        assert_eq!(clock.now(), 1_000);
        manual.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), 91_000);
    }

    #[test]
    fn the_system_clock_reads_the_present() {
        let now = Clock::system().now();
        assert!(now > 1_700_000_000_000, "{now}");
    }
}
