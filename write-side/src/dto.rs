//! Request bodies as they arrive, and their conversion into domain commands.
//!
//! Unknown fields are refused (a typo like `quantiy` must not be silently ignored, and a
//! `unit_price_minor` is not the client's to send: prices come from the catalog). Every
//! conversion error names the JSON path of the offending field, e.g. `items[2].quantity`.

use std::collections::HashMap;

use domain::{
    order::NewLine,
    values::{
        Currency, CustomerId, OrderId, PaymentToken, Quantity, ShippingAddress, Sku, ValueError,
    },
};
use serde::Deserialize;

use crate::catalog::Product;

/// A validated checkout, before its personal data is sealed and its token held
/// (`commands::checkout` turns it into a `PlaceOrder`). Never logged: `Debug` shows no
/// address and the token's own `Debug` is redacted.
#[derive(Clone)]
pub struct Checkout {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub lines: Vec<NewLine>,
    pub shipping_address: ShippingAddress,
    pub payment_token: PaymentToken,
}

impl std::fmt::Debug for Checkout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkout")
            .field("order_id", &self.order_id)
            .field("customer_id", &self.customer_id)
            .field("lines", &self.lines.len())
            .finish_non_exhaustive()
    }
}

/// `Debug` shows neither the address nor the token (personal data never reaches a log).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// The currency the client expects to pay in; refused if the catalog prices differ.
    #[serde(default)]
    pub currency: Option<String>,
    pub items: Vec<ItemDto>,
    pub shipping_address: AddressDto,
    pub payment_token: String,
    /// Only operators may place an order on a customer's behalf.
    #[serde(default)]
    pub customer_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemDto {
    pub sku: String,
    pub quantity: i64,
}

impl std::fmt::Debug for CheckoutRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckoutRequest")
            .field("currency", &self.currency)
            .field("items", &self.items)
            .field("customer_id", &self.customer_id)
            .finish_non_exhaustive()
    }
}

/// `Debug` is redacted: an address is personal data.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressDto {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

impl std::fmt::Debug for AddressDto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressDto(<redacted>)")
    }
}

impl AddressDto {
    pub fn parse(&self) -> Result<ShippingAddress, ValueError> {
        ShippingAddress::parse(
            &self.name,
            &self.line1,
            &self.city,
            &self.postal_code,
            &self.country,
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub reason: String,
}

impl CheckoutRequest {
    /// The products the request names, validated, in line order.
    pub fn skus(&self) -> Result<Vec<Sku>, ValueError> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, it)| Sku::parse(&it.sku).map_err(|e| e.within(&format!("items[{i}]."))))
            .collect()
    }

    /// The domain command for this request, for `customer` and the new order id, priced
    /// from `catalog` (the active products among the request's; see [`crate::catalog`]).
    pub fn command(
        &self,
        order_id: OrderId,
        customer: CustomerId,
        catalog: &HashMap<Sku, Product>,
    ) -> Result<Checkout, ValueError> {
        let mut currency: Option<Currency> = None;
        let lines = self
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let at = format!("items[{i}].");
                let sku = Sku::parse(&it.sku).map_err(|e| e.within(&at))?;
                let product = catalog.get(&sku).ok_or_else(|| {
                    ValueError::new("sku", format!("{} is not for sale", sku.as_str())).within(&at)
                })?;
                match currency {
                    None => currency = Some(product.currency),
                    Some(c) if c != product.currency => {
                        return Err(ValueError::new(
                            "sku",
                            format!(
                                "{} is priced in {}, the order's other lines in {}",
                                sku.as_str(),
                                product.currency.as_str(),
                                c.as_str()
                            ),
                        )
                        .within(&at));
                    }
                    Some(_) => {}
                }
                Ok(NewLine {
                    sku,
                    quantity: Quantity::parse(it.quantity).map_err(|e| e.within(&at))?,
                    unit_price_minor: product.price_minor,
                })
            })
            .collect::<Result<Vec<_>, ValueError>>()?;
        let currency = match (currency, self.currency.as_deref()) {
            (None, _) => return Err(ValueError::new("items", "an order needs at least one line")),
            (Some(c), Some(expected)) if c.as_str() != expected => {
                return Err(ValueError::new(
                    "currency",
                    format!("the catalog prices these items in {}", c.as_str()),
                ));
            }
            (Some(c), _) => c,
        };
        let shipping_address = self.shipping_address.parse()?;
        let payment_token = PaymentToken::parse(&self.payment_token)?;
        Ok(Checkout {
            order_id,
            customer_id: customer,
            currency,
            lines,
            shipping_address,
            payment_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(currency: &str, items: serde_json::Value) -> CheckoutRequest {
        serde_json::from_value(serde_json::json!({
            "currency": currency,
            "items": items,
            "shipping_address": {"name": "A", "line1": "B", "city": "C", "postal_code": "D", "country": "DE"},
            "payment_token": "tok_visa",
        }))
        .unwrap()
    }

    fn catalog() -> HashMap<Sku, Product> {
        [
            ("SKU-1", 1250, "EUR"),
            ("SKU-2", 499, "EUR"),
            ("SKU-9", 700, "USD"),
        ]
        .into_iter()
        .map(|(sku, price, cur)| {
            let p = Product::parse(sku, "a product", price, cur, true).unwrap();
            (p.sku.clone(), p)
        })
        .collect()
    }

    fn place(currency: &str, items: serde_json::Value) -> Result<Checkout, ValueError> {
        request(currency, items).command(
            OrderId(uuid::Uuid::now_v7()),
            CustomerId::parse("c-1").unwrap(),
            &catalog(),
        )
    }

    #[test]
    fn a_request_is_priced_from_the_catalog() {
        let cmd = place(
            "EUR",
            serde_json::json!([{"sku": "SKU-1", "quantity": 2}, {"sku": "SKU-2", "quantity": 1}]),
        )
        .unwrap();
        let prices: Vec<i64> = cmd.lines.iter().map(|l| l.unit_price_minor.get()).collect();
        assert_eq!(prices, [1250, 499]);
        assert_eq!(cmd.currency.as_str(), "EUR");
    }

    #[test]
    fn an_error_names_the_json_path_of_the_field() {
        let e = place(
            "EUR",
            serde_json::json!([{"sku": "SKU-1", "quantity": 1}, {"sku": "SKU-2", "quantity": 0}]),
        )
        .unwrap_err();
        assert_eq!(e.field, "items[1].quantity");
        let e = place("EUR", serde_json::json!([{"sku": "", "quantity": 1}])).unwrap_err();
        assert_eq!(e.field, "items[0].sku");
        let e = place("EUR", serde_json::json!([{"sku": "NOPE", "quantity": 1}])).unwrap_err();
        assert_eq!(e.field, "items[0].sku");
    }

    #[test]
    fn currencies_must_agree_with_the_catalog() {
        let e = place(
            "EUR",
            serde_json::json!([{"sku": "SKU-1", "quantity": 1}, {"sku": "SKU-9", "quantity": 1}]),
        )
        .unwrap_err();
        assert_eq!(e.field, "items[1].sku");
        let e = place("USD", serde_json::json!([{"sku": "SKU-1", "quantity": 1}])).unwrap_err();
        assert_eq!(e.field, "currency");
    }

    #[test]
    fn unknown_fields_and_client_prices_are_refused() {
        for body in [
            serde_json::json!({
                "currency": "EUR", "items": [], "payment_token": "t", "quantiy": 1,
                "shipping_address": {"name": "A", "line1": "B", "city": "C", "postal_code": "D", "country": "DE"},
            }),
            serde_json::json!({
                "currency": "EUR", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price_minor": 0}],
                "payment_token": "t",
                "shipping_address": {"name": "A", "line1": "B", "city": "C", "postal_code": "D", "country": "DE"},
            }),
        ] {
            let r: Result<CheckoutRequest, _> = serde_json::from_value(body);
            assert!(r.unwrap_err().to_string().contains("unknown field"));
        }
    }
}
