//! The order aggregate: `decide(&Order, OrderCommand) -> Result<Vec<OrderEvent>, OrderRejected>`
//! and `evolve(Order, &OrderEvent) -> Order`.
//!
//! Lifecycle: PENDING -> INVENTORY_RESERVED -> PAYMENT_AUTHORIZED -> CONFIRMED, and CANCELLED
//! from any state before CONFIRMED. The saga drives the forward steps; customers and operators
//! may cancel. Repeating a forward step the order has already taken is a no-op (no events),
//! so a redelivered saga command changes nothing.

use serde::{Deserialize, Serialize};

use crate::{
    personal::{Payment, PaymentRef, Protected, Sealed},
    values::{Currency, CustomerId, MinorUnits, OrderId, Quantity, Reason, ShippingAddress, Sku},
};

/// Most lines one order may have.
pub const MAX_LINES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    InventoryReserved,
    PaymentAuthorized,
    Confirmed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::InventoryReserved => "INVENTORY_RESERVED",
            Self::PaymentAuthorized => "PAYMENT_AUTHORIZED",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }

    fn rank(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::InventoryReserved => 1,
            Self::PaymentAuthorized => 2,
            Self::Confirmed => 3,
            Self::Cancelled => 4,
        }
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who cancelled an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelledBy {
    Customer,
    Operator,
    /// The checkout saga, after a failed step.
    System,
}

/// A line as requested: the total is computed by the aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLine {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price_minor: MinorUnits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOrder {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub lines: Vec<NewLine>,
    /// Sealed by the write side with the customer's data key (`crate::personal`).
    pub shipping_address: Sealed,
    /// The write side keeps the token itself; the event carries only this reference.
    pub payment_ref: PaymentRef,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    Place(PlaceOrder),
    MarkInventoryReserved { reservation_id: String },
    MarkPaymentAuthorized { authorization_id: String },
    Confirm { shipment_id: String },
    Cancel { reason: Reason, by: CancelledBy },
}

/// A placed line with its total (quantity x unit price), so readers never recompute money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price_minor: MinorUnits,
    pub line_total_minor: MinorUnits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub lines: Vec<OrderLine>,
    pub total_minor: MinorUnits,
    pub shipping_address: Protected<ShippingAddress>,
    pub payment: Payment,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    pub order_id: OrderId,
    pub reservation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub order_id: OrderId,
    pub authorization_id: String,
    pub amount_minor: MinorUnits,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: OrderId,
    pub shipment_id: String,
    pub total_minor: MinorUnits,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: OrderId,
    pub reason: Reason,
    pub cancelled_by: CancelledBy,
    pub previous_status: OrderStatus,
}

/// Everything that can happen to an order, past tense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Placed(OrderPlaced),
    InventoryReserved(InventoryReserved),
    PaymentAuthorized(PaymentAuthorized),
    Confirmed(OrderConfirmed),
    Cancelled(OrderCancelled),
}

/// Why a command was refused. A rejection is not a failure: nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderRejected {
    #[error("the order already exists")]
    AlreadyPlaced,
    #[error("the order does not exist")]
    NotFound,
    #[error("an order needs at least one line")]
    NoLines,
    #[error("an order may have at most {MAX_LINES} lines, got {0}")]
    TooManyLines(usize),
    #[error("sku {0} appears on more than one line; put the whole quantity on one line")]
    DuplicateSku(String),
    #[error("the order total does not fit in 64-bit minor units")]
    TotalOverflow,
    #[error("the order is {0} and can no longer be cancelled")]
    NotCancellable(OrderStatus),
    #[error("cannot {command} an order that is {status}")]
    InvalidTransition {
        command: &'static str,
        status: OrderStatus,
    },
}

/// The state the aggregate needs to decide: folded from the order's events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    NotPlaced,
    Placed(PlacedOrder),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedOrder {
    pub id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub total_minor: MinorUnits,
    pub status: OrderStatus,
}

impl Order {
    pub fn status(&self) -> Option<OrderStatus> {
        match self {
            Order::NotPlaced => None,
            Order::Placed(o) => Some(o.status),
        }
    }

    pub fn customer_id(&self) -> Option<&CustomerId> {
        match self {
            Order::NotPlaced => None,
            Order::Placed(o) => Some(&o.customer_id),
        }
    }
}

/// Folds a history into the current state.
pub fn replay<'a>(events: impl IntoIterator<Item = &'a OrderEvent>) -> Order {
    events.into_iter().fold(Order::NotPlaced, evolve)
}

pub fn evolve(state: Order, event: &OrderEvent) -> Order {
    match (state, event) {
        (Order::NotPlaced, OrderEvent::Placed(e)) => Order::Placed(PlacedOrder {
            id: e.order_id,
            customer_id: e.customer_id.clone(),
            currency: e.currency,
            total_minor: e.total_minor,
            status: OrderStatus::Pending,
        }),
        (Order::Placed(mut o), e) => {
            o.status = match e {
                OrderEvent::Placed(_) => o.status,
                OrderEvent::InventoryReserved(_) => OrderStatus::InventoryReserved,
                OrderEvent::PaymentAuthorized(_) => OrderStatus::PaymentAuthorized,
                OrderEvent::Confirmed(_) => OrderStatus::Confirmed,
                OrderEvent::Cancelled(_) => OrderStatus::Cancelled,
            };
            Order::Placed(o)
        }
        // An event for an order that was never placed cannot come from `decide`; ignore it
        // rather than invent state.
        (state @ Order::NotPlaced, _) => state,
    }
}

pub fn decide(state: &Order, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderRejected> {
    match (state, command) {
        (Order::NotPlaced, OrderCommand::Place(cmd)) => place(cmd),
        (Order::Placed(_), OrderCommand::Place(_)) => Err(OrderRejected::AlreadyPlaced),
        (Order::NotPlaced, _) => Err(OrderRejected::NotFound),
        (Order::Placed(o), OrderCommand::Cancel { reason, by }) => match o.status {
            OrderStatus::Confirmed | OrderStatus::Cancelled => {
                Err(OrderRejected::NotCancellable(o.status))
            }
            previous_status => Ok(vec![OrderEvent::Cancelled(OrderCancelled {
                order_id: o.id,
                reason,
                cancelled_by: by,
                previous_status,
            })]),
        },
        (Order::Placed(o), OrderCommand::MarkInventoryReserved { reservation_id }) => step(
            o,
            OrderStatus::InventoryReserved,
            "mark inventory reserved for",
            || {
                OrderEvent::InventoryReserved(InventoryReserved {
                    order_id: o.id,
                    reservation_id,
                })
            },
        ),
        (Order::Placed(o), OrderCommand::MarkPaymentAuthorized { authorization_id }) => step(
            o,
            OrderStatus::PaymentAuthorized,
            "mark payment authorized for",
            || {
                OrderEvent::PaymentAuthorized(PaymentAuthorized {
                    order_id: o.id,
                    authorization_id,
                    amount_minor: o.total_minor,
                    currency: o.currency,
                })
            },
        ),
        (Order::Placed(o), OrderCommand::Confirm { shipment_id }) => {
            step(o, OrderStatus::Confirmed, "confirm", || {
                OrderEvent::Confirmed(OrderConfirmed {
                    order_id: o.id,
                    shipment_id,
                    total_minor: o.total_minor,
                    currency: o.currency,
                })
            })
        }
    }
}

/// A forward step to `target`: allowed from the status just before it, a no-op when the
/// order is already there or further along, rejected when cancelled or out of order.
fn step(
    o: &PlacedOrder,
    target: OrderStatus,
    command: &'static str,
    event: impl FnOnce() -> OrderEvent,
) -> Result<Vec<OrderEvent>, OrderRejected> {
    if o.status == OrderStatus::Cancelled {
        return Err(OrderRejected::InvalidTransition {
            command,
            status: o.status,
        });
    }
    if o.status.rank() >= target.rank() {
        return Ok(Vec::new());
    }
    if o.status.rank() + 1 != target.rank() {
        return Err(OrderRejected::InvalidTransition {
            command,
            status: o.status,
        });
    }
    Ok(vec![event()])
}

fn place(cmd: PlaceOrder) -> Result<Vec<OrderEvent>, OrderRejected> {
    if cmd.lines.is_empty() {
        return Err(OrderRejected::NoLines);
    }
    if cmd.lines.len() > MAX_LINES {
        return Err(OrderRejected::TooManyLines(cmd.lines.len()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut total = MinorUnits::ZERO;
    let mut lines = Vec::with_capacity(cmd.lines.len());
    for l in cmd.lines {
        if !seen.insert(l.sku.clone()) {
            return Err(OrderRejected::DuplicateSku(l.sku.as_str().to_owned()));
        }
        let line_total = l
            .unit_price_minor
            .checked_times(l.quantity)
            .ok_or(OrderRejected::TotalOverflow)?;
        total = total
            .checked_add(line_total)
            .ok_or(OrderRejected::TotalOverflow)?;
        lines.push(OrderLine {
            sku: l.sku,
            quantity: l.quantity,
            unit_price_minor: l.unit_price_minor,
            line_total_minor: line_total,
        });
    }
    Ok(vec![OrderEvent::Placed(OrderPlaced {
        order_id: cmd.order_id,
        customer_id: cmd.customer_id,
        currency: cmd.currency,
        lines,
        total_minor: total,
        shipping_address: Protected::Sealed(cmd.shipping_address),
        payment: Payment::Ref(cmd.payment_ref),
    })])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn line(sku: &str, qty: i64, price: i64) -> NewLine {
        NewLine {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::parse(qty).unwrap(),
            unit_price_minor: MinorUnits::parse(price).unwrap(),
        }
    }

    pub fn place_cmd(lines: Vec<NewLine>) -> PlaceOrder {
        PlaceOrder {
            order_id: OrderId(uuid::Uuid::now_v7()),
            customer_id: CustomerId::parse("cust-1").unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            lines,
            shipping_address: Sealed {
                key_id: uuid::Uuid::nil(),
                nonce: "AAAAAAAAAAAAAAAA".into(),
                ciphertext: "c2VhbGVkIGFkZHJlc3MgYnl0ZXMgaGVyZQ==".into(),
            },
            payment_ref: PaymentRef(uuid::Uuid::nil()),
        }
    }

    /// given `history`, when `command`, then the result.
    fn given(
        history: &[OrderEvent],
        command: OrderCommand,
    ) -> Result<Vec<OrderEvent>, OrderRejected> {
        decide(&replay(history), command)
    }

    fn placed() -> Vec<OrderEvent> {
        decide(
            &Order::NotPlaced,
            OrderCommand::Place(place_cmd(vec![line("A", 2, 150), line("B", 1, 1000)])),
        )
        .unwrap()
    }

    fn cancel(by: CancelledBy) -> OrderCommand {
        OrderCommand::Cancel {
            reason: Reason::parse("changed my mind").unwrap(),
            by,
        }
    }

    fn then_status(history: &[OrderEvent], cmd: OrderCommand) -> OrderStatus {
        let mut h = history.to_vec();
        h.extend(given(history, cmd).unwrap());
        replay(&h).status().unwrap()
    }

    #[test]
    fn placing_computes_line_and_order_totals() {
        let events = placed();
        let OrderEvent::Placed(p) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(p.lines[0].line_total_minor.get(), 300);
        assert_eq!(p.total_minor.get(), 1300);
        assert_eq!(replay(&events).status(), Some(OrderStatus::Pending));
    }

    #[test]
    fn placing_rejects_bad_orders() {
        let none = place_cmd(vec![]);
        assert_eq!(
            decide(&Order::NotPlaced, OrderCommand::Place(none)),
            Err(OrderRejected::NoLines)
        );
        let many = place_cmd((0..101).map(|i| line(&format!("S{i}"), 1, 1)).collect());
        assert_eq!(
            decide(&Order::NotPlaced, OrderCommand::Place(many)),
            Err(OrderRejected::TooManyLines(101))
        );
        let dup = place_cmd(vec![line("A", 1, 1), line("A", 2, 1)]);
        assert_eq!(
            decide(&Order::NotPlaced, OrderCommand::Place(dup)),
            Err(OrderRejected::DuplicateSku("A".into()))
        );
        let huge = place_cmd(vec![line("A", 1000, i64::MAX / 999)]);
        assert_eq!(
            decide(&Order::NotPlaced, OrderCommand::Place(huge)),
            Err(OrderRejected::TotalOverflow)
        );
        let sum_overflow = place_cmd(vec![line("A", 1, i64::MAX), line("B", 1, 1)]);
        assert_eq!(
            decide(&Order::NotPlaced, OrderCommand::Place(sum_overflow)),
            Err(OrderRejected::TotalOverflow)
        );
        assert_eq!(
            given(
                &placed(),
                OrderCommand::Place(place_cmd(vec![line("A", 1, 1)]))
            ),
            Err(OrderRejected::AlreadyPlaced)
        );
    }

    #[test]
    fn the_happy_path_walks_every_status() {
        let mut h = placed();
        for (cmd, status) in [
            (
                OrderCommand::MarkInventoryReserved {
                    reservation_id: "r1".into(),
                },
                OrderStatus::InventoryReserved,
            ),
            (
                OrderCommand::MarkPaymentAuthorized {
                    authorization_id: "a1".into(),
                },
                OrderStatus::PaymentAuthorized,
            ),
            (
                OrderCommand::Confirm {
                    shipment_id: "s1".into(),
                },
                OrderStatus::Confirmed,
            ),
        ] {
            let events = given(&h, cmd).unwrap();
            assert_eq!(events.len(), 1);
            h.extend(events);
            assert_eq!(replay(&h).status(), Some(status));
        }
        let OrderEvent::Confirmed(c) = h.last().unwrap() else {
            panic!()
        };
        assert_eq!(c.total_minor.get(), 1300);
    }

    #[test]
    fn repeated_steps_are_no_ops_and_skipped_steps_are_rejected() {
        let mut h = placed();
        h.extend(
            given(
                &h,
                OrderCommand::MarkInventoryReserved {
                    reservation_id: "r".into(),
                },
            )
            .unwrap(),
        );
        assert_eq!(
            given(
                &h,
                OrderCommand::MarkInventoryReserved {
                    reservation_id: "r".into()
                }
            ),
            Ok(vec![])
        );
        assert!(matches!(
            given(
                &placed(),
                OrderCommand::Confirm {
                    shipment_id: "s".into()
                }
            ),
            Err(OrderRejected::InvalidTransition {
                status: OrderStatus::Pending,
                ..
            })
        ));
    }

    #[test]
    fn cancel_is_allowed_until_confirmed() {
        assert_eq!(
            then_status(&placed(), cancel(CancelledBy::Customer)),
            OrderStatus::Cancelled
        );
        let mut h = placed();
        h.extend(
            given(
                &h,
                OrderCommand::MarkInventoryReserved {
                    reservation_id: "r".into(),
                },
            )
            .unwrap(),
        );
        let events = given(&h, cancel(CancelledBy::System)).unwrap();
        let OrderEvent::Cancelled(c) = &events[0] else {
            panic!()
        };
        assert_eq!(c.previous_status, OrderStatus::InventoryReserved);
        assert_eq!(c.reason.as_str(), "changed my mind");
        h.extend(events);
        assert_eq!(
            given(&h, cancel(CancelledBy::Customer)),
            Err(OrderRejected::NotCancellable(OrderStatus::Cancelled))
        );
        assert!(
            given(
                &h,
                OrderCommand::MarkPaymentAuthorized {
                    authorization_id: "a".into()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn cancel_is_rejected_after_confirmation() {
        let mut h = placed();
        for cmd in [
            OrderCommand::MarkInventoryReserved {
                reservation_id: "r".into(),
            },
            OrderCommand::MarkPaymentAuthorized {
                authorization_id: "a".into(),
            },
            OrderCommand::Confirm {
                shipment_id: "s".into(),
            },
        ] {
            h.extend(given(&h, cmd).unwrap());
        }
        assert_eq!(
            given(&h, cancel(CancelledBy::Operator)),
            Err(OrderRejected::NotCancellable(OrderStatus::Confirmed))
        );
    }

    #[test]
    fn commands_on_a_missing_order_are_not_found() {
        assert_eq!(
            decide(&Order::NotPlaced, cancel(CancelledBy::Customer)),
            Err(OrderRejected::NotFound)
        );
    }
}
