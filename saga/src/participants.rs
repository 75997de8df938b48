//! Stand-in participants: inventory (real stock per SKU), payment (a small ledger) and
//! shipping, each consuming its queue through [`crate::consumer`].
//!
//! Each command is handled once per message id (`participant_inbox`) and once per order
//! (the state tables are keyed by order, so a re-sent step answers the same). The reply goes
//! into the outbox in the same transaction as the effect, so it is sent at least once and
//! never for an effect that did not commit.
//!
//! Personal data: the payment participant resolves the order's payment reference once
//! (`orders::payment_tokens::take`, in the transaction that records the authorization; a
//! re-sent step finds the recorded answer, a missing token is a decline), and the shipping
//! participant opens the sealed address with the customer's data key
//! (`platform::vault`): an erased address fails the shipment, and the saga compensates.
//!
//! Test inputs, like a real payment provider's test cards: payment token `tok_decline` is
//! declined, and a line beyond stock is out of stock. These are business outcomes, always on.
//!
//! Fault injection, only with `SAGA_FAULT_INJECTION=true` (which needs development mode,
//! [`crate::SagaConfig::check`]): `tok_flaky_N` fails transiently on its first N deliveries,
//! then succeeds; `tok_slow` answers only after the step deadline;
//! `SAGA_POISON_REPLIES_FROM=<participant>` makes that participant send malformed replies;
//! `SAGA_REFUSE_COMMANDS_AT=<participant>` makes it dead-letter every command as invalid.
//! Without it those tokens are ordinary tokens.

use domain::{
    personal::{self, Payment, Protected},
    saga::{SagaCommand, SagaInput},
    values::{OrderId, PaymentToken, Quantity, ShippingAddress, Sku},
};
use event_store::{Destination, OutboxMessage};
use platform::vault::{Vault, VaultError};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    SagaConfig,
    consumer::{self, ConsumeOptions, Failure, Inbound},
    topology::{Names, Reply},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Participant {
    Inventory,
    Payment,
    Shipping,
}

impl Participant {
    pub const ALL: [Participant; 3] = [Self::Inventory, Self::Payment, Self::Shipping];

    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Shipping => "shipping",
        }
    }
}

/// Consumes the participant's queue until `shutdown`.
pub async fn run(
    participant: Participant,
    pool: PgPool,
    conn: std::sync::Arc<lapin::Connection>,
    config: SagaConfig,
    vault: Vault,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let names = Names::new(&config.queue_prefix);
    let options = ConsumeOptions {
        queue: names.queue(participant.name()),
        dead_letter_queue: names.dead_letter_queue(participant.name()),
        max_deliveries: config.max_deliveries,
        retry_delays: config.retry_delays(),
        concurrency: config.concurrency,
    };
    let injected = |switch: &Option<String>| {
        config.fault_injection && switch.as_deref() == Some(participant.name())
    };
    let poison = injected(&config.poison_replies_from);
    let refuse = injected(&config.refuse_commands_at);
    consumer::consume(conn, options, shutdown, |m| {
        let (pool, names, config, vault) =
            (pool.clone(), names.clone(), config.clone(), vault.clone());
        async move {
            if refuse {
                return Err(Failure::poison(
                    "refused",
                    format!(
                        "{} refuses commands (SAGA_REFUSE_COMMANDS_AT)",
                        participant.name()
                    ),
                ));
            }
            let span = tracing::info_span!(
                "participant.step",
                participant = participant.name(),
                message_id = %m.message_id,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            platform::trace::follow(&span, m.traceparent.as_deref());
            handle(participant, &pool, &vault, &names, &config, poison, m)
                .instrument(span)
                .await
        }
    })
    .await
}

/// Handles one command: the injected faults of the development payment provider, then the
/// effect and its reply (through the outbox) in one transaction, once per message.
async fn handle(
    participant: Participant,
    pool: &PgPool,
    vault: &Vault,
    names: &Names,
    config: &SagaConfig,
    poison_replies: bool,
    m: Inbound,
) -> Result<(), Failure> {
    let command: SagaCommand = serde_json::from_slice(&m.body)
        .map_err(|e| Failure::poison("malformed_command", e.to_string()))?;
    injected_faults(&command, pool, vault, config, m.delivery).await?;
    let mut tx = pool.begin().await?;
    let fresh = sqlx::query(
        "INSERT INTO participant_inbox (participant, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(participant.name())
    .bind(m.message_id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        return Ok(());
    }
    if let Some((order_id, input)) = effect(&mut tx, vault, participant, command).await? {
        let payload = if poison_replies {
            b"{\"not\": \"a reply\"}".to_vec()
        } else {
            serde_json::to_vec(&Reply { order_id, input }).expect("reply serializes")
        };
        let headers = event_store::Headers::new(Some(m.message_id), m.traceparent.as_deref())
            .with("participant", participant.name())
            .into_value();
        let reply = OutboxMessage {
            message_id: Uuid::now_v7(),
            destination: Destination::Amqp,
            target: platform::amqp::COMMANDS_EXCHANGE.to_owned(),
            routing_key: names.routing_key("replies"),
            ordering_key: order_id.to_string(),
            headers,
            payload,
        };
        event_store::enqueue(&mut tx, &[reply]).await?;
    }
    tx.commit().await?;
    tracing::debug!("participant step done");
    metrics::counter!("saga_participant_commands_total", "participant" => participant.name())
        .increment(1);
    Ok(())
}

/// The development payment provider's fault injection (off unless
/// `config.fault_injection`): `tok_slow` answers after every attempt's deadline (so the saga
/// gives up first), `tok_flaky_N` fails transiently N deliveries.
async fn injected_faults(
    command: &SagaCommand,
    pool: &PgPool,
    vault: &Vault,
    config: &SagaConfig,
    delivery: u32,
) -> Result<(), Failure> {
    let SagaCommand::AuthorizePayment {
        order_id, payment, ..
    } = command
    else {
        return Ok(());
    };
    if !config.fault_injection {
        return Ok(());
    }
    let token = match payment {
        Payment::LegacyToken(t) => Some(t.clone()),
        Payment::Ref(r) => match orders::payment_tokens::peek(pool, *r).await? {
            Some(sealed) => {
                let mut conn = pool.acquire().await?;
                let context = personal::payment_token_context(*order_id);
                open(vault, &mut conn, &context, &sealed).await?
            }
            None => None,
        },
    };
    match token {
        Some(token) => token_faults(&token, config, delivery).await,
        None => Ok(()),
    }
}

/// The faults a development token asks for (none unless `config.fault_injection`).
async fn token_faults(
    token: &PaymentToken,
    config: &SagaConfig,
    delivery: u32,
) -> Result<(), Failure> {
    if !config.fault_injection {
        return Ok(());
    }
    match token.as_str() {
        "tok_slow" => {
            let attempts = f64::from(config.step_attempts) + 0.5;
            tokio::time::sleep(config.step_timeout.mul_f64(attempts)).await;
            Ok(())
        }
        t => match t
            .strip_prefix("tok_flaky_")
            .and_then(|n| n.parse::<u32>().ok())
        {
            Some(n) if delivery <= n => Err(Failure::transient(format!(
                "payment provider unavailable (injected, delivery {delivery} of {n})"
            ))),
            _ => Ok(()),
        },
    }
}

/// The participant's effect of `command`, and the reply it owes the saga (none for the
/// compensations).
async fn effect(
    tx: &mut PgConnection,
    vault: &Vault,
    participant: Participant,
    command: SagaCommand,
) -> Result<Option<(OrderId, SagaInput)>, Failure> {
    Ok(match (participant, command) {
        (Participant::Inventory, SagaCommand::ReserveInventory { order_id, lines }) => {
            Some((order_id, reserve(tx, order_id, &lines).await?))
        }
        (Participant::Inventory, SagaCommand::ReleaseInventory { order_id }) => {
            release(tx, order_id).await?;
            None
        }
        (
            Participant::Payment,
            SagaCommand::AuthorizePayment {
                order_id,
                amount_minor,
                currency,
                payment,
            },
        ) => {
            let input = match payment_token(tx, vault, order_id, payment).await? {
                Resolved::Recorded(input) => input,
                Resolved::Missing => SagaInput::PaymentDeclined {
                    reason: "the payment token expired, was used or was erased".into(),
                },
                Resolved::Token(t) if t.as_str() == "tok_decline" => SagaInput::PaymentDeclined {
                    reason: "card declined".into(),
                },
                Resolved::Token(_) => {
                    authorize(tx, order_id, amount_minor.get(), currency.as_str()).await?
                }
            };
            Some((order_id, input))
        }
        (Participant::Payment, SagaCommand::VoidPayment { order_id }) => {
            sqlx::query(
                "UPDATE payments SET status = 'voided', updated_at = now() WHERE order_id = $1 AND status = 'authorized'",
            )
            .bind(order_id.0)
            .execute(&mut *tx)
            .await?;
            None
        }
        (Participant::Shipping, SagaCommand::CreateShipment { order_id, address }) => {
            if let Some(shipment_id) = recorded_shipment(tx, order_id).await? {
                return Ok(Some((order_id, SagaInput::ShipmentCreated { shipment_id })));
            }
            if label_address(tx, vault, order_id, &address)
                .await?
                .is_none()
            {
                return Ok(Some((
                    order_id,
                    SagaInput::ShipmentFailed {
                        reason: "the shipping address was erased".into(),
                    },
                )));
            }
            let shipment_id: String = sqlx::query_scalar(
                "INSERT INTO shipments (order_id, shipment_id) VALUES ($1, $2)
                 ON CONFLICT (order_id) DO UPDATE SET order_id = EXCLUDED.order_id RETURNING shipment_id",
            )
            .bind(order_id.0)
            .bind(format!("ship-{}", order_id.0.simple()))
            .fetch_one(&mut *tx)
            .await?;
            Some((order_id, SagaInput::ShipmentCreated { shipment_id }))
        }
        (p, other) => {
            return Err(Failure::poison(
                "wrong_participant",
                // The command's kind only: its fields may hold (legacy) personal data.
                format!(
                    "{} cannot handle {}",
                    p.name(),
                    serde_json::to_value(&other)
                        .ok()
                        .and_then(|v| v["type"].as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            ));
        }
    })
}

/// What the payment participant found for an order's payment method.
enum Resolved {
    /// A re-sent step: the answer recorded the first time.
    Recorded(SagaInput),
    Token(PaymentToken),
    /// Taken already, expired or erased, and nothing recorded.
    Missing,
}

/// The order's recorded payment answer, or its token (taken: used once).
///
/// Two deliveries of the step at once (a re-send after a deadline): the second waits on the
/// token row the first deletes, then finds no token; it looks for the recorded answer again
/// (now committed) before it calls the token missing.
async fn payment_token(
    tx: &mut PgConnection,
    vault: &Vault,
    order_id: OrderId,
    payment: Payment,
) -> Result<Resolved, Failure> {
    if let Some(answer) = recorded_payment(tx, order_id).await? {
        return Ok(Resolved::Recorded(answer));
    }
    let sealed = match payment {
        Payment::LegacyToken(t) => return Ok(Resolved::Token(t)),
        Payment::Ref(r) => orders::payment_tokens::take(tx, r, order_id).await?,
    };
    let Some(sealed) = sealed else {
        return Ok(match recorded_payment(tx, order_id).await? {
            Some(answer) => Resolved::Recorded(answer),
            None => Resolved::Missing,
        });
    };
    let context = personal::payment_token_context(order_id);
    Ok(match open(vault, tx, &context, &sealed).await? {
        Some(token) => Resolved::Token(token),
        None => Resolved::Missing,
    })
}

/// The answer recorded for the order's payment, if it was handled before.
async fn recorded_payment(
    tx: &mut PgConnection,
    order_id: OrderId,
) -> Result<Option<SagaInput>, sqlx::Error> {
    let recorded: Option<(String, String)> =
        sqlx::query_as("SELECT authorization_id, status FROM payments WHERE order_id = $1")
            .bind(order_id.0)
            .fetch_optional(&mut *tx)
            .await?;
    Ok(recorded.map(|(authorization_id, status)| {
        if status == "authorized" {
            SagaInput::PaymentAuthorized { authorization_id }
        } else {
            SagaInput::PaymentDeclined {
                reason: "the authorization was already voided".into(),
            }
        }
    }))
}

/// Opens a sealed value (`None`: its customer was forgotten). A master key that is not
/// configured is the operator's problem, not the message's: retried (and `shop run` checks
/// the keys before it starts); a box that does not open under this order is poison.
async fn open<T: serde::de::DeserializeOwned>(
    vault: &Vault,
    tx: &mut PgConnection,
    context: &str,
    sealed: &domain::personal::Sealed,
) -> Result<Option<T>, Failure> {
    match vault.open(tx, context, sealed).await {
        Ok(v) => Ok(v),
        Err(VaultError::Database(e)) => Err(e.into()),
        Err(e @ (VaultError::UnknownMasterKey { .. } | VaultError::WrongMasterKey(_))) => {
            Err(Failure::transient(e.to_string()))
        }
        Err(other) => Err(Failure::poison(
            "unreadable_personal_data",
            other.to_string(),
        )),
    }
}

async fn recorded_shipment(
    tx: &mut PgConnection,
    order_id: OrderId,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT shipment_id FROM shipments WHERE order_id = $1")
        .bind(order_id.0)
        .fetch_optional(&mut *tx)
        .await
}

/// The address to print on the label: opened with the customer's data key, `None` once the
/// customer was forgotten.
async fn label_address(
    tx: &mut PgConnection,
    vault: &Vault,
    order_id: OrderId,
    address: &Protected<ShippingAddress>,
) -> Result<Option<ShippingAddress>, Failure> {
    match address {
        Protected::Clear(a) => Ok(Some(a.clone())),
        Protected::Sealed(s) => {
            let context = personal::shipping_address_context(order_id);
            open(vault, tx, &context, s).await
        }
    }
}

/// Reserves every line or nothing; the same order asking again gets the same answer.
async fn reserve(
    conn: &mut PgConnection,
    order_id: OrderId,
    lines: &[(Sku, Quantity)],
) -> Result<SagaInput, sqlx::Error> {
    let existing: Option<(String, String)> = sqlx::query_as(
        "SELECT reservation_id, status FROM inventory_reservations WHERE order_id = $1",
    )
    .bind(order_id.0)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((reservation_id, status)) = existing {
        return Ok(if status == "held" {
            SagaInput::InventoryReserved { reservation_id }
        } else {
            SagaInput::InventoryUnavailable {
                reason: "the reservation was already released".into(),
            }
        });
    }
    let mut wanted: std::collections::BTreeMap<String, i64> = Default::default();
    for (sku, qty) in lines {
        *wanted.entry(sku.as_str().to_owned()).or_default() += qty.get();
    }
    let skus: Vec<String> = wanted.keys().cloned().collect();
    let rows = sqlx::query(
        "SELECT sku, on_hand - reserved AS available FROM inventory_stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(&skus)
    .fetch_all(&mut *conn)
    .await?;
    for (sku, qty) in &wanted {
        let available: i64 = rows
            .iter()
            .find(|r| r.get::<String, _>("sku") == *sku)
            .map_or(0, |r| r.get("available"));
        if available < *qty {
            return Ok(SagaInput::InventoryUnavailable {
                reason: format!("{sku} out of stock ({available} available, {qty} requested)"),
            });
        }
    }
    sqlx::query(
        "UPDATE inventory_stock s SET reserved = s.reserved + w.qty
         FROM unnest($1::text[], $2::bigint[]) AS w(sku, qty) WHERE s.sku = w.sku",
    )
    .bind(&skus)
    .bind(wanted.values().copied().collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let reservation_id = format!("res-{}", order_id.0.simple());
    sqlx::query(
        "INSERT INTO inventory_reservations (order_id, reservation_id, lines, status) VALUES ($1, $2, $3, 'held')",
    )
    .bind(order_id.0)
    .bind(&reservation_id)
    .bind(json!(wanted))
    .execute(&mut *conn)
    .await?;
    Ok(SagaInput::InventoryReserved { reservation_id })
}

/// Releases the order's reservation if it is held (idempotent).
async fn release(conn: &mut PgConnection, order_id: OrderId) -> Result<(), sqlx::Error> {
    let lines: Option<serde_json::Value> = sqlx::query_scalar(
        "UPDATE inventory_reservations SET status = 'released', updated_at = now()
         WHERE order_id = $1 AND status = 'held' RETURNING lines",
    )
    .bind(order_id.0)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(serde_json::Value::Object(lines)) = lines else {
        return Ok(());
    };
    let (skus, qtys): (Vec<String>, Vec<i64>) = lines
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
        .unzip();
    sqlx::query(
        "UPDATE inventory_stock s SET reserved = s.reserved - w.qty
         FROM unnest($1::text[], $2::bigint[]) AS w(sku, qty) WHERE s.sku = w.sku",
    )
    .bind(&skus)
    .bind(&qtys)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn authorize(
    conn: &mut PgConnection,
    order_id: OrderId,
    amount_minor: i64,
    currency: &str,
) -> Result<SagaInput, sqlx::Error> {
    let (authorization_id, status): (String, String) = sqlx::query_as(
        "INSERT INTO payments (order_id, authorization_id, amount_minor, currency, status)
         VALUES ($1, $2, $3, $4, 'authorized')
         ON CONFLICT (order_id) DO UPDATE SET order_id = EXCLUDED.order_id
         RETURNING authorization_id, status",
    )
    .bind(order_id.0)
    .bind(format!("auth-{}", order_id.0.simple()))
    .bind(amount_minor)
    .bind(currency)
    .fetch_one(&mut *conn)
    .await?;
    Ok(if status == "authorized" {
        SagaInput::PaymentAuthorized { authorization_id }
    } else {
        SagaInput::PaymentDeclined {
            reason: "the authorization was already voided".into(),
        }
    })
}

/// Sets a SKU's stock on hand (`shop inventory set`). Refuses less than is reserved.
pub async fn set_stock(pool: &PgPool, sku: &Sku, on_hand: i64) -> Result<(), StockError> {
    let reserved: Option<i64> = sqlx::query_scalar(
        "INSERT INTO inventory_stock (sku, on_hand) VALUES ($1, $2)
         ON CONFLICT (sku) DO UPDATE SET on_hand = EXCLUDED.on_hand
         WHERE inventory_stock.reserved <= EXCLUDED.on_hand
         RETURNING reserved",
    )
    .bind(sku.as_str())
    .bind(on_hand)
    .fetch_optional(pool)
    .await?;
    match reserved {
        Some(_) => Ok(()),
        None => Err(StockError::BelowReserved(sku.as_str().to_owned())),
    }
}

/// Stocks a small default catalog (SKU-1 .. SKU-5, 1,000 each) where no stock is set yet.
pub async fn seed_catalog(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inventory_stock (sku, on_hand) SELECT 'SKU-' || g, 1000 FROM generate_series(1, 5) g
         ON CONFLICT DO NOTHING",
    )
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum StockError {
    #[error("{0}: more is reserved than that")]
    BelowReserved(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

#[cfg(test)]
mod tests {
    use domain::values::PaymentToken;

    use super::*;

    fn authorize(token: &str) -> PaymentToken {
        PaymentToken::parse(token).unwrap()
    }

    #[tokio::test]
    async fn fault_tokens_are_ordinary_tokens_unless_fault_injection_is_on() {
        let off = SagaConfig::default();
        assert!(!off.fault_injection, "off by default");
        assert!(
            token_faults(&authorize("tok_flaky_9"), &off, 1)
                .await
                .is_ok()
        );
        let on = SagaConfig {
            fault_injection: true,
            ..SagaConfig::default()
        };
        let failure = token_faults(&authorize("tok_flaky_9"), &on, 1)
            .await
            .unwrap_err();
        assert_eq!(failure.class, platform::errors::ErrorClass::Transient);
        assert!(
            token_faults(&authorize("tok_flaky_9"), &on, 10)
                .await
                .is_ok()
        );
        // A slow token would sleep past every deadline: without the switch it does not.
        let quick = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            token_faults(&authorize("tok_slow"), &off, 1),
        )
        .await;
        assert!(matches!(quick, Ok(Ok(()))));
    }
}
