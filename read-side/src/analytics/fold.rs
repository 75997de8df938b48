//! Analytics' fold: what a batch of facts (activity events and order events) adds to the
//! counters, in memory, with no clock but the facts' own times.
//!
//! Windows are tumbling minutes in event time (`occurred_at` for activity, `recorded_at`
//! for orders). A window is final [`LATENESS`] after it ends: an activity event that reached
//! the server (`received_at`) after that no longer changes it; it is counted in `late_events`
//! of the minute it arrived, and still in its product's totals.
//! Nothing here reads the wall clock, so replaying the same facts gives the same rows.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use domain::{
    activity::{ActivityKind, UserActivity},
    order::OrderEvent,
};

/// How late an activity event may arrive and still count in its minute.
pub const LATENESS: TimeDelta = TimeDelta::minutes(10);

/// Columns of `analytics_products`, in [`ProductDelta`] order.
pub const PRODUCT_COLUMNS: [&str; 5] = [
    "views",
    "add_to_carts",
    "remove_from_carts",
    "orders",
    "units",
];

/// Columns of `analytics_minutes`, in [`MinuteDelta`] order.
pub const MINUTE_COLUMNS: [&str; 10] = [
    "page_views",
    "product_views",
    "searches",
    "add_to_carts",
    "remove_from_carts",
    "checkouts_started",
    "orders_placed",
    "orders_confirmed",
    "orders_cancelled",
    "late_events",
];

/// Additions to one product's counters, in [`PRODUCT_COLUMNS`] order.
pub type ProductDelta = [i64; 5];
/// Additions to one minute's counters, in [`MINUTE_COLUMNS`] order.
pub type MinuteDelta = [i64; 10];

/// One thing the analytics group counts.
#[derive(Debug, Clone)]
pub enum Fact {
    Activity(UserActivity),
    Order {
        recorded_at: DateTime<Utc>,
        event: OrderEvent,
    },
}

/// Everything a batch adds, keyed in the order rows are written (so concurrent writers
/// lock rows in one order).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    pub products: BTreeMap<String, ProductDelta>,
    pub minutes: BTreeMap<DateTime<Utc>, MinuteDelta>,
    /// `(kind, id)` → latest activity (event time, never after its arrival).
    pub presence: BTreeMap<(&'static str, String), DateTime<Utc>>,
}

pub fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::minutes(1)).unwrap_or(at)
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.products.is_empty() && self.minutes.is_empty() && self.presence.is_empty()
    }

    /// Adds one (not yet counted) fact.
    pub fn add(&mut self, fact: &Fact) {
        match fact {
            Fact::Activity(a) => self.add_activity(a),
            Fact::Order { recorded_at, event } => self.add_order(*recorded_at, event),
        }
    }

    fn product(&mut self, sku: &str, column: usize, n: i64) {
        self.products.entry(sku.to_owned()).or_default()[column] += n;
    }

    fn minute(&mut self, at: DateTime<Utc>, column: usize, n: i64) {
        self.minutes.entry(minute_of(at)).or_default()[column] += n;
    }

    fn seen(&mut self, kind: &'static str, id: &str, at: DateTime<Utc>) {
        let last = self.presence.entry((kind, id.to_owned())).or_insert(at);
        *last = (*last).max(at);
    }

    fn add_activity(&mut self, a: &UserActivity) {
        let (window_column, product_column) = match a.kind {
            ActivityKind::PageView => (0, None),
            ActivityKind::ProductView => (1, Some(0)),
            ActivityKind::Search => (2, None),
            ActivityKind::AddToCart => (3, Some(1)),
            ActivityKind::RemoveFromCart => (4, Some(2)),
            ActivityKind::CheckoutStarted => (5, None),
        };
        if let (Some(c), Some(sku)) = (product_column, &a.product_sku) {
            self.product(sku, c, 1);
        }
        // Its window is final LATENESS after the window ends.
        if a.received_at > minute_of(a.occurred_at) + TimeDelta::minutes(1) + LATENESS {
            self.minute(a.received_at, 9, 1);
        } else {
            self.minute(a.occurred_at, window_column, 1);
        }
        let at = a.occurred_at.min(a.received_at);
        self.seen("session", &a.session_id, at);
        if let Some(u) = &a.user_id {
            self.seen("user", u, at);
        }
    }

    fn add_order(&mut self, at: DateTime<Utc>, event: &OrderEvent) {
        match event {
            OrderEvent::Placed(p) => {
                self.minute(at, 6, 1);
                for l in &p.lines {
                    self.product(l.sku.as_str(), 3, 1);
                    self.product(l.sku.as_str(), 4, l.quantity.get());
                }
            }
            OrderEvent::Confirmed(_) => self.minute(at, 7, 1),
            OrderEvent::Cancelled(_) => self.minute(at, 8, 1),
            OrderEvent::InventoryReserved(_) | OrderEvent::PaymentAuthorized(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn activity(kind: ActivityKind, sku: Option<&str>, occurred: &str, received: &str) -> Fact {
        Fact::Activity(UserActivity {
            event_id: uuid::Uuid::new_v4(),
            kind,
            occurred_at: at(occurred),
            received_at: at(received),
            session_id: "sess-0001".into(),
            user_id: Some("alice".into()),
            product_sku: sku.map(str::to_owned),
            properties: Default::default(),
            client_ip: domain::personal::Protected::Clear("10.0.0.0/24".into()),
        })
    }

    #[test]
    fn activity_counts_in_its_minute_per_product_and_as_presence() {
        let mut c = Changes::default();
        c.add(&activity(
            ActivityKind::ProductView,
            Some("SKU-1"),
            "2026-12-04T10:00:30Z",
            "2026-12-04T10:00:31Z",
        ));
        c.add(&activity(
            ActivityKind::AddToCart,
            Some("SKU-1"),
            "2026-12-04T10:00:50Z",
            "2026-12-04T10:01:01Z",
        ));
        c.add(&activity(
            ActivityKind::PageView,
            None,
            "2026-12-04T10:01:10Z",
            "2026-12-04T10:01:11Z",
        ));
        assert_eq!(c.products["SKU-1"], [1, 1, 0, 0, 0]);
        assert_eq!(
            c.minutes[&at("2026-12-04T10:00:00Z")],
            [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            c.minutes[&at("2026-12-04T10:01:00Z")],
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            c.presence[&("user", "alice".to_owned())],
            at("2026-12-04T10:01:10Z")
        );
        assert_eq!(
            c.presence[&("session", "sess-0001".to_owned())],
            at("2026-12-04T10:01:10Z")
        );
    }

    #[test]
    fn a_late_event_leaves_its_closed_window_alone_but_counts_for_its_product() {
        let mut c = Changes::default();
        // The 10:00 window ends at 10:01 and is final at 10:11.
        let late = activity(
            ActivityKind::ProductView,
            Some("SKU-2"),
            "2026-12-04T10:00:59Z",
            "2026-12-04T10:11:01Z",
        );
        c.add(&late);
        assert!(!c.minutes.contains_key(&at("2026-12-04T10:00:00Z")));
        assert_eq!(c.minutes[&at("2026-12-04T10:11:00Z")][9], 1, "late_events");
        assert_eq!(c.products["SKU-2"][0], 1);
        let in_time = activity(
            ActivityKind::ProductView,
            Some("SKU-2"),
            "2026-12-04T10:00:00Z",
            "2026-12-04T10:10:59Z",
        );
        c.add(&in_time);
        assert_eq!(
            c.minutes[&at("2026-12-04T10:00:00Z")][1],
            1,
            "still within the bound"
        );
    }

    #[test]
    fn presence_never_runs_ahead_of_arrival() {
        let mut c = Changes::default();
        c.add(&activity(
            ActivityKind::PageView,
            None,
            "2026-12-04T10:04:00Z",
            "2026-12-04T10:00:00Z",
        ));
        assert_eq!(
            c.presence[&("user", "alice".to_owned())],
            at("2026-12-04T10:00:00Z")
        );
    }
}
