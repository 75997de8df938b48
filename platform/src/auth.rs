//! Bearer tokens: HS256 JWTs carrying `sub`, `role` and `exp`.
//!
//! The command API and GraphQL check the same tokens. A customer token's `sub` is the
//! customer id; an operator may act on every order. `shop token` issues development tokens
//! with the configured secret.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The development secret `scripts/` and the defaults use. Never use it in production.
pub const DEV_SECRET: &str = "dev-secret-change-me";

#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
    /// HS256 secret that signs and verifies bearer tokens (at least 16 bytes).
    #[arg(long, env = "JWT_SECRET", default_value = DEV_SECRET, value_parser = parse_secret, hide_default_value = true)]
    pub jwt_secret: String,
}

fn parse_secret(s: &str) -> Result<String, String> {
    if s.len() >= 16 {
        Ok(s.to_owned())
    } else {
        Err("must be at least 16 bytes".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Operator => "operator",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    exp: i64,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub role: Role,
}

impl Principal {
    /// `role:subject`, stored as the actor of the events this caller causes.
    pub fn actor(&self) -> String {
        format!("{}:{}", self.role.as_str(), self.subject)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid bearer token: {0}")]
    Invalid(String),
}

/// Verifies and issues tokens with one secret.
#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Authenticator {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn from_config(cfg: &AuthConfig) -> Self {
        if cfg.jwt_secret == DEV_SECRET {
            tracing::warn!(
                "JWT_SECRET is the development default; set a secret of your own outside development"
            );
        }
        Self::new(&cfg.jwt_secret)
    }

    /// Checks an `Authorization` header value (`Bearer <jwt>`).
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| AuthError::Invalid("expected `Bearer <token>`".into()))?;
        self.verify(token.trim())
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 64 {
            return Err(AuthError::Invalid(
                "`sub` must be 1 to 64 characters".into(),
            ));
        }
        Ok(Principal {
            subject: c.sub,
            role: c.role,
        })
    }

    pub fn issue(&self, subject: &str, role: Role, ttl: Duration) -> String {
        let exp = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
        let claims = Claims {
            sub: subject.to_owned(),
            role,
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_tampered_ones_do_not() {
        let a = Authenticator::new("0123456789abcdef");
        let t = a.issue("c-1", Role::Customer, Duration::from_secs(60));
        let p = a.verify_header(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(
            p,
            Principal {
                subject: "c-1".into(),
                role: Role::Customer
            }
        );
        assert_eq!(p.actor(), "customer:c-1");
        let other = Authenticator::new("another-secret-0000");
        assert!(matches!(other.verify(&t), Err(AuthError::Invalid(_))));
        assert_eq!(a.verify_header(None), Err(AuthError::Missing));
        assert!(a.verify_header(Some("Basic abc")).is_err());
        assert!(a.verify(&format!("{t}x")).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let a = Authenticator::new("0123456789abcdef");
        let exp = chrono::Utc::now().timestamp() - 3600;
        let claims = Claims {
            sub: "c".into(),
            role: Role::Operator,
            exp,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.encoding).unwrap();
        assert!(a.verify(&t).is_err());
    }
}
