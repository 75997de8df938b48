//! Signing operators in and out, and the two guards every page and action passes.
//!
//! Sign-in takes an operator bearer token (the same keys and claims as the API; `shop token
//! --role operator` mints one) once, and trades it for a session: a random cookie whose
//! SHA-256 is the key of a `console_sessions` row, valid until the token would have expired.
//! The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends
//! it), scoped to `/console`, and Secure with `CONSOLE_SECURE_COOKIE`. A customer token is
//! refused.
//!
//! [`Operator`] guards pages: no session, no page (a GET is sent to the sign-in form).
//! [`Act`] guards actions: a session, a form whose `csrf` field equals the session's token
//! (compared in constant time), and no `Sec-Fetch-Site: cross-site`. A POST without them is
//! refused with 403 before anything is done.

use axum::{
    Form,
    extract::{FromRequest, FromRequestParts, Request, State},
    http::{Method, StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
};
use base64::Engine;
use maud::html;
use serde::{Deserialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Console, ConsoleError, actions};

/// The session cookie's name.
pub const COOKIE: &str = "shop_console";

/// A signed-in operator.
#[derive(Debug, Clone)]
pub struct Operator {
    /// `operator:<subject>`, as recorded in the action log.
    pub actor: String,
    /// The token every form of this session carries.
    pub csrf: String,
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// The session cookie's value in a request, if any.
fn cookie(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Whether the browser says the request comes from another site (a forged form).
fn cross_site(parts: &Parts) -> bool {
    parts
        .headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
}

/// The session a cookie opens, if it is current.
pub async fn lookup(console: &Console, secret: &str) -> Result<Option<Operator>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT actor, csrf FROM console_sessions WHERE token_hash = $1 AND expires_at > now()",
    )
    .bind(hash(secret))
    .fetch_optional(&console.pool)
    .await?;
    Ok(row.map(|(actor, csrf)| Operator { actor, csrf }))
}

impl FromRequestParts<Console> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, Response> {
        let session = match cookie(parts) {
            Some(secret) => lookup(console, secret)
                .await
                .map_err(|e| ConsoleError::from(e).into_response())?,
            None => None,
        };
        match session {
            Some(op) => Ok(op),
            None if parts.method == Method::GET => {
                Err(Redirect::to("/console/sign-in").into_response())
            }
            None => Err(ConsoleError::Forbidden("sign in first").into_response()),
        }
    }
}

/// An operator's action: a signed-in operator and a form that carries the session's CSRF
/// token (`csrf`), from this site.
pub struct Act<T> {
    pub operator: Operator,
    pub form: T,
}

#[derive(Deserialize)]
struct WithCsrf<T> {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    form: T,
}

impl<T: DeserializeOwned + Send + 'static> FromRequest<Console> for Act<T> {
    type Rejection = Response;

    async fn from_request(req: Request, console: &Console) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        if cross_site(&parts) {
            return Err(ConsoleError::Forbidden("a request from another site").into_response());
        }
        let operator = Operator::from_request_parts(&mut parts, console).await?;
        let req = Request::from_parts(parts, body);
        let Form(WithCsrf { csrf, form }) =
            Form::<WithCsrf<T>>::from_request(req, console)
                .await
                .map_err(|e| ConsoleError::BadRequest(e.body_text()).into_response())?;
        if !bool::from(csrf.as_bytes().ct_eq(operator.csrf.as_bytes())) {
            tracing::warn!(actor = %operator.actor, "console: a POST without the session's CSRF token");
            return Err(
                ConsoleError::Forbidden("the form's CSRF token is missing or wrong")
                    .into_response(),
            );
        }
        Ok(Act { operator, form })
    }
}

/// A form with no fields besides the CSRF token.
#[derive(Deserialize)]
pub struct NoFields {}

pub async fn sign_in_page() -> maud::Markup {
    crate::view::bare(
        "Sign in",
        html! {
            h1 { "Operator console" }
            form method="post" action="/console/sign-in" {
                label for="token" { "Operator token" }
                p.hint { "A bearer token with the operator role: " code { "shop token --role operator --subject you" } }
                textarea #token name="token" rows="4" cols="60" required autocomplete="off" {}
                p { button type="submit" { "Sign in" } }
            }
        },
    )
}

#[derive(Deserialize)]
pub struct SignIn {
    token: String,
}

pub async fn sign_in(
    State(console): State<Console>,
    parts: Parts,
    Form(form): Form<SignIn>,
) -> Result<Response, ConsoleError> {
    if cross_site(&parts) {
        return Err(ConsoleError::Forbidden("a request from another site"));
    }
    let principal = match console.auth.verify(form.token.trim()) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(error = %e, "console: sign-in refused");
            return Ok(refused(
                StatusCode::UNAUTHORIZED,
                "That token is not valid.",
            ));
        }
    };
    if principal.role != platform::auth::Role::Operator {
        tracing::warn!(actor = %principal.actor(), "console: sign-in with a non-operator token");
        return Ok(refused(
            StatusCode::FORBIDDEN,
            "The console is for operators: this token does not have the operator role.",
        ));
    }
    let secret = random_token();
    let csrf = random_token();
    let actor = principal.actor();
    sqlx::query(
        "INSERT INTO console_sessions (token_hash, actor, csrf, expires_at)
         VALUES ($1, $2, $3, to_timestamp($4))",
    )
    .bind(hash(&secret))
    .bind(&actor)
    .bind(&csrf)
    .bind(principal.expires_at as f64)
    .execute(&console.pool)
    .await?;
    // Expired sessions go when anyone signs in: the table stays as small as the team.
    sqlx::query("DELETE FROM console_sessions WHERE expires_at < now()")
        .execute(&console.pool)
        .await?;
    actions::record(
        &console.pool,
        actions::NewAction {
            actor: &actor,
            action: "sign_in",
            target: "console",
            outcome: "ok",
            ..Default::default()
        },
    )
    .await?;
    let max_age = (principal.expires_at - chrono::Utc::now().timestamp()).max(0);
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, set_cookie(&console, &secret, max_age)),
            (header::LOCATION, "/console".to_owned()),
        ],
    )
        .into_response())
}

/// The session cookie's `Set-Cookie` value (an empty value with `max_age` 0 removes it).
fn set_cookie(console: &Console, value: &str, max_age: i64) -> String {
    let secure = if console.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    format!("{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

fn refused(status: StatusCode, why: &str) -> Response {
    let page = crate::view::bare(
        "Sign in",
        html! {
            h1 { "Not signed in" }
            p.error { (why) }
            p { a href="/console/sign-in" { "Try again" } }
        },
    );
    (status, page).into_response()
}

pub async fn sign_out(
    State(console): State<Console>,
    parts: Parts,
    act: Act<NoFields>,
) -> Result<Response, ConsoleError> {
    if let Some(secret) = cookie(&parts) {
        sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
            .bind(hash(secret))
            .execute(&console.pool)
            .await?;
    }
    actions::record(
        &console.pool,
        actions::NewAction {
            actor: &act.operator.actor,
            action: "sign_out",
            target: "console",
            outcome: "ok",
            ..Default::default()
        },
    )
    .await?;
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, set_cookie(&console, "", 0)),
            (header::LOCATION, "/console/sign-in".to_owned()),
        ],
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = axum::http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_session_cookie_is_found_among_others_and_only_by_its_name() {
        let p = parts(&[("cookie", "a=1; shop_console=s3cret; b=2")]);
        assert_eq!(cookie(&p), Some("s3cret"));
        let p = parts(&[
            ("cookie", "x_shop_console=no"),
            ("cookie", "shop_console=yes"),
        ]);
        assert_eq!(cookie(&p), Some("yes"));
        assert_eq!(cookie(&parts(&[("cookie", "other=1")])), None);
        assert_eq!(cookie(&parts(&[])), None);
    }

    #[test]
    fn only_a_cross_site_request_is_refused_by_fetch_metadata() {
        assert!(cross_site(&parts(&[("sec-fetch-site", "cross-site")])));
        assert!(!cross_site(&parts(&[("sec-fetch-site", "same-origin")])));
        assert!(!cross_site(&parts(&[])));
    }

    #[test]
    fn session_secrets_are_random_and_stored_only_as_hashes() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash(&a).len(), 32);
        assert_ne!(hash(&a), a.as_bytes());
    }
}
