//! The emails' text, rendered from templates compiled into the binary
//! (`notifications/templates/*.txt`, minijinja), with the order's lines and totals.
//!
//! Plain text only: nothing a customer typed (her name, a cancellation reason) can become
//! markup, and the subject carries only the order id.

use domain::order::{OrderCancelled, OrderPlaced};
use minijinja::{Environment, context};
use serde::Serialize;

/// Which email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    OrderConfirmed,
    OrderCancelled,
}

impl Kind {
    /// As stored in `email_inbox.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OrderConfirmed => "order_confirmed",
            Kind::OrderCancelled => "order_cancelled",
        }
    }
}

/// A rendered email: subject and text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
}

#[derive(Serialize)]
struct Line {
    sku: String,
    quantity: i64,
    unit_price: String,
    line_total: String,
}

/// Minor units as a decimal amount with two places (`1250` → `12.50`).
fn money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    format!("{sign}{}.{:02}", m / 100, m % 100)
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.add_template(
        "order_confirmed",
        include_str!("../templates/order_confirmed.txt"),
    )
    .expect("the confirmation template parses");
    env.add_template(
        "order_cancelled",
        include_str!("../templates/order_cancelled.txt"),
    )
    .expect("the cancellation template parses");
    env
}

/// The email of `kind` for `order`, addressed to `name`.
pub fn render(
    kind: Kind,
    name: &str,
    order: &OrderPlaced,
    cancelled: Option<&OrderCancelled>,
) -> Result<Rendered, minijinja::Error> {
    let lines: Vec<Line> = order
        .lines
        .iter()
        .map(|l| Line {
            sku: l.sku.as_str().to_owned(),
            quantity: l.quantity.get(),
            unit_price: money(l.unit_price_minor.get()),
            line_total: money(l.line_total_minor.get()),
        })
        .collect();
    let order_id = order.order_id.0.to_string();
    let body = environment()
        .get_template(kind.as_str())?
        .render(context! {
            name,
            order_id => order_id.clone(),
            lines => minijinja::value::Value::from(minijinja::value::Serde(&lines)),
            currency => order.currency.as_str(),
            total => money(order.total_minor.get()),
            reason => cancelled.map(|c| c.reason.as_str().to_owned()),
        })?;
    let subject = match kind {
        Kind::OrderConfirmed => format!("Your order {order_id} is confirmed"),
        Kind::OrderCancelled => format!("Your order {order_id} was cancelled"),
    };
    Ok(Rendered { subject, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_has_two_places() {
        assert_eq!(money(1250), "12.50");
        assert_eq!(money(5), "0.05");
        assert_eq!(money(-499), "-4.99");
    }
}
