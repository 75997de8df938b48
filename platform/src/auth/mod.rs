//! Bearer tokens: HS256 JWTs carrying `sub`, `role`, `iss`, `aud`, `iat` and `exp`, signed
//! by a named key (`kid`) of the [`Keyring`].
//!
//! The command API and GraphQL check the same tokens. A customer token's `sub` is the
//! customer id; an operator may act on every order. There is no built-in key: `shop run`
//! refuses to start without one unless development mode is on (then it makes a random key
//! that nothing outside the process knows). A token is accepted only if its `kid` names a
//! configured key, its issuer and audience are this shop's, and its lifetime (`exp - iat`)
//! is within the configured cap, so a leaked long-lived token cannot be minted by a
//! misconfigured issuer. `shop token` mints tokens with the same keys.

mod hs256;

use std::{path::PathBuf, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, Keyring};

#[derive(Clone, clap::Args)]
pub struct AuthConfig {
    /// Bearer-token keys inline: `kid=secret` entries separated by commas, the first one
    /// signing (docs/security.md). Prefer JWT_KEYS_FILE.
    #[arg(long, env = "JWT_KEYS", hide_env_values = true)]
    pub jwt_keys: Option<String>,
    /// File of bearer-token keys, one `kid=secret` per line, the first one signing.
    /// `scripts/run.sh` generates one for development.
    #[arg(long, env = "JWT_KEYS_FILE")]
    pub jwt_keys_file: Option<PathBuf>,
    /// Issuer (`iss`) tokens must name; `shop token` writes it.
    #[arg(long, env = "JWT_ISSUER", default_value = "shop")]
    pub jwt_issuer: String,
    /// Audience (`aud`) tokens must name; `shop token` writes it.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "shop-api")]
    pub jwt_audience: String,
    /// Longest token lifetime accepted (`exp - iat`), e.g. 15m, 12h.
    #[arg(long, env = "JWT_MAX_TTL", default_value = "12h", value_parser = crate::config::parse_duration)]
    pub jwt_max_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_keys", &self.jwt_keys.as_ref().map(|_| "<redacted>"))
            .field("jwt_keys_file", &self.jwt_keys_file)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_max_ttl", &self.jwt_max_ttl)
            .finish()
    }
}

impl AuthConfig {
    /// A configuration with these keys (tests, benchmarks) and the default claims.
    pub fn with_keys(keys: &str) -> Self {
        Self {
            jwt_keys: Some(keys.to_owned()),
            ..Self::default()
        }
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
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub role: Role,
    /// When the token stops being valid (Unix seconds): long-lived connections close then.
    pub expires_at: i64,
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

/// Why an authenticator could not be built (the process does not start).
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("a token lifetime of {asked:?} is above JWT_MAX_TTL ({max:?})")]
    TtlAboveCap { asked: Duration, max: Duration },
}

/// Verifies and issues tokens with one keyring.
#[derive(Clone)]
pub struct Authenticator {
    keys: Keyring,
    validation: Validation,
    issuer: String,
    audience: String,
    max_ttl: Duration,
}

/// Clock skew tolerated between the token's issuer and this process.
const LEEWAY_SECS: i64 = 5;

impl Authenticator {
    /// An authenticator over `keys` with the configuration's claims.
    pub fn with_keys(keys: Keyring, cfg: &AuthConfig) -> Self {
        hs256::install();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[&cfg.jwt_issuer]);
        validation.set_audience(&[&cfg.jwt_audience]);
        validation.leeway = LEEWAY_SECS as u64;
        Self {
            keys,
            validation,
            issuer: cfg.jwt_issuer.clone(),
            audience: cfg.jwt_audience.clone(),
            max_ttl: cfg.jwt_max_ttl,
        }
    }

    /// One random key and the default claims: for tests and benchmarks that mint and check
    /// tokens in one process.
    pub fn ephemeral() -> Self {
        Self::with_keys(Keyring::ephemeral("ephemeral"), &AuthConfig::default())
    }

    /// The configured keys; without any, an error unless `dev_mode`, where a random key
    /// (known to this process only) is made and a warning says so.
    pub fn from_config(cfg: &AuthConfig, dev_mode: bool) -> Result<Self, AuthSetupError> {
        let configured =
            Keyring::configured("JWT", cfg.jwt_keys.as_deref(), cfg.jwt_keys_file.as_deref())?;
        let keys = match configured {
            Some(keys) => keys,
            None if dev_mode => {
                tracing::warn!(
                    "no JWT key configured (JWT_KEYS_FILE): development mode made a random one; \
                     no token from outside this process will be accepted"
                );
                Keyring::ephemeral("ephemeral")
            }
            None => {
                return Err(KeyError::Missing {
                    name: "JWT".into(),
                    hint: "scripts/run.sh generates .local/keys/jwt.keys for development".into(),
                }
                .into());
            }
        };
        Ok(Self::with_keys(keys, cfg))
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
        let invalid = |e: &dyn std::fmt::Display| AuthError::Invalid(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(&e))?;
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("the token names no key (`kid`)".into()))?;
        let key = self.keys.get(&kid).ok_or_else(|| {
            AuthError::Invalid("the token's key (`kid`) is not configured".into())
        })?;
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(key.secret()),
            &self.validation,
        )
        .map_err(|e| invalid(&e))?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 64 {
            return Err(AuthError::Invalid(
                "`sub` must be 1 to 64 characters".into(),
            ));
        }
        let now = chrono::Utc::now().timestamp();
        if c.iat > now + LEEWAY_SECS {
            return Err(AuthError::Invalid("`iat` is in the future".into()));
        }
        if c.exp.saturating_sub(c.iat) > self.max_ttl.as_secs() as i64 {
            return Err(AuthError::Invalid(format!(
                "the token's lifetime is above the {}s this shop accepts",
                self.max_ttl.as_secs()
            )));
        }
        Ok(Principal {
            subject: c.sub,
            role: c.role,
            expires_at: c.exp,
        })
    }

    /// A token for `subject`, signed by the active key; `ttl` at most the configured cap.
    pub fn issue(
        &self,
        subject: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<String, AuthSetupError> {
        if ttl > self.max_ttl {
            return Err(AuthSetupError::TtlAboveCap {
                asked: ttl,
                max: self.max_ttl,
            });
        }
        let iat = chrono::Utc::now().timestamp();
        Ok(self.sign(&Claims {
            sub: subject.to_owned(),
            role,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat,
            exp: iat + ttl.as_secs() as i64,
        }))
    }

    fn sign(&self, claims: &Claims) -> String {
        let key = self.keys.active();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(key.secret()))
            .expect("HS256 signing of serialisable claims cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1=0123456789abcdef0123456789abcdef";
    const K2: &str = "k2=fedcba9876543210fedcba9876543210";

    fn auth(keys: &str) -> Authenticator {
        let cfg = AuthConfig::with_keys(keys);
        Authenticator::from_config(&cfg, false).unwrap()
    }

    fn claims(a: &Authenticator, iat: i64, exp: i64) -> Claims {
        Claims {
            sub: "c".into(),
            role: Role::Operator,
            iss: a.issuer.clone(),
            aud: a.audience.clone(),
            iat,
            exp,
        }
    }

    #[test]
    fn issued_tokens_verify_and_tampered_ones_do_not() {
        let a = auth(K1);
        let t = a
            .issue("c-1", Role::Customer, Duration::from_secs(60))
            .unwrap();
        let p = a.verify_header(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!((p.subject.as_str(), p.role), ("c-1", Role::Customer));
        assert_eq!(p.actor(), "customer:c-1");
        assert_eq!(a.verify_header(None), Err(AuthError::Missing));
        assert!(a.verify_header(Some("Basic abc")).is_err());
        assert!(a.verify(&format!("{t}x")).is_err());
        // Same kid, another secret: a forgery.
        let forger = auth("k1=another-secret-0000000000000000000");
        assert!(matches!(forger.verify(&t), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn rotation_two_keys_verify_and_the_first_signs() {
        let old = auth(K1);
        let rotated = auth(&format!("{K2},{K1}"));
        let before = old
            .issue("c", Role::Customer, Duration::from_secs(60))
            .unwrap();
        assert!(
            rotated.verify(&before).is_ok(),
            "the old key still verifies"
        );
        let after = rotated
            .issue("c", Role::Customer, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&after).unwrap().kid.as_deref(),
            Some("k2")
        );
        assert!(old.verify(&after).is_err(), "an unknown kid is refused");
        let retired = auth(K2);
        assert!(
            retired.verify(&before).is_err(),
            "a dropped key verifies nothing"
        );
    }

    #[test]
    fn issuer_audience_lifetime_and_algorithm_are_checked() {
        let a = auth(K1);
        let now = chrono::Utc::now().timestamp();
        let mut other_iss = claims(&a, now, now + 60);
        other_iss.iss = "someone-else".into();
        let mut other_aud = claims(&a, now, now + 60);
        other_aud.aud = "another-api".into();
        for (what, c) in [
            ("issuer", other_iss),
            ("audience", other_aud),
            ("expired", claims(&a, now - 7200, now - 3600)),
            ("lifetime above the cap", claims(&a, now, now + 13 * 3600)),
            ("issued in the future", claims(&a, now + 600, now + 1200)),
        ] {
            assert!(a.verify(&a.sign(&c)).is_err(), "{what} accepted");
        }
        assert!(a.verify(&a.sign(&claims(&a, now, now + 60))).is_ok());
        assert!(matches!(
            a.issue("c", Role::Customer, Duration::from_secs(13 * 3600)),
            Err(AuthSetupError::TtlAboveCap { .. })
        ));
        // `alg: none` and a token without a kid are refused.
        let body = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(&a, now, now + 60),
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert!(a.verify(&body).is_err(), "a token without a kid");
        let payload = body.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwia2lkIjoiazEifQ.{payload}.");
        assert!(a.verify(&none).is_err(), "alg none");
    }

    #[test]
    fn no_key_no_start_outside_development_mode() {
        let cfg = AuthConfig::default();
        let e = Authenticator::from_config(&cfg, false).err().unwrap();
        assert!(e.to_string().contains("JWT_KEYS_FILE"), "{e}");
        let dev = Authenticator::from_config(&cfg, true).unwrap();
        let t = dev
            .issue("c", Role::Customer, Duration::from_secs(60))
            .unwrap();
        assert!(dev.verify(&t).is_ok());
        let other_dev = Authenticator::from_config(&cfg, true).unwrap();
        assert!(
            other_dev.verify(&t).is_err(),
            "each process makes its own key"
        );
    }
}
