//! One classification of failures for every role: transient, permanent or poison.
//!
//! Why one place: the supervisor decides from it whether a failed role is restarted (after a
//! backoff) or stops the process, and every role that retries by itself (the relay, the
//! projectors, the saga's consumers) asks the same question of the same error types. The
//! table in `docs/operations.md` mirrors [`classify`]; change both together.
//!
//! - **Transient**: the world may heal by itself (a broker or PostgreSQL restarting, a reset
//!   connection, a pool timeout, a lock or serialization conflict). Retry with backoff.
//! - **Permanent**: retrying the same thing cannot help and a person must act (bad
//!   configuration, wrong credentials, a missing database, a schema that does not match the
//!   code, a port already taken). Stop the process non-zero with a clear message.
//! - **Poison**: one message or row is bad (malformed data, a constraint it violates);
//!   retrying *it* cannot help, but the role can go on without it (dead-letter it).
//!
//! An error nobody recognises is transient: a restart with backoff is loud in the logs and
//! metrics and harmless, while stopping a checkout backend on a misjudged error is not.

use std::error::Error as StdError;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Permanent,
    Poison,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Poison => "poison",
        }
    }
}

/// A failure a role marks as permanent itself (e.g. invalid configuration it found at start).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

/// Marks `err` permanent: the supervisor stops the process instead of restarting the role.
pub fn permanent(err: anyhow::Error) -> anyhow::Error {
    let message = format!("{err:#}");
    err.context(Permanent(message))
}

/// The class of an error: the first cause in its chain that is recognised decides.
pub fn classify(err: &anyhow::Error) -> ErrorClass {
    if err.downcast_ref::<Permanent>().is_some() {
        return ErrorClass::Permanent;
    }
    err.chain()
        .find_map(classify_cause)
        .unwrap_or(ErrorClass::Transient)
}

/// The class of one error in a chain, when its type is known.
pub fn classify_cause(e: &(dyn StdError + 'static)) -> Option<ErrorClass> {
    if e.is::<Permanent>() {
        return Some(ErrorClass::Permanent);
    }
    if let Some(e) = e.downcast_ref::<sqlx::Error>() {
        return Some(classify_sqlx(e));
    }
    if let Some(e) = e.downcast_ref::<sqlx::migrate::MigrateError>() {
        return Some(classify_migrate(e));
    }
    if let Some(e) = e.downcast_ref::<KafkaError>() {
        return Some(classify_kafka(e));
    }
    if let Some(crate::kafka::KafkaSetupError::CreateTopic { code, .. }) =
        e.downcast_ref::<crate::kafka::KafkaSetupError>()
    {
        // The broker refused the topic as asked (partitions, replication, policy, rights):
        // asking again cannot help.
        use RDKafkaErrorCode as C;
        let refused = matches!(
            code,
            C::InvalidPartitions
                | C::InvalidReplicationFactor
                | C::InvalidReplicaAssignment
                | C::InvalidConfig
                | C::PolicyViolation
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
        );
        return Some(if refused {
            ErrorClass::Permanent
        } else {
            ErrorClass::Transient
        });
    }
    if let Some(e) = e.downcast_ref::<lapin::Error>() {
        return Some(classify_amqp(e));
    }
    if e.is::<clap::Error>() {
        return Some(ErrorClass::Permanent);
    }
    if let Some(e) = e.downcast_ref::<std::io::Error>() {
        return Some(classify_io(e));
    }
    None
}

/// PostgreSQL and its driver, by SQLSTATE class where there is one.
pub fn classify_sqlx(e: &sqlx::Error) -> ErrorClass {
    use sqlx::Error as E;
    match e {
        E::Configuration(_) => ErrorClass::Permanent,
        E::Migrate(m) => classify_migrate(m),
        E::Database(db) => classify_sqlstate(db.code().as_deref().unwrap_or("")),
        // A column or type the code expects is missing: the schema does not match the build.
        E::ColumnNotFound(_) | E::TypeNotFound { .. } | E::ColumnIndexOutOfBounds { .. } => {
            ErrorClass::Permanent
        }
        E::ColumnDecode { .. } | E::Decode(_) | E::Encode(_) => ErrorClass::Poison,
        E::Io(io) => classify_io(io),
        _ => ErrorClass::Transient,
    }
}

/// SQLSTATE classes: <https://www.postgresql.org/docs/current/errcodes-appendix.html>.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        // invalid authorization, invalid catalog (no such database), insufficient privilege,
        // undefined table/column/function: configuration or a schema that does not match.
        c if c.starts_with("28") || c == "3D000" || c == "42501" => ErrorClass::Permanent,
        "42P01" | "42703" | "42883" | "42704" => ErrorClass::Permanent,
        // A unique violation is mostly two writers racing (optimistic concurrency): a retry
        // sees the winner's row. Other integrity violations and data exceptions belong to
        // one input.
        "23505" => ErrorClass::Transient,
        c if c.starts_with("22") || c.starts_with("23") => ErrorClass::Poison,
        // connection exceptions, shutdown, cannot connect now, too many connections,
        // serialization failure, deadlock, lock not available, query cancelled (timeouts):
        // and anything else.
        _ => ErrorClass::Transient,
    }
}

pub fn classify_migrate(e: &sqlx::migrate::MigrateError) -> ErrorClass {
    use sqlx::migrate::MigrateError as M;
    match e {
        // Running a migration failed: a lost connection or a lock timeout is worth another
        // try; SQL the database refuses is not.
        M::Execute(e) | M::ExecuteMigration(e, _) => match classify_sqlx(e) {
            ErrorClass::Transient => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        },
        // A changed checksum, a dirty or unknown version: a person must look.
        _ => ErrorClass::Permanent,
    }
}

pub fn classify_kafka(e: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    let permanent_code = |c: &C| {
        matches!(
            c,
            C::InvalidConfig
                | C::Authentication
                | C::SaslAuthenticationFailed
                | C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
        )
    };
    // The broker refuses this message (too large, malformed, for a topic that does not
    // exist): sending it again cannot help, other messages can go on.
    let poison_code = |c: &C| {
        matches!(
            c,
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::InvalidRecord
                | C::InvalidTopic
        )
    };
    match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorClass::Permanent,
        _ => match e.rdkafka_error_code() {
            Some(c) if permanent_code(&c) => ErrorClass::Permanent,
            Some(c) if poison_code(&c) => ErrorClass::Poison,
            _ => ErrorClass::Transient,
        },
    }
}

pub fn classify_amqp(e: &lapin::Error) -> ErrorClass {
    use lapin::{
        ErrorKind as K,
        protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    };
    match e.kind() {
        K::InvalidProtocolVersion(_) | K::AuthProviderError(_) | K::NoDefaultRuntime => {
            ErrorClass::Permanent
        }
        K::ProtocolError(p) => match p.kind() {
            // Wrong credentials, no such vhost.
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::INVALIDPATH) => ErrorClass::Permanent,
            // CONNECTION_FORCED (the broker stopping), NOT_ALLOWED (a vhost restarting),
            // PRECONDITION_FAILED (also how RabbitMQ closes a channel on an ack timeout;
            // a queue declared with other arguments is marked permanent where it is
            // declared), resource errors, ...
            _ => ErrorClass::Transient,
        },
        K::IOError(io) => classify_io(io),
        _ => ErrorClass::Transient,
    }
}

/// I/O errors are transient: a refused or reset connection heals when the peer is back.
/// (Binding a listener to a taken port is permanent; `ops::serve` marks that itself, since
/// the same error kinds can come from an outbound connect.)
pub fn classify_io(_: &std::io::Error) -> ErrorClass {
    ErrorClass::Transient
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_loss_is_transient() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let e = anyhow::Error::from(sqlx::Error::Io(io)).context("loading a page");
        assert_eq!(classify(&e), ErrorClass::Transient);
        let e = anyhow::Error::from(KafkaError::MessageConsumption(
            RDKafkaErrorCode::BrokerTransportFailure,
        ));
        assert_eq!(classify(&e), ErrorClass::Transient);
        assert_eq!(
            classify(&anyhow::Error::from(sqlx::Error::PoolTimedOut)),
            ErrorClass::Transient
        );
    }

    #[test]
    fn configuration_and_schema_are_permanent() {
        let e = anyhow::Error::from(sqlx::migrate::MigrateError::VersionMismatch(3))
            .context("applying migrations");
        assert_eq!(classify(&e), ErrorClass::Permanent);
        assert_eq!(classify_sqlstate("28P01"), ErrorClass::Permanent);
        assert_eq!(classify_sqlstate("42P01"), ErrorClass::Permanent);
        let reset = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
        assert_eq!(classify(&anyhow::Error::from(reset)), ErrorClass::Transient);
        let interrupted =
            sqlx::migrate::MigrateError::ExecuteMigration(sqlx::Error::PoolTimedOut, 3);
        assert_eq!(
            classify(&anyhow::Error::from(interrupted)),
            ErrorClass::Transient
        );
        let marked = permanent(anyhow::anyhow!("JWT_SECRET is too short"));
        assert_eq!(classify(&marked), ErrorClass::Permanent);
        assert_eq!(
            classify(&marked.context("starting the command api")),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn a_topic_the_broker_refuses_is_permanent() {
        let refused = crate::kafka::KafkaSetupError::CreateTopic {
            topic: "orders.events".into(),
            code: RDKafkaErrorCode::InvalidReplicationFactor,
        };
        assert_eq!(
            classify(&anyhow::Error::from(refused)),
            ErrorClass::Permanent
        );
        let busy = crate::kafka::KafkaSetupError::CreateTopic {
            topic: "orders.events".into(),
            code: RDKafkaErrorCode::RequestTimedOut,
        };
        assert_eq!(classify(&anyhow::Error::from(busy)), ErrorClass::Transient);
    }

    #[test]
    fn bad_data_is_poison_and_unknown_is_transient() {
        assert_eq!(classify_sqlstate("22P02"), ErrorClass::Poison);
        assert_eq!(classify_sqlstate("23514"), ErrorClass::Poison);
        assert_eq!(classify_sqlstate("23505"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("40001"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("57P01"), ErrorClass::Transient);
        assert_eq!(
            classify(&anyhow::anyhow!("something odd")),
            ErrorClass::Transient
        );
    }
}
