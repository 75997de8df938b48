//! Where each Kafka consumer of the read side is, in PostgreSQL: the next offset to apply per
//! (consumer, topic, partition) in `projection_checkpoints`.
//!
//! Moved in the same transaction as the read-model change of the messages before it, so a
//! message is applied exactly once however often Kafka delivers it; the Kafka offset commit
//! after it is only a hint ([`commit_offsets`]). Shared by the projectors, the analytics group
//! and the email group.

use futures::FutureExt as _;
use rdkafka::{
    Message as _, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer as _, StreamConsumer},
    error::KafkaError,
    message::OwnedMessage,
};
use sqlx::PgConnection;

/// The stored next offsets of `partitions` (those that have one), locked until the caller's
/// transaction ends.
pub async fn locked(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<(i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT partition, next_offset FROM projection_checkpoints
         WHERE projection = $1 AND topic = $2 AND partition = ANY($3) ORDER BY partition FOR UPDATE",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partitions)
    .fetch_all(&mut *conn)
    .await
}

/// Moves the checkpoints to the given next offsets (never backwards).
pub async fn advance(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    next: &[(i32, i64)],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset)
         SELECT $1, $2, p, o FROM unnest($3::int[], $4::bigint[]) AS x(p, o)
         ON CONFLICT (projection, topic, partition) DO UPDATE
             SET next_offset = GREATEST(projection_checkpoints.next_offset, EXCLUDED.next_offset), updated_at = now()",
    )
    .bind(consumer)
    .bind(topic)
    .bind(next.iter().map(|e| e.0).collect::<Vec<_>>())
    .bind(next.iter().map(|e| e.1).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `first` and whatever else has already arrived, up to `max` messages in all: a batch that
/// never waits for more.
pub fn with_arrived(
    consumer: &StreamConsumer,
    first: OwnedMessage,
    max: usize,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let mut batch = vec![first];
    while batch.len() < max {
        match consumer.recv().now_or_never() {
            Some(m) => batch.push(m?.detach()),
            None => break,
        }
    }
    Ok(batch)
}

/// Commits the Kafka offsets after `messages`, once their checkpoints are committed in
/// PostgreSQL. Only a hint for where a restarted consumer resumes: a failure is logged, and
/// a redelivery it causes is skipped by the checkpoints.
pub fn commit_offsets<'a>(
    consumer: &StreamConsumer,
    messages: impl IntoIterator<Item = &'a OwnedMessage>,
) -> Result<(), KafkaError> {
    let mut offsets = TopicPartitionList::new();
    for m in messages {
        offsets.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))?;
    }
    if let Err(e) = consumer.commit(&offsets, CommitMode::Async) {
        tracing::debug!(error = %e, "kafka offset commit failed");
    }
    Ok(())
}
