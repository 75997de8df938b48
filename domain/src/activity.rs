//! User activity: what visitors do in the shop (page views, product views, searches, cart
//! changes, checkout starts), as the client sends it and as it travels on the
//! `user-activity` topic.
//!
//! Activity is telemetry, not a decision: it never goes through the event store. The
//! ingestion endpoint checks a batch against `schemas/activity/batch.v1.json`, then against
//! the rules here (event time within bounds), and produces one [`UserActivity`] per event.
//! Its id is derived, not random, so a batch sent twice (a client retrying after a lost
//! answer) yields the same ids and the analytics group counts it once.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::personal::Protected;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityKind {
    PageView,
    ProductView,
    Search,
    AddToCart,
    RemoveFromCart,
    CheckoutStarted,
}

impl ActivityKind {
    /// Kinds that are about one product (and must name it).
    pub fn needs_product(self) -> bool {
        matches!(
            self,
            ActivityKind::ProductView | ActivityKind::AddToCart | ActivityKind::RemoveFromCart
        )
    }
}

/// The body of `POST /activity` (after the schema check).
#[derive(Debug, Clone, Deserialize)]
pub struct Batch {
    pub session_id: String,
    pub events: Vec<ClientEvent>,
}

/// One event as the client describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    #[serde(rename = "type")]
    pub kind: ActivityKind,
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_sku: Option<String>,
    #[serde(default)]
    pub properties: serde_json::Map<String, serde_json::Value>,
}

/// One event on the `user-activity` topic (`schemas/activity/UserActivity.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserActivity {
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub kind: ActivityKind,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub session_id: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub product_sku: Option<String>,
    #[serde(default)]
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// The client's address, personal data: sealed with the customer's data key for a
    /// signed-in customer (erased with her), and for an anonymous visitor only its network
    /// ([`anonymised_ip`]), which names no one. Messages written before sealing carry the
    /// full address as a bare string, read as `Clear`.
    pub client_ip: Protected<String>,
}

/// The associated data a customer's client address is sealed under.
pub fn client_ip_context(user_id: &str) -> String {
    format!("user:{user_id}:client_ip")
}

/// An anonymous visitor's address as kept: the /24 of an IPv4 address, the /48 of an IPv6
/// one (the usual anonymisation: it locates a provider, not a person).
pub fn anonymised_ip(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => anonymised_ip(std::net::IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                format!(
                    "{}/48",
                    std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0)
                )
            }
        },
    }
}

impl UserActivity {
    /// The Kafka key: one visitor's events stay in order on one partition.
    pub fn key(&self) -> String {
        visitor_key(self.user_id.as_deref(), &self.session_id)
    }

    /// Whether a message read from the topic is one ingestion could have written: readers
    /// check it, since anyone who can produce to the topic could write anything.
    pub fn check(&self) -> Result<(), String> {
        let session_ok = (8..=64).contains(&self.session_id.len())
            && self
                .session_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !session_ok {
            return Err("session_id is not a session id".into());
        }
        if let Some(u) = &self.user_id {
            crate::values::CustomerId::parse(u).map_err(|e| e.to_string())?;
        }
        if let Some(sku) = &self.product_sku {
            crate::values::Sku::parse(sku).map_err(|e| e.to_string())?;
        }
        if self.kind.needs_product() && self.product_sku.is_none() {
            return Err("a product event without a product".into());
        }
        let sane = |t: DateTime<Utc>| (2000..=2999).contains(&chrono::Datelike::year(&t));
        if !sane(self.occurred_at) || !sane(self.received_at) {
            return Err("a time outside the years 2000 to 2999".into());
        }
        Ok(())
    }
}

/// `user:<id>` for a signed-in customer, `session:<id>` for an anonymous visitor.
pub fn visitor_key(user_id: Option<&str>, session_id: &str) -> String {
    match user_id {
        Some(u) => format!("user:{u}"),
        None => format!("session:{session_id}"),
    }
}

/// How far event times may stray from the server's clock.
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    /// Clients' clocks run ahead by up to this much.
    pub max_skew: TimeDelta,
    /// Older events are refused (the analytics keep a day of windows).
    pub max_age: TimeDelta,
}

/// Why one event of a batch is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventRefused {
    #[error("occurred_at is more than {0} seconds in the future")]
    InFuture(i64),
    #[error("occurred_at is more than {0} seconds in the past")]
    TooOld(i64),
    #[error("{0:?} must name a product (product_sku)")]
    NeedsProduct(ActivityKind),
}

/// The server's view of one client event: checked against the bounds, with its derived id.
pub fn accept(
    event: &ClientEvent,
    session_id: &str,
    user_id: Option<&str>,
    client_ip: &Protected<String>,
    now: DateTime<Utc>,
    bounds: TimeBounds,
) -> Result<UserActivity, EventRefused> {
    if event.occurred_at > now + bounds.max_skew {
        return Err(EventRefused::InFuture(bounds.max_skew.num_seconds()));
    }
    if event.occurred_at < now - bounds.max_age {
        return Err(EventRefused::TooOld(bounds.max_age.num_seconds()));
    }
    if event.kind.needs_product() && event.product_sku.is_none() {
        return Err(EventRefused::NeedsProduct(event.kind));
    }
    Ok(UserActivity {
        event_id: event_id(event, session_id, user_id),
        kind: event.kind,
        occurred_at: event.occurred_at,
        received_at: now,
        session_id: session_id.to_owned(),
        user_id: user_id.map(str::to_owned),
        product_sku: event.product_sku.clone(),
        properties: event.properties.clone(),
        client_ip: client_ip.clone(),
    })
}

/// Namespace of the derived activity ids (UUID v5).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0c_54f1_3b2e_4c7a_9d8e_1f20_a5b6_c7d8);

/// The event's id: from the client's `event_id` when it sent one, else from the event's
/// content; scoped to the visitor (and session), so one visitor cannot collide with another's
/// ids. Two identical events of one session (same kind, time, product and properties) are
/// one event.
pub fn event_id(event: &ClientEvent, session_id: &str, user_id: Option<&str>) -> Uuid {
    let scope = format!("{}\n{session_id}\n", visitor_key(user_id, session_id));
    let name = match event.event_id {
        Some(id) => format!("{scope}id:{id}"),
        None => {
            let mut content = event.clone();
            content.event_id = None;
            // serde_json's map is ordered by key, so equal events serialize equally.
            format!(
                "{scope}content:{}",
                serde_json::to_string(&content).expect("an event serializes")
            )
        }
    };
    Uuid::new_v5(&ID_NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn bounds() -> TimeBounds {
        TimeBounds {
            max_skew: TimeDelta::minutes(5),
            max_age: TimeDelta::hours(24),
        }
    }

    fn ip() -> Protected<String> {
        Protected::Clear(anonymised_ip("10.0.0.1".parse().unwrap()))
    }

    #[test]
    fn anonymous_addresses_keep_only_their_network() {
        assert_eq!(
            anonymised_ip("203.0.113.77".parse().unwrap()),
            "203.0.113.0/24"
        );
        assert_eq!(
            anonymised_ip("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1::/48"
        );
        assert_eq!(
            anonymised_ip("::ffff:203.0.113.77".parse().unwrap()),
            "203.0.113.0/24"
        );
        // A message written before sealing (a bare address) still reads.
        let legacy: Protected<String> =
            serde_json::from_value(serde_json::json!("10.1.2.3")).unwrap();
        assert_eq!(legacy, Protected::Clear("10.1.2.3".into()));
    }

    fn view(sku: Option<&str>, when: &str) -> ClientEvent {
        ClientEvent {
            event_id: None,
            kind: ActivityKind::ProductView,
            occurred_at: at(when),
            product_sku: sku.map(str::to_owned),
            properties: Default::default(),
        }
    }

    #[test]
    fn ids_are_stable_per_content_and_scoped_to_the_visitor() {
        let e = view(Some("SKU-1"), "2026-12-04T10:00:00Z");
        let a = event_id(&e, "sess-0001", None);
        assert_eq!(
            a,
            event_id(&e, "sess-0001", None),
            "a resent event keeps its id"
        );
        assert_ne!(a, event_id(&e, "sess-0002", None));
        assert_ne!(a, event_id(&e, "sess-0001", Some("alice")));
        let later = view(Some("SKU-1"), "2026-12-04T10:00:01Z");
        assert_ne!(a, event_id(&later, "sess-0001", None));
        let client = ClientEvent {
            event_id: Some(Uuid::nil()),
            ..e.clone()
        };
        assert_ne!(
            event_id(&client, "sess-0001", None),
            event_id(&client, "sess-0001", Some("bob"))
        );
    }

    #[test]
    fn event_time_is_bounded_and_product_kinds_name_a_product() {
        let now = at("2026-12-04T10:00:00Z");
        let ok = accept(
            &view(Some("SKU-1"), "2026-12-04T09:00:00Z"),
            "sess-0001",
            Some("alice"),
            &ip(),
            now,
            bounds(),
        )
        .unwrap();
        assert_eq!((ok.received_at, ok.key().as_str()), (now, "user:alice"));
        let refused =
            |e: &ClientEvent| accept(e, "sess-0001", None, &ip(), now, bounds()).unwrap_err();
        assert_eq!(
            refused(&view(Some("SKU-1"), "2026-12-04T10:06:00Z")),
            EventRefused::InFuture(300)
        );
        assert_eq!(
            refused(&view(Some("SKU-1"), "2026-12-03T09:59:59Z")),
            EventRefused::TooOld(86_400)
        );
        assert_eq!(
            refused(&view(None, "2026-12-04T10:00:00Z")),
            EventRefused::NeedsProduct(ActivityKind::ProductView)
        );
    }

    #[test]
    fn messages_ingestion_could_not_have_written_are_refused_by_readers() {
        let now = at("2026-12-04T10:00:00Z");
        let ok = accept(
            &view(Some("SKU-1"), "2026-12-04T09:59:00Z"),
            "sess-0001",
            Some("alice"),
            &ip(),
            now,
            bounds(),
        )
        .unwrap();
        assert_eq!(ok.check(), Ok(()));
        let bad = [
            UserActivity {
                session_id: "a\u{0}bcdefgh".into(),
                ..ok.clone()
            },
            UserActivity {
                user_id: Some("x\u{0}".into()),
                ..ok.clone()
            },
            UserActivity {
                product_sku: Some("SKU 1".into()),
                ..ok.clone()
            },
            UserActivity {
                product_sku: None,
                ..ok.clone()
            },
            UserActivity {
                occurred_at: at("1500-01-01T00:00:00Z"),
                ..ok.clone()
            },
        ];
        for b in bad {
            assert!(b.check().is_err(), "{b:?}");
        }
    }

    #[test]
    fn the_wire_form_round_trips() {
        let now = at("2026-12-04T10:00:00Z");
        let a = accept(
            &view(Some("SKU-1"), "2026-12-04T09:59:00Z"),
            "sess-0001",
            None,
            &ip(),
            now,
            bounds(),
        )
        .unwrap();
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["type"], "product_view");
        assert_eq!(serde_json::from_value::<UserActivity>(json).unwrap(), a);
    }
}
