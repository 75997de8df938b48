//! Waking the readers of the outbox and of the feed (the relay, the saga's feed) without a
//! `NOTIFY` on every commit.
//!
//! Why: PostgreSQL serializes the commits of transactions that `NOTIFY` (they queue their
//! notifications under one lock), so the statement-level trigger that used to wake the relay
//! on every append capped the write path (issue 17 measured it at about a third of the
//! throughput). Readers poll instead, with an adaptive wait ([`Idle`]): after finding work
//! they look again at once; idle, they wait 1 ms, 2 ms, 4 ms ... up to their maximum. An
//! append in this process hints them ([`appended`], called by [`crate::append_at`] before
//! its caller commits): the hint resets their wait, so they look again within a millisecond
//! or two and keep looking, backing off, until the commit is visible. Appends by other
//! processes are found within the maximum wait. No wake-up is ever lost: the poll is the
//! truth, the hint only shortens the wait.

use std::{sync::LazyLock, time::Duration};

use tokio::sync::watch;

/// The shortest wait after an idle poll.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Counts this process's appends; readers watch it.
static APPENDS: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Hints this process's readers that rows are (about to be) there.
pub fn appended() {
    APPENDS.send_modify(|n| *n = n.wrapping_add(1));
}

/// A reader's adaptive wait between polls.
#[derive(Debug)]
pub struct Idle {
    hints: watch::Receiver<u64>,
    max: Duration,
    next: Duration,
}

impl Idle {
    /// Waits at most `max` between idle polls (at least 1 ms), cut short by this process's
    /// appends.
    pub fn new(max: Duration) -> Self {
        Self::hinted_by(APPENDS.subscribe(), max)
    }

    fn hinted_by(hints: watch::Receiver<u64>, max: Duration) -> Self {
        Self {
            hints,
            max: max.max(MIN_WAIT),
            next: MIN_WAIT,
        }
    }

    /// The poll found work: the next idle wait starts short again.
    pub fn busy(&mut self) {
        self.next = MIN_WAIT;
    }

    /// The poll found nothing: waits the current backoff (then doubles it, up to the
    /// maximum), or less if this process appends meanwhile (or appended since the last wait).
    pub async fn wait(&mut self) {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = self.hints.changed() => {
                if changed.is_ok() {
                    self.next = MIN_WAIT;
                }
            }
        }
    }

    /// The wait the next idle poll would take.
    #[cfg(test)]
    fn next_wait(&self) -> Duration {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn idle_waits_double_up_to_the_maximum_and_work_resets_them() {
        let (_hints, rx) = watch::channel(0);
        let mut idle = Idle::hinted_by(rx, MS * 10);
        let mut waits = Vec::new();
        for _ in 0..6 {
            waits.push(idle.next_wait());
            idle.wait().await;
        }
        assert_eq!(waits, [MS, MS * 2, MS * 4, MS * 8, MS * 10, MS * 10]);
        idle.busy();
        assert_eq!(idle.next_wait(), MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hint_cuts_a_long_wait_short_and_one_given_before_the_wait_is_not_lost() {
        let (hints, rx) = watch::channel(0u64);
        let mut idle = Idle::hinted_by(rx, Duration::from_secs(60));
        while idle.next_wait() < Duration::from_secs(60) {
            idle.wait().await;
        }
        let started = tokio::time::Instant::now();
        tokio::join!(idle.wait(), async {
            tokio::time::sleep(MS * 5).await;
            hints.send_modify(|n| *n += 1);
        });
        assert_eq!(started.elapsed(), MS * 5);
        assert_eq!(idle.next_wait(), MS);
        // Hinted while it was polling (not waiting): the next wait returns at once.
        while idle.next_wait() < Duration::from_secs(60) {
            idle.wait().await;
        }
        hints.send_modify(|n| *n += 1);
        let started = tokio::time::Instant::now();
        idle.wait().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn an_append_hints_every_reader_of_this_process() {
        let mut rx = APPENDS.subscribe();
        rx.mark_unchanged();
        appended();
        assert!(rx.has_changed().unwrap());
    }
}
