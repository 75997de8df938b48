//! How far a long job has come (a projection rebuild, an audit verification): percent of its
//! count at the start, rate since it started, time left at that rate, and the bar a page
//! shows for it.

use chrono::{DateTime, Utc};
use maud::{Markup, html};

/// A job's pace: percent of the count taken at its start (what it works through may grow,
/// so it is capped at 100), items per second since it started, seconds left at that rate.
#[derive(Debug, PartialEq)]
pub struct Pace {
    pub percent: i64,
    pub per_second: Option<f64>,
    pub eta_seconds: Option<i64>,
}

impl Pace {
    /// `done` of `total` items, started at `started_at`, last counted at `updated_at` (or
    /// `now`).
    pub fn of(
        done: i64,
        total: i64,
        started_at: Option<DateTime<Utc>>,
        updated_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Pace {
        let percent = if total <= 0 {
            100
        } else {
            (done * 100 / total).clamp(0, 100)
        };
        let elapsed = started_at
            .map(|s| (updated_at.unwrap_or(now) - s).as_seconds_f64())
            .filter(|s| *s > 0.0);
        let per_second = elapsed.map(|s| done as f64 / s).filter(|r| *r > 0.0);
        let eta_seconds =
            per_second.map(|rate| ((total - done).max(0) as f64 / rate).ceil() as i64);
        Pace {
            percent,
            per_second,
            eta_seconds,
        }
    }

    /// A progress bar with its numbers: `done of total <unit>, N <unit>/s, about S s left`.
    pub fn bar(&self, done: i64, total: i64, unit: &str) -> Markup {
        html! {
            progress value=(done) max=(total.max(done).max(1)) {}
            span.percent { (self.percent) "%" }
            " " (done) " of " (total) " " (unit)
            @if let Some(rate) = self.per_second { ", " (format!("{rate:.0}")) " " (unit) "/s" }
            @if let Some(eta) = self.eta_seconds { ", about " (eta) " s left" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(done: i64, total: i64, secs: Option<i64>) -> Pace {
        let start = Utc::now();
        Pace::of(
            done,
            total,
            secs.map(|_| start),
            secs.map(|s| start + chrono::Duration::seconds(s)),
            Utc::now(),
        )
    }

    #[test]
    fn pace_is_percent_of_the_count_at_the_start_rate_since_then_and_time_left_at_that_rate() {
        assert_eq!(
            pace(2_500, 10_000, Some(5)),
            Pace {
                percent: 25,
                per_second: Some(500.0),
                eta_seconds: Some(15)
            }
        );
    }

    #[test]
    fn a_count_that_grew_past_the_start_caps_at_100_percent_and_nothing_left() {
        let p = pace(12_000, 10_000, Some(4));
        assert_eq!((p.percent, p.eta_seconds), (100, Some(0)));
        // Nothing to do is done at once; a job not yet timed has no rate.
        assert_eq!(
            pace(0, 0, None),
            Pace {
                percent: 100,
                per_second: None,
                eta_seconds: None
            }
        );
    }
}
