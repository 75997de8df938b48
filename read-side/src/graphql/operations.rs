//! Operating the read side over GraphQL, for operators: `projections` (versions, positions,
//! lag, rebuilds), `rebuildProjection`, and replaying or discarding dead letters.
//!
//! Only GraphQL types and resolvers; the work is done by [`crate::status`],
//! [`crate::rebuild`] and [`crate::dead_letters`].

use async_graphql::{Context, Enum, ID, Object, SimpleObject};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    access::operator,
    errors::{error, internal},
};
use crate::{
    dead_letters,
    rebuild::{self, RebuildError},
    status::{self, Watermarks},
};

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(rename_items = "SCREAMING_SNAKE_CASE")]
pub enum ProjectionState {
    Live,
    Rebuilding,
    /// A rebuild stopped (crash or error); rebuilding again resumes it.
    RebuildInterrupted,
}

#[derive(SimpleObject)]
pub struct RebuildProgress {
    pub version: i32,
    pub processed: i64,
    pub total: i64,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

#[derive(SimpleObject)]
pub struct Projection {
    pub name: String,
    /// The active version of its tables.
    pub version: i32,
    pub state: ProjectionState,
    /// Sum of the next offsets to apply over the topic's partitions.
    pub position: i64,
    /// Messages in the topic beyond `position`; `null` when the brokers are not reachable.
    pub lag: Option<i64>,
    /// Partitions whose next offset is below the oldest one Kafka still holds: events this
    /// projection never applied were deleted by retention. Rebuild it from the event store.
    /// `null` when the brokers are not reachable.
    pub partitions_behind_retention: Option<i64>,
    pub rebuild: Option<RebuildProgress>,
    pub last_rebuilt_at: Option<DateTime<Utc>>,
}

impl From<status::ProjectionStatus> for Projection {
    fn from(p: status::ProjectionStatus) -> Self {
        Self {
            name: p.name.to_owned(),
            version: p.version,
            state: match p.state {
                status::State::Live => ProjectionState::Live,
                status::State::Rebuilding => ProjectionState::Rebuilding,
                status::State::RebuildInterrupted => ProjectionState::RebuildInterrupted,
            },
            position: p.position,
            lag: p.lag,
            partitions_behind_retention: p.behind_retention,
            rebuild: p.rebuild.map(|r| RebuildProgress {
                version: r.version,
                processed: r.processed,
                total: r.total,
                started_at: r.started_at,
                updated_at: r.updated_at,
                error: r.error,
            }),
            last_rebuilt_at: p.last_rebuilt_at,
        }
    }
}

#[derive(SimpleObject)]
pub struct DeadLetterResolution {
    pub id: ID,
    pub status: String,
    /// Events that were parked behind the dead letter and are now applied.
    pub released: i64,
}

async fn projection_status(
    ctx: &Context<'_>,
    name: &str,
) -> async_graphql::Result<Option<Projection>> {
    let pool = ctx.data::<PgPool>()?;
    let all = status::all(pool, ctx.data_opt::<Watermarks>())
        .await
        .map_err(internal)?;
    Ok(all.into_iter().find(|p| p.name == name).map(Into::into))
}

/// The operators' queries, merged into the schema's `QueryRoot`.
#[derive(Default)]
pub struct OperationsQuery;

#[Object]
impl OperationsQuery {
    /// Every projection: active version, position, lag and any rebuild. Operators only.
    async fn projections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Projection>> {
        operator(ctx, "projection status")?;
        let pool = ctx.data::<PgPool>()?;
        Ok(status::all(pool, ctx.data_opt::<Watermarks>())
            .await
            .map_err(internal)?
            .into_iter()
            .map(Into::into)
            .collect())
    }
}

/// The operators' mutations, the schema's `MutationRoot`.
#[derive(Default)]
pub struct OperationsMutation;

#[Object]
impl OperationsMutation {
    /// Starts rebuilding a projection from the event store in the background (or resumes an
    /// interrupted rebuild) and returns its status; progress shows in `projections`.
    /// `analytics` is rebuilt by replaying its Kafka topics from offset 0 instead.
    /// `CONFLICT` if a rebuild of it is already running. Operators only.
    async fn rebuild_projection(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Projection> {
        operator(ctx, "rebuilding")?;
        let pool = ctx.data::<PgPool>()?;
        let name = match rebuild::request(pool, &name, false).await {
            Ok(_) => name,
            Err(e @ RebuildError::Unknown(_)) => {
                return Err(error("BAD_USER_INPUT", e.to_string()));
            }
            Err(e @ RebuildError::AlreadyRunning(_)) => {
                return Err(error("CONFLICT", e.to_string()));
            }
            Err(e) => {
                tracing::error!(error = %e, "starting a rebuild failed");
                return Err(error("INTERNAL", "the rebuild could not start"));
            }
        };
        projection_status(ctx, &name)
            .await?
            .ok_or_else(|| error("INTERNAL", "the projection has no status row"))
    }

    /// Re-applies a dead letter from the event store and releases the events parked behind it.
    async fn replay_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<DeadLetterResolution> {
        resolve_dead_letter(ctx, id, true).await
    }

    /// Gives up on a dead letter and releases the events parked behind it.
    async fn discard_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<DeadLetterResolution> {
        resolve_dead_letter(ctx, id, false).await
    }
}

async fn resolve_dead_letter(
    ctx: &Context<'_>,
    id: ID,
    replay: bool,
) -> async_graphql::Result<DeadLetterResolution> {
    operator(ctx, "handling dead letters")?;
    let n: i64 = id.parse().map_err(|_| {
        error(
            "BAD_USER_INPUT",
            format!("`{}` is not a dead-letter id", id.as_str()),
        )
    })?;
    let pool = ctx.data::<PgPool>()?;
    let result = if replay {
        dead_letters::replay(pool, n).await
    } else {
        dead_letters::discard(pool, n).await
    };
    match result {
        Ok(released) => Ok(DeadLetterResolution {
            id,
            status: if replay { "replayed" } else { "discarded" }.to_owned(),
            released: released as i64,
        }),
        Err(e @ dead_letters::ResolveError::NotOpen(_)) => {
            Err(error("BAD_USER_INPUT", e.to_string()))
        }
        Err(e @ dead_letters::ResolveError::StillFailing { .. }) => {
            Err(error("CONFLICT", e.to_string()))
        }
        Err(e) => {
            tracing::error!(error = %e, "resolving a dead letter failed");
            Err(error("INTERNAL", "the dead letter could not be resolved"))
        }
    }
}
