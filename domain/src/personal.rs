//! Personal data as events carry it: sealed, or (in events written before sealing) clear.
//!
//! Why: the event store is append-only and its hash chain forbids rewriting history, yet a
//! customer may ask to be forgotten. So personal data never enters an event in clear: the
//! write side seals it with the customer's data key (AES-256-GCM, `platform::vault`) and the
//! event carries only the [`Sealed`] box. Forgetting the customer deletes the key, and every
//! copy of the box (store, Kafka, RabbitMQ, dead letters, saga state) becomes unreadable at
//! once, while the ciphertext, and with it the audit chain, stays as it was.
//!
//! The payment token is not sealed but kept out entirely: the write side stores it in a
//! short-lived table and the event carries a [`PaymentRef`] the payment participant resolves
//! once.
//!
//! This module holds only the data shapes (the domain does no cryptography): a box names the
//! key that sealed it, the nonce and the ciphertext, base64. [`Protected::Clear`] and
//! [`Payment::LegacyToken`] exist only for events written before sealing, which the upcaster
//! (`wire`) reads as they are; nothing writes them any more.

use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::values::PaymentToken;

/// A value encrypted with a customer's data key: what events, messages and saga state carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The data key that sealed it (`customer_keys.key_id`); gone once the customer is
    /// forgotten.
    pub key_id: Uuid,
    /// 96-bit AES-GCM nonce, base64.
    pub nonce: String,
    /// Ciphertext with its 128-bit tag, base64.
    pub ciphertext: String,
}

/// A personal value in an event: sealed (everything written now) or clear (events written
/// before sealing, read through the upcaster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protected<T> {
    Sealed(Sealed),
    Clear(T),
}

/// Accepts `{"sealed": ..}`, `{"clear": ..}` and, from saga state and messages recorded before
/// sealing, the bare value.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for Protected<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case", deny_unknown_fields)]
        enum Tagged<T> {
            Sealed(Sealed),
            Clear(T),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr<T> {
            Tagged(Tagged<T>),
            Bare(T),
        }
        Ok(match Repr::deserialize(d)? {
            Repr::Tagged(Tagged::Sealed(s)) => Protected::Sealed(s),
            Repr::Tagged(Tagged::Clear(t)) | Repr::Bare(t) => Protected::Clear(t),
        })
    }
}

/// The reference to a payment token held by the write side (`payment_tokens`), resolved
/// once by the payment participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PaymentRef(pub Uuid);

/// How the payment participant finds the payment method of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Payment {
    /// Everything written now: a reference to the write side's short-lived token row.
    Ref(PaymentRef),
    /// Events written before sealing carried the token itself.
    LegacyToken(PaymentToken),
}

/// Accepts `{"ref": ..}`, `{"legacy_token": ..}` and, from saga state and messages recorded
/// before sealing (field `payment_token`), the bare token.
impl<'de> Deserialize<'de> for Payment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case", deny_unknown_fields)]
        enum Tagged {
            Ref(PaymentRef),
            LegacyToken(PaymentToken),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Tagged(Tagged),
            Bare(PaymentToken),
        }
        Ok(match Repr::deserialize(d)? {
            Repr::Tagged(Tagged::Ref(r)) => Payment::Ref(r),
            Repr::Tagged(Tagged::LegacyToken(t)) | Repr::Bare(t) => Payment::LegacyToken(t),
        })
    }
}

/// The associated data an order's shipping address is sealed under: a box opens only in the
/// order it was written for.
pub fn shipping_address_context(order_id: crate::values::OrderId) -> String {
    format!("order:{}:shipping_address", order_id.0)
}

/// The associated data an order's payment token is sealed under (in `payment_tokens`).
pub fn payment_token_context(order_id: crate::values::OrderId) -> String {
    format!("order:{}:payment_token", order_id.0)
}

/// What a reader shows for a sealed value whose key is gone.
pub const ERASED: &str = "erased";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::ShippingAddress;
    use serde_json::json;

    fn sealed() -> Sealed {
        Sealed {
            key_id: Uuid::nil(),
            nonce: "bm9uY2U=".into(),
            ciphertext: "Y2lwaGVy".into(),
        }
    }

    #[test]
    fn protected_values_round_trip_tagged_and_read_legacy_bare_values() {
        let p: Protected<ShippingAddress> = Protected::Sealed(sealed());
        let v = serde_json::to_value(&p).unwrap();
        assert!(v.get("sealed").is_some(), "{v}");
        assert_eq!(
            serde_json::from_value::<Protected<ShippingAddress>>(v).unwrap(),
            p
        );

        let addr =
            json!({"name": "A", "line1": "B", "city": "C", "postal_code": "D", "country": "DE"});
        let clear: Protected<ShippingAddress> =
            serde_json::from_value(json!({"clear": addr.clone()})).unwrap();
        let bare: Protected<ShippingAddress> = serde_json::from_value(addr).unwrap();
        assert_eq!(clear, bare);
        assert!(matches!(bare, Protected::Clear(ref a) if a.line1 == "B"));
        assert!(serde_json::from_value::<Protected<ShippingAddress>>(json!({"x": 1})).is_err());
    }

    #[test]
    fn payments_round_trip_tagged_and_read_legacy_bare_tokens() {
        let r = Payment::Ref(PaymentRef(Uuid::now_v7()));
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("ref").is_some(), "{v}");
        assert_eq!(serde_json::from_value::<Payment>(v).unwrap(), r);
        let legacy: Payment = serde_json::from_value(json!("tok_visa")).unwrap();
        assert_eq!(
            legacy,
            Payment::LegacyToken(PaymentToken::parse("tok_visa").unwrap())
        );
        let tagged: Payment = serde_json::from_value(json!({"legacy_token": "tok_visa"})).unwrap();
        assert_eq!(tagged, legacy);
    }
}
