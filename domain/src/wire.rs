//! The stored and published form of order events: a type name, a schema version and a JSON
//! payload. This is the contract with readers (projectors, other teams), fixed by the JSON
//! Schemas in `schemas/events/`, one file per type and version.
//!
//! Writers always emit the newest version. Readers accept every version ever written: older
//! payloads are upcast step by step to the newest shape before they are parsed, so stored
//! events stay readable forever without rewriting the store.
//!
//! Versions so far:
//! - `OrderPlaced` v1 carried lines without totals; v2 adds `line_total_minor` per line and
//!   `total_minor` (computed by the upcaster, with overflow checked).
//! - `OrderPlaced` v3 seals the shipping address with the customer's data key and replaces the
//!   payment token by a reference (`crate::personal`). Its upcaster cannot seal (the domain
//!   holds no keys): it wraps the v2 clear values as `{"clear": ..}` and
//!   `{"legacy_token": ..}`, which readers show as they are and erasure cannot reach
//!   (docs/security.md).
//! - every other type is at v1.

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::order::OrderEvent;

pub const ORDER_PLACED: &str = "OrderPlaced";
pub const INVENTORY_RESERVED: &str = "InventoryReserved";
pub const PAYMENT_AUTHORIZED: &str = "PaymentAuthorized";
pub const ORDER_CONFIRMED: &str = "OrderConfirmed";
pub const ORDER_CANCELLED: &str = "OrderCancelled";

/// Every event type with its current (written) schema version.
pub const CURRENT_VERSIONS: &[(&str, i32)] = &[
    (ORDER_PLACED, 3),
    (INVENTORY_RESERVED, 1),
    (PAYMENT_AUTHORIZED, 1),
    (ORDER_CONFIRMED, 1),
    (ORDER_CANCELLED, 1),
];

/// Every (type, version) ever written, newest and older ones: each has a schema file.
pub const ALL_VERSIONS: &[(&str, i32)] = &[
    (ORDER_PLACED, 1),
    (ORDER_PLACED, 2),
    (ORDER_PLACED, 3),
    (INVENTORY_RESERVED, 1),
    (PAYMENT_AUTHORIZED, 1),
    (ORDER_CONFIRMED, 1),
    (ORDER_CANCELLED, 1),
];

#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    pub event_type: &'static str,
    pub schema_version: i32,
    pub payload: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("{event_type} has no schema version {version} (this build reads up to {newest})")]
    UnsupportedVersion {
        event_type: String,
        version: i32,
        newest: i32,
    },
    #[error("{event_type} v{version} payload is invalid: {message}")]
    Invalid {
        event_type: String,
        version: i32,
        message: String,
    },
}

pub fn current_version(event_type: &str) -> Option<i32> {
    CURRENT_VERSIONS
        .iter()
        .find(|(t, _)| *t == event_type)
        .map(|(_, v)| *v)
}

pub fn encode(event: &OrderEvent) -> EncodedEvent {
    fn to_value<T: Serialize>(t: &T) -> Value {
        serde_json::to_value(t).expect("domain events always serialize")
    }
    let (event_type, payload) = match event {
        OrderEvent::Placed(e) => (ORDER_PLACED, to_value(e)),
        OrderEvent::InventoryReserved(e) => (INVENTORY_RESERVED, to_value(e)),
        OrderEvent::PaymentAuthorized(e) => (PAYMENT_AUTHORIZED, to_value(e)),
        OrderEvent::Confirmed(e) => (ORDER_CONFIRMED, to_value(e)),
        OrderEvent::Cancelled(e) => (ORDER_CANCELLED, to_value(e)),
    };
    let schema_version = current_version(event_type).expect("every type has a version");
    EncodedEvent {
        event_type,
        schema_version,
        payload,
    }
}

/// Reads a stored event of any known version.
pub fn decode(event_type: &str, version: i32, payload: &Value) -> Result<OrderEvent, DecodeError> {
    let newest =
        current_version(event_type).ok_or_else(|| DecodeError::UnknownType(event_type.into()))?;
    if version < 1 || version > newest {
        return Err(DecodeError::UnsupportedVersion {
            event_type: event_type.into(),
            version,
            newest,
        });
    }
    let invalid = |message: String| DecodeError::Invalid {
        event_type: event_type.into(),
        version,
        message,
    };
    let payload = upcast(event_type, version, payload.clone()).map_err(invalid)?;
    fn parse<T: DeserializeOwned>(v: Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
    let event = match event_type {
        ORDER_PLACED => parse(payload).map(OrderEvent::Placed),
        INVENTORY_RESERVED => parse(payload).map(OrderEvent::InventoryReserved),
        PAYMENT_AUTHORIZED => parse(payload).map(OrderEvent::PaymentAuthorized),
        ORDER_CONFIRMED => parse(payload).map(OrderEvent::Confirmed),
        ORDER_CANCELLED => parse(payload).map(OrderEvent::Cancelled),
        _ => unreachable!("checked by current_version"),
    };
    event.map_err(invalid)
}

/// Brings a payload from `version` to the newest version of its type, one step at a time.
fn upcast(event_type: &str, mut version: i32, mut payload: Value) -> Result<Value, String> {
    while version < current_version(event_type).unwrap_or(version) {
        payload = match (event_type, version) {
            (ORDER_PLACED, 1) => order_placed_v1_to_v2(payload)?,
            (ORDER_PLACED, 2) => order_placed_v2_to_v3(payload)?,
            _ => return Err(format!("no upcaster from v{version}")),
        };
        version += 1;
    }
    Ok(payload)
}

/// v2 adds per-line and order totals, which v1 readers computed themselves.
fn order_placed_v1_to_v2(mut payload: Value) -> Result<Value, String> {
    let lines = payload
        .get_mut("lines")
        .and_then(Value::as_array_mut)
        .ok_or("`lines` is missing or not an array")?;
    let mut total: i64 = 0;
    for line in lines.iter_mut() {
        let qty = line
            .get("quantity")
            .and_then(Value::as_i64)
            .ok_or("line without quantity")?;
        let price = line
            .get("unit_price_minor")
            .and_then(Value::as_i64)
            .ok_or("line without unit_price_minor")?;
        let line_total = qty.checked_mul(price).ok_or("line total overflows")?;
        total = total
            .checked_add(line_total)
            .ok_or("order total overflows")?;
        line.as_object_mut()
            .ok_or("line is not an object")?
            .insert("line_total_minor".into(), json!(line_total));
    }
    payload
        .as_object_mut()
        .ok_or("payload is not an object")?
        .insert("total_minor".into(), json!(total));
    Ok(payload)
}

/// v3 seals the address and references the payment token; a v2 event's clear values are
/// carried as the legacy variants (nothing can seal them after the fact).
fn order_placed_v2_to_v3(mut payload: Value) -> Result<Value, String> {
    let object = payload.as_object_mut().ok_or("payload is not an object")?;
    let address = object
        .remove("shipping_address")
        .ok_or("`shipping_address` is missing")?;
    let token = object
        .remove("payment_token")
        .ok_or("`payment_token` is missing")?;
    object.insert("shipping_address".into(), json!({ "clear": address }));
    object.insert("payment".into(), json!({ "legacy_token": token }));
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::{
        self, CancelledBy, Order, OrderCommand,
        tests::{line, place_cmd},
    };
    use crate::personal::{Payment, Protected};
    use crate::values::Reason;
    use std::path::PathBuf;

    /// One event of every type, produced by the aggregate itself.
    fn every_event() -> Vec<OrderEvent> {
        let mut h = order::decide(
            &Order::NotPlaced,
            OrderCommand::Place(place_cmd(vec![line("A", 2, 150), line("B", 1, 99)])),
        )
        .unwrap();
        for cmd in [
            OrderCommand::MarkInventoryReserved {
                reservation_id: "res-1".into(),
            },
            OrderCommand::MarkPaymentAuthorized {
                authorization_id: "auth-1".into(),
            },
            OrderCommand::Confirm {
                shipment_id: "ship-1".into(),
            },
        ] {
            let e = order::decide(&order::replay(&h), cmd).unwrap();
            h.extend(e);
        }
        let cancelled = order::decide(
            &order::replay(&h[..1]),
            OrderCommand::Cancel {
                reason: Reason::parse("too slow").unwrap(),
                by: CancelledBy::Customer,
            },
        )
        .unwrap();
        h.extend(cancelled);
        h
    }

    fn schema(event_type: &str, version: i32) -> jsonschema::Validator {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas/events")
            .join(format!("{event_type}.v{version}.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let value: Value = serde_json::from_str(&text).unwrap();
        jsonschema::validator_for(&value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn every_event_validates_against_its_schema_file_and_round_trips() {
        let events = every_event();
        let types: std::collections::HashSet<_> =
            events.iter().map(|e| encode(e).event_type).collect();
        assert_eq!(
            types.len(),
            CURRENT_VERSIONS.len(),
            "not every type was produced"
        );
        for e in &events {
            let enc = encode(e);
            let v = schema(enc.event_type, enc.schema_version);
            let errors: Vec<String> = v.iter_errors(&enc.payload).map(|e| e.to_string()).collect();
            assert!(
                errors.is_empty(),
                "{} v{}: {errors:?}\n{}",
                enc.event_type,
                enc.schema_version,
                enc.payload
            );
            assert_eq!(
                &decode(enc.event_type, enc.schema_version, &enc.payload).unwrap(),
                e
            );
        }
    }

    #[test]
    fn every_version_has_a_schema_file() {
        for (t, v) in ALL_VERSIONS {
            schema(t, *v);
        }
    }

    #[test]
    fn the_schemas_reject_what_the_domain_rejects() {
        let enc = encode(&every_event()[0]);
        let v = schema(enc.event_type, enc.schema_version);
        let mut bad = enc.payload.clone();
        bad["lines"][0]["quantity"] = json!(0);
        assert!(!v.is_valid(&bad));
        let mut bad = enc.payload.clone();
        bad["currency"] = json!("euro");
        assert!(!v.is_valid(&bad));
        let mut bad = enc.payload;
        bad.as_object_mut().unwrap().remove("total_minor");
        assert!(!v.is_valid(&bad));
    }

    #[test]
    fn order_placed_v1_is_upcast_to_v2() {
        let v1 = json!({
            "order_id": "0190f3c4-7d2a-7c4e-9a51-3f1d2e3c4b5a",
            "customer_id": "cust-1",
            "currency": "EUR",
            "lines": [
                {"sku": "A", "quantity": 2, "unit_price_minor": 150},
                {"sku": "B", "quantity": 1, "unit_price_minor": 99}
            ],
            "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
            "payment_token": "tok_visa"
        });
        assert!(schema(ORDER_PLACED, 1).is_valid(&v1));
        let OrderEvent::Placed(p) = decode(ORDER_PLACED, 1, &v1).unwrap() else {
            panic!()
        };
        assert_eq!(p.total_minor.get(), 399);
        assert_eq!(p.lines[0].line_total_minor.get(), 300);
    }

    #[test]
    fn order_placed_v2_is_upcast_to_v3_with_its_clear_values_as_legacy_variants() {
        let v2 = json!({
            "order_id": "0190f3c4-7d2a-7c4e-9a51-3f1d2e3c4b5a",
            "customer_id": "cust-1",
            "currency": "EUR",
            "lines": [{"sku": "A", "quantity": 2, "unit_price_minor": 150, "line_total_minor": 300}],
            "total_minor": 300,
            "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
            "payment_token": "tok_visa"
        });
        assert!(schema(ORDER_PLACED, 2).is_valid(&v2));
        let OrderEvent::Placed(p) = decode(ORDER_PLACED, 2, &v2).unwrap() else {
            panic!()
        };
        assert!(matches!(&p.shipping_address, Protected::Clear(a) if a.line1 == "1 Main St"));
        assert_eq!(
            p.payment,
            Payment::LegacyToken(crate::values::PaymentToken::parse("tok_visa").unwrap())
        );
        // What v3 writes is sealed: the legacy shape is not a valid v3 payload.
        assert!(!schema(ORDER_PLACED, 3).is_valid(&encode(&OrderEvent::Placed(p)).payload));
    }

    #[test]
    fn a_v3_payload_carries_no_clear_address_and_no_token() {
        let enc = encode(&every_event()[0]);
        assert_eq!(enc.schema_version, 3);
        let text = enc.payload.to_string();
        assert!(
            !text.contains("1 Main St") && !text.contains("tok_visa"),
            "{text}"
        );
        assert!(enc.payload["shipping_address"]["sealed"]["ciphertext"].is_string());
        assert!(enc.payload["payment"]["ref"].is_string());
    }

    #[test]
    fn unknown_types_and_versions_are_typed_errors() {
        assert_eq!(
            decode("Nope", 1, &json!({})),
            Err(DecodeError::UnknownType("Nope".into()))
        );
        assert!(matches!(
            decode(ORDER_PLACED, 4, &json!({})),
            Err(DecodeError::UnsupportedVersion { newest: 3, .. })
        ));
        assert!(matches!(
            decode(ORDER_CANCELLED, 1, &json!({"x": 1})),
            Err(DecodeError::Invalid { .. })
        ));
        let overflow =
            json!({"lines": [{"sku": "A", "quantity": 1000, "unit_price_minor": i64::MAX}]});
        assert!(matches!(
            decode(ORDER_PLACED, 1, &overflow),
            Err(DecodeError::Invalid { .. })
        ));
    }
}
