//! Request bodies as they arrive, and their conversion into domain commands.
//!
//! Unknown fields are refused (a typo like `quantiy` must not be silently ignored). Every
//! conversion error names the JSON path of the offending field, e.g. `items[2].quantity`.

use domain::{
    order::{NewLine, PlaceOrder},
    values::{
        Currency, CustomerId, MinorUnits, OrderId, PaymentToken, Quantity, ShippingAddress, Sku,
        ValueError,
    },
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    pub currency: String,
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
    pub unit_price_minor: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressDto {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub reason: String,
}

impl CheckoutRequest {
    /// The domain command for this request, for `customer` and the new order id.
    pub fn into_command(
        self,
        order_id: OrderId,
        customer: CustomerId,
    ) -> Result<PlaceOrder, ValueError> {
        let currency = Currency::parse(&self.currency)?;
        let lines = self
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let at = format!("items[{i}].");
                Ok(NewLine {
                    sku: Sku::parse(&it.sku).map_err(|e| e.within(&at))?,
                    quantity: Quantity::parse(it.quantity).map_err(|e| e.within(&at))?,
                    unit_price_minor: MinorUnits::parse(it.unit_price_minor)
                        .map_err(|e| e.within(&at))?,
                })
            })
            .collect::<Result<Vec<_>, ValueError>>()?;
        let a = &self.shipping_address;
        let shipping_address =
            ShippingAddress::parse(&a.name, &a.line1, &a.city, &a.postal_code, &a.country)?;
        let payment_token = PaymentToken::parse(&self.payment_token)?;
        Ok(PlaceOrder {
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

    fn request(items: serde_json::Value) -> CheckoutRequest {
        serde_json::from_value(serde_json::json!({
            "currency": "EUR",
            "items": items,
            "shipping_address": {"name": "A", "line1": "B", "city": "C", "postal_code": "D", "country": "DE"},
            "payment_token": "tok_visa",
        }))
        .unwrap()
    }

    fn place(items: serde_json::Value) -> Result<PlaceOrder, ValueError> {
        request(items).into_command(
            OrderId(uuid::Uuid::now_v7()),
            CustomerId::parse("c-1").unwrap(),
        )
    }

    #[test]
    fn a_valid_request_becomes_the_command() {
        let cmd = place(serde_json::json!([
            {"sku": "SKU-1", "quantity": 2, "unit_price_minor": 500}
        ]))
        .unwrap();
        assert_eq!(cmd.lines.len(), 1);
        assert_eq!(cmd.currency.as_str(), "EUR");
    }

    #[test]
    fn an_error_names_the_json_path_of_the_field() {
        let e = place(serde_json::json!([
            {"sku": "SKU-1", "quantity": 1, "unit_price_minor": 500},
            {"sku": "SKU-2", "quantity": 0, "unit_price_minor": 500}
        ]))
        .unwrap_err();
        assert_eq!(e.field, "items[1].quantity");
        let e = place(serde_json::json!([
            {"sku": "", "quantity": 1, "unit_price_minor": 500}
        ]))
        .unwrap_err();
        assert_eq!(e.field, "items[0].sku");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<CheckoutRequest, _> = serde_json::from_value(serde_json::json!({
            "currency": "EUR", "items": [], "payment_token": "t", "quantiy": 1,
            "shipping_address": {"name": "A", "line1": "B", "city": "C", "postal_code": "D", "country": "DE"},
        }));
        assert!(r.unwrap_err().to_string().contains("quantiy"));
    }
}
