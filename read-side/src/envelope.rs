//! The envelope every order event travels in is the event store's one
//! [`Envelope`](event_store::Envelope) (`schemas/envelope.v1.json`); the read side adds
//! what it needs of it: parsing a Kafka message into one, and decoding its payload into the
//! order event, each failure typed (a poison message's class in the dead letters).

use domain::{order::OrderEvent, wire};

pub use event_store::Envelope;

/// Why a message could not be turned into a domain event (a poison message).
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("undecodable envelope: {0}")]
    Undecodable(#[from] serde_json::Error),
    #[error(transparent)]
    Event(#[from] wire::DecodeError),
}

/// The envelope in a message's value.
pub fn parse(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    Ok(Envelope::parse(bytes)?)
}

/// An envelope's payload as the order event it carries.
pub trait OrderEnvelope {
    /// The domain event, upcast to the newest version of its type.
    fn event(&self) -> Result<OrderEvent, EnvelopeError>;
}

impl OrderEnvelope for Envelope {
    fn event(&self) -> Result<OrderEvent, EnvelopeError> {
        Ok(wire::decode(
            &self.event_type,
            self.schema_version,
            &self.payload,
        )?)
    }
}
