//! Sending one email through SMTP (lettre), with each failure classified, and the circuit
//! breaker that pauses the group during an SMTP outage instead of failing every email.
//!
//! Classification:
//! - [`SendError::Permanent`]: the server refused for good (5xx, e.g. an unknown mailbox) or
//!   the message cannot be sent at all (an address lettre cannot use, a feature the server
//!   lacks): that email is recorded dead.
//! - [`SendError::Deferred`]: the server answered 4xx for this message (a full mailbox,
//!   greylisting): retried with backoff a few times, then recorded dead, so one recipient
//!   cannot hold the others.
//! - [`SendError::Unavailable`]: no answer (connection refused, a timeout): the server is
//!   down; the same email is tried again, never skipped, and the circuit breaker counts it.
//!
//! Error texts keep the SMTP code and drop the server's words, which usually repeat the
//! recipient's address (personal data) into logs and `/readyz`.

use std::time::{Duration, Instant};

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, header::ContentType},
};

/// How the group reaches its SMTP server and signs its emails.
#[derive(Debug, Clone, clap::Args)]
pub struct MailerConfig {
    /// The SMTP server (`smtp://host:port`; no TLS: a relay on the same host or network).
    #[arg(long, env = "SMTP_URL", default_value = "smtp://127.0.0.1:2525")]
    pub smtp_url: String,
    /// The sender of every email.
    #[arg(long, env = "EMAIL_FROM", default_value = "Shop <orders@shop.test>")]
    pub email_from: String,
    /// Longest one SMTP exchange may take.
    #[arg(long, env = "EMAIL_SEND_TIMEOUT", default_value = "10s", value_parser = platform::config::parse_duration)]
    pub email_send_timeout: Duration,
    /// First retry delay of a transient failure; doubles up to 30 s.
    #[arg(long, env = "EMAIL_RETRY_BASE", default_value = "500ms", value_parser = platform::config::parse_duration)]
    pub email_retry_base: Duration,
    /// Times one email may be deferred by the server (4xx) before it is recorded dead.
    #[arg(long, env = "EMAIL_MAX_DEFERRALS", default_value_t = 8)]
    pub email_max_deferrals: u32,
    /// Consecutive transient failures that open the circuit (pause the group).
    #[arg(long, env = "EMAIL_BREAKER_AFTER", default_value_t = 5)]
    pub email_breaker_after: u32,
    /// How long an open circuit waits before one email tries the server again.
    #[arg(long, env = "EMAIL_BREAKER_COOLDOWN", default_value = "30s", value_parser = platform::config::parse_duration)]
    pub email_breaker_cooldown: Duration,
}

impl Default for MailerConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("refused for good: {0}")]
    Permanent(String),
    #[error("deferred by the server: {0}")]
    Deferred(String),
    #[error("the server is unavailable: {0}")]
    Unavailable(String),
}

/// What is safe to record of an SMTP failure: its code and class, not the server's text.
fn describe(e: &lettre::transport::smtp::Error) -> String {
    match e.status() {
        Some(code) => format!("SMTP {code}"),
        None if e.is_timeout() => "timed out".into(),
        None if e.is_client() => "not sendable to this server".into(),
        None => "no connection to the SMTP server".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MailerSetupError {
    #[error("SMTP_URL must look like smtp://host:port")]
    Url,
    #[error("EMAIL_FROM is not a mailbox: {0}")]
    From(String),
}

/// One email to send.
pub struct Email<'a> {
    pub to_name: &'a str,
    pub to: &'a str,
    /// Without angle brackets: `<id>` is added.
    pub message_id: String,
    pub subject: &'a str,
    pub body: String,
}

#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(cfg: &MailerConfig) -> Result<Self, MailerSetupError> {
        let url = url::Url::parse(&cfg.smtp_url).map_err(|_| MailerSetupError::Url)?;
        let host = url.host_str().ok_or(MailerSetupError::Url)?;
        if url.scheme() != "smtp" {
            return Err(MailerSetupError::Url);
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(url.port().unwrap_or(25))
            .timeout(Some(cfg.email_send_timeout))
            .build();
        let from = cfg
            .email_from
            .parse()
            .map_err(|e: lettre::address::AddressError| MailerSetupError::From(e.to_string()))?;
        Ok(Self { transport, from })
    }

    pub async fn send(&self, email: Email<'_>) -> Result<(), SendError> {
        let to: Mailbox = match email.to.parse::<lettre::Address>() {
            Ok(a) => Mailbox::new(Some(email.to_name.to_owned()), a),
            Err(_) => return Err(SendError::Permanent("unusable address".into())),
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject)
            .message_id(Some(format!("<{}>", email.message_id)))
            .header(ContentType::TEXT_PLAIN)
            .body(email.body)
            .map_err(|e| SendError::Permanent(format!("cannot build the message: {e}")))?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() || e.is_client() => Err(SendError::Permanent(describe(&e))),
            Err(e) if e.is_transient() => Err(SendError::Deferred(describe(&e))),
            Err(e) => Err(SendError::Unavailable(describe(&e))),
        }
    }
}

/// Consecutive transient failures, and whether the circuit is open.
#[derive(Debug)]
pub struct Breaker {
    after: u32,
    cooldown: Duration,
    failures: u32,
    opened_at: Option<Instant>,
}

impl Breaker {
    pub fn new(after: u32, cooldown: Duration) -> Self {
        Self {
            after: after.max(1),
            cooldown,
            failures: 0,
            opened_at: None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.opened_at.is_some()
    }

    /// A success closes the circuit.
    pub fn success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
    }

    /// A transient failure; returns how long to wait before the next attempt: the backoff
    /// while closed, the cooldown once open.
    pub fn failure(&mut self, base: Duration) -> Duration {
        self.failures += 1;
        if self.failures >= self.after {
            self.opened_at = Some(Instant::now());
            return self.cooldown;
        }
        base.saturating_mul(2u32.saturating_pow(self.failures - 1))
            .min(Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_circuit_opens_after_consecutive_failures_and_a_success_closes_it() {
        let mut b = Breaker::new(3, Duration::from_secs(30));
        let base = Duration::from_millis(100);
        assert_eq!(b.failure(base), Duration::from_millis(100));
        assert_eq!(b.failure(base), Duration::from_millis(200));
        assert!(!b.is_open());
        assert_eq!(b.failure(base), Duration::from_secs(30));
        assert!(b.is_open());
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.failure(base), Duration::from_millis(100));
    }

    #[test]
    fn a_bad_smtp_url_or_sender_is_refused_at_start() {
        let cfg = |url: &str, from: &str| MailerConfig {
            smtp_url: url.into(),
            email_from: from.into(),
            ..MailerConfig::default()
        };
        assert!(Mailer::new(&cfg("smtp://127.0.0.1:2525", "Shop <orders@shop.test>")).is_ok());
        assert!(Mailer::new(&cfg("http://127.0.0.1", "orders@shop.test")).is_err());
        assert!(Mailer::new(&cfg("smtp://127.0.0.1:2525", "not an address")).is_err());
    }
}
