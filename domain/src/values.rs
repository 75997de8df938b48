//! Value types parsed at the edge ("parse, don't validate").
//!
//! Each `parse` returns a [`ValueError`] that names the field and what was expected; the HTTP
//! layer turns it into a 422 with that message. Once a value exists it is valid, so the
//! aggregate never re-checks formats, only business rules.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValueError {
    pub field: String,
    pub message: String,
}

impl ValueError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error with its field path put under `prefix` (e.g. `items[3].`).
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}{}", self.field);
        self
    }
}

/// An order's identity: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl OrderId {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        Uuid::parse_str(s)
            .map(OrderId)
            .map_err(|_| ValueError::new("order_id", format!("`{s}` is not a UUID")))
    }
}

impl std::fmt::Display for OrderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Who places orders: the `sub` of the customer's token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CustomerId(String);

impl CustomerId {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let ok = (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValueError::new(
                "customer_id",
                "must be 1 to 64 characters of letters, digits and - _ . : @",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An ISO 4217 currency code (three upper-case letters) from the list this shop accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

/// The ISO 4217 codes accepted; all use two minor-unit digits except those noted in readers.
const CURRENCIES: &[&str] = &[
    "AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "HUF", "INR", "JPY",
    "KRW", "MXN", "NOK", "NZD", "PLN", "SEK", "SGD", "USD", "ZAR",
];

impl Currency {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        if CURRENCIES.contains(&s) {
            let b = s.as_bytes();
            Ok(Self([b[0], b[1], b[2]]))
        } else {
            Err(ValueError::new(
                "currency",
                format!(
                    "`{s}` is not a supported ISO 4217 code (one of {})",
                    CURRENCIES.join(", ")
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }
}

impl TryFrom<String> for Currency {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        Self::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

/// A stock-keeping unit: 1 to 64 characters of letters, digits, `-`, `_` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let ok = (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValueError::new(
                "sku",
                "must be 1 to 64 characters of letters, digits, - _ .",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        Self::parse(&s)
    }
}

impl From<Sku> for String {
    fn from(s: Sku) -> String {
        s.0
    }
}

/// How many units of one SKU a line orders: 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Quantity(u16);

impl Quantity {
    pub const MAX: i64 = 1000;

    pub fn parse(n: i64) -> Result<Self, ValueError> {
        if (1..=Self::MAX).contains(&n) {
            Ok(Self(n as u16))
        } else {
            Err(ValueError::new(
                "quantity",
                format!("must be between 1 and {}, got {n}", Self::MAX),
            ))
        }
    }

    pub fn get(self) -> i64 {
        i64::from(self.0)
    }
}

impl TryFrom<i64> for Quantity {
    type Error = ValueError;
    fn try_from(n: i64) -> Result<Self, ValueError> {
        Self::parse(n)
    }
}

impl From<Quantity> for i64 {
    fn from(q: Quantity) -> i64 {
        q.get()
    }
}

/// A non-negative amount in the currency's minor unit (cents). Never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct MinorUnits(i64);

impl MinorUnits {
    pub const ZERO: Self = Self(0);

    pub fn parse(n: i64) -> Result<Self, ValueError> {
        if n >= 0 {
            Ok(Self(n))
        } else {
            Err(ValueError::new(
                "unit_price_minor",
                format!("must not be negative, got {n}"),
            ))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// `self * quantity`, or `None` when it does not fit in an i64.
    pub fn checked_times(self, q: Quantity) -> Option<Self> {
        self.0.checked_mul(q.get()).map(Self)
    }

    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }
}

impl TryFrom<i64> for MinorUnits {
    type Error = ValueError;
    fn try_from(n: i64) -> Result<Self, ValueError> {
        Self::parse(n)
    }
}

impl From<MinorUnits> for i64 {
    fn from(m: MinorUnits) -> i64 {
        m.0
    }
}

/// A shipping address. Every part is required; `country` is an ISO 3166-1 alpha-2 code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippingAddress {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

impl ShippingAddress {
    pub fn parse(
        name: &str,
        line1: &str,
        city: &str,
        postal_code: &str,
        country: &str,
    ) -> Result<Self, ValueError> {
        fn text(field: &str, v: &str, max: usize) -> Result<String, ValueError> {
            let t = v.trim();
            if t.is_empty() || t.chars().count() > max || t.chars().any(char::is_control) {
                Err(ValueError::new(
                    format!("shipping_address.{field}"),
                    format!("must be 1 to {max} printable characters"),
                ))
            } else {
                Ok(t.to_owned())
            }
        }
        let country_ok = country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase());
        if !country_ok {
            return Err(ValueError::new(
                "shipping_address.country",
                "must be an ISO 3166-1 alpha-2 code such as DE or US",
            ));
        }
        Ok(Self {
            name: text("name", name, 200)?,
            line1: text("line1", line1, 200)?,
            city: text("city", city, 100)?,
            postal_code: text("postal_code", postal_code, 20)?,
            country: country.to_owned(),
        })
    }
}

/// An email address as the shop accepts it: 3 to 254 ASCII characters, one `@` with a non-empty
/// local part and a dotted domain, no spaces, quotes, angle brackets or control characters
/// (so it cannot smuggle a header or a second recipient into a message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let bad = || ValueError::new("email", "must be an address like name@example.com");
        // ASCII only: an internationalised address needs SMTPUTF8, which not every relay
        // offers, and one unsendable address must not stall the email group.
        if !(3..=254).contains(&s.len())
            || !s.is_ascii()
            || s.chars()
                .any(|c| c.is_control() || c.is_whitespace() || "<>\",;:()[]\\".contains(c))
        {
            return Err(bad());
        }
        let (local, domain) = s.split_once('@').ok_or_else(bad)?;
        let labels_ok = domain.split('.').count() >= 2
            && domain
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if local.is_empty() || local.len() > 64 || domain.contains('@') || !labels_ok {
            return Err(bad());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        Self::parse(&s)
    }
}

impl From<EmailAddress> for String {
    fn from(e: EmailAddress) -> String {
        e.0
    }
}

/// An opaque payment-method token from the payment provider (never card data). It never
/// enters an event, a message or a log: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PaymentToken(String);

impl std::fmt::Debug for PaymentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaymentToken(<redacted>)")
    }
}

impl PaymentToken {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let ok = (1..=128).contains(&s.len()) && s.chars().all(|c| c.is_ascii_graphic());
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValueError::new(
                "payment_token",
                "must be 1 to 128 visible ASCII characters",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A free-text reason (cancellation, failure), 1 to 500 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Reason(String);

impl Reason {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        if t.is_empty() || t.chars().count() > 500 || t.chars().any(char::is_control) {
            Err(ValueError::new(
                "reason",
                "must be 1 to 500 characters, no control characters",
            ))
        } else {
            Ok(Self(t.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_addresses_are_plain_and_cannot_carry_headers_or_more_recipients() {
        for ok in ["ada@example.com", "a.b+shop@mail.example.co.uk", "x@y.de"] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "ada@@example.com",
            "ada@example.com\r\nBcc: eve@example.com",
            "ada@example.com, eve@example.com",
            "Ada <ada@example.com>",
            "ada @example.com",
            "ada@exa_mple.com",
            "ada@.com",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn free_text_refuses_control_characters() {
        assert!(Reason::parse("changed my mind").is_ok());
        for bad in ["a\0b", "line\nbreak", "\u{1b}[31mred"] {
            assert!(Reason::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quantity_bounds() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(1).is_ok());
        assert!(Quantity::parse(1000).is_ok());
        assert!(Quantity::parse(1001).is_err());
        assert!(Quantity::parse(-5).is_err());
    }

    #[test]
    fn currency_is_a_known_iso_code() {
        assert_eq!(Currency::parse("EUR").unwrap().as_str(), "EUR");
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("XXX").is_err());
        assert!(Currency::parse("EURO").is_err());
    }

    #[test]
    fn money_arithmetic_is_checked() {
        let p = MinorUnits::parse(i64::MAX / 2).unwrap();
        assert!(p.checked_times(Quantity::parse(3).unwrap()).is_none());
        assert!(p.checked_add(p).is_some());
        assert!(
            p.checked_add(p)
                .unwrap()
                .checked_add(MinorUnits::parse(2).unwrap())
                .is_none()
        );
        assert!(MinorUnits::parse(-1).is_err());
    }

    #[test]
    fn address_and_names() {
        assert!(ShippingAddress::parse("A", "B", "C", "D", "DE").is_ok());
        let e = ShippingAddress::parse("A", " ", "C", "D", "DE").unwrap_err();
        assert_eq!(e.field, "shipping_address.line1");
        assert!(ShippingAddress::parse("A", "B", "C", "D", "Germany").is_err());
        assert!(Sku::parse("SKU-1").is_ok());
        assert!(Sku::parse("has space").is_err());
        assert!(CustomerId::parse("").is_err());
        assert!(PaymentToken::parse("tok_visa").is_ok());
    }
}
