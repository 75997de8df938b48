//! Customer profiles: name, email and default address, the one place notifications find a
//! customer's address (no event carries it).
//!
//! `PUT /customers/{id}` creates or replaces a profile (a customer her own, an operator any),
//! `GET /customers/{id}` reads it. Every SQL statement on `customers` and
//! `customer_erasures` is here.
//!
//! Erasure: [`forget`] (`POST /admin/customers/{id}/forget`, operators; `shop customers
//! forget <id>`) deletes the customer's data keys, which makes every sealed copy of their
//! personal data unreadable wherever it was stored or published (`platform::vault`), their
//! profile, and any payment token still held for them, in one transaction, and records
//! that it happened. docs/security.md says what it cannot reach.

use axum::{
    Json,
    extract::{Path, Request, State},
    response::{IntoResponse, Response},
};
use domain::values::{CustomerId, EmailAddress, ShippingAddress};
use platform::auth::{Principal, Role};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::{dto::AddressDto, http::AppState, problem::ApiError};

/// A customer's profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub customer_id: CustomerId,
    pub name: String,
    pub email: EmailAddress,
    pub default_address: Option<ShippingAddress>,
}

impl Profile {
    fn to_json(&self) -> Value {
        json!({
            "customer_id": self.customer_id.as_str(),
            "name": self.name,
            "email": self.email.as_str(),
            "default_address": self.default_address,
        })
    }
}

/// The body of `PUT /customers/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileRequest {
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub default_address: Option<AddressDto>,
}

/// Creates or replaces a profile.
pub async fn save(pool: &PgPool, p: &Profile) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO customers (customer_id, name, email, default_address) VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer_id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email,
             default_address = EXCLUDED.default_address, updated_at = now()",
    )
    .bind(p.customer_id.as_str())
    .bind(&p.name)
    .bind(p.email.as_str())
    .bind(p.default_address.as_ref().map(|a| json!(a)))
    .execute(pool)
    .await?;
    Ok(())
}

/// The profile of `id`, if there is one (a stored row that no longer parses is an error).
pub async fn find(pool: &PgPool, id: &str) -> Result<Option<Profile>, sqlx::Error> {
    let row: Option<(String, String, String, Option<Value>)> = sqlx::query_as(
        "SELECT customer_id, name, email, default_address FROM customers WHERE customer_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some((id, name, email, address)) = row else {
        return Ok(None);
    };
    let decode = |e: domain::values::ValueError| sqlx::Error::Decode(Box::new(e));
    Ok(Some(Profile {
        customer_id: CustomerId::parse(&id).map_err(decode)?,
        name,
        email: EmailAddress::parse(&email).map_err(decode)?,
        default_address: address
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
    }))
}

/// What forgetting a customer deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub keys_deleted: u64,
    pub profile_deleted: bool,
    pub payment_tokens_deleted: u64,
}

/// Forgets `id`: deletes their data keys, profile and held payment tokens, and records the
/// erasure, in one transaction. Forgetting again deletes nothing more and succeeds.
/// `actor` (who asked) is recorded with it.
pub async fn forget(pool: &PgPool, id: &CustomerId, actor: &str) -> Result<Erasure, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let keys_deleted = platform::vault::forget(&mut tx, id.as_str()).await?;
    let profile_deleted = sqlx::query("DELETE FROM customers WHERE customer_id = $1")
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected()
        > 0;
    let payment_tokens_deleted =
        orders::payment_tokens::forget_customer(&mut tx, id.as_str()).await?;
    sqlx::query(
        "INSERT INTO customer_erasures (customer_id, keys_deleted, erased_by) VALUES ($1, $2, $3)
         ON CONFLICT (customer_id) DO UPDATE
             SET keys_deleted = customer_erasures.keys_deleted + EXCLUDED.keys_deleted,
                 erased_by = EXCLUDED.erased_by, erased_at = now()",
    )
    .bind(id.as_str())
    .bind(i32::try_from(keys_deleted).unwrap_or(i32::MAX))
    .bind(actor)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        customer_id = id.as_str(),
        actor,
        keys_deleted,
        profile_deleted,
        payment_tokens_deleted,
        "customer forgotten"
    );
    metrics::counter!("customers_forgotten_total").increment(1);
    Ok(Erasure {
        keys_deleted,
        profile_deleted,
        payment_tokens_deleted,
    })
}

/// `POST /admin/customers/{id}/forget`: operators only.
pub async fn forget_endpoint(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let principal = crate::http::authenticate(&state, request.headers())?;
    if principal.role != Role::Operator {
        return Err(ApiError::Forbidden(
            "only operators may forget a customer".into(),
        ));
    }
    let id = CustomerId::parse(&raw_id)?;
    let e = forget(&state.pool, &id, &principal.actor()).await?;
    Ok(Json(json!({
        "customer_id": id.as_str(),
        "keys_deleted": e.keys_deleted,
        "profile_deleted": e.profile_deleted,
        "payment_tokens_deleted": e.payment_tokens_deleted,
    }))
    .into_response())
}

/// Whose profile `principal` may touch: her own, or any for an operator.
fn allowed(principal: &Principal, id: &str) -> Result<CustomerId, ApiError> {
    let id = CustomerId::parse(id)?;
    match principal.role {
        Role::Operator => Ok(id),
        Role::Customer if principal.subject == id.as_str() => Ok(id),
        Role::Customer => Err(ApiError::Forbidden(
            "customers may only see and change their own profile".into(),
        )),
    }
}

/// `PUT /customers/{id}`.
pub async fn put(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let (principal, headers, body) = crate::http::authenticated(&state, request).await?;
    let customer_id = allowed(&principal, &raw_id)?;
    let (req, _): (ProfileRequest, Value) = crate::http::parse_body(&state, &headers, body)?;
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::validation(
            "name",
            "name: must be 1 to 200 printable characters",
        ));
    }
    let default_address = req.default_address.map(|a| a.parse()).transpose()?;
    let profile = Profile {
        customer_id,
        name: name.to_owned(),
        email: EmailAddress::parse(&req.email)?,
        default_address,
    };
    save(&state.pool, &profile).await?;
    Ok(Json(profile.to_json()).into_response())
}

/// `GET /customers/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let principal = crate::http::authenticate(&state, request.headers())?;
    let customer_id = allowed(&principal, &raw_id)?;
    match find(&state.pool, customer_id.as_str()).await? {
        Some(p) => Ok(Json(p.to_json()).into_response()),
        None => Err(ApiError::NotFound("no profile for this customer".into())),
    }
}
