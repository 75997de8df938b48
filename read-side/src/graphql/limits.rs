//! Bounds on what one caller can make the GraphQL API do, checked before and around
//! execution: request body size, fields per document (aliases and fragments included), a
//! complexity that weighs list sizes (on the resolvers), a query timeout, WebSocket message
//! size and rate, open sockets (in all and per principal), and subscriptions per principal.
//!
//! Why here and not only in the schema: async-graphql limits depth and complexity, but a
//! document of 2,000 aliased cheap fields stays under both and still runs 2,000 resolvers;
//! a body is buffered before any of them is checked; and a subscription is a standing cost
//! that a single token could multiply without end.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_graphql::{
    ErrorExtensions, ServerError, ServerResult, Variables,
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery},
    parser::types::{ExecutableDocument, Selection, SelectionSet},
};

/// The limits, each configurable (docs/security.md lists them with their defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct GraphqlLimits {
    /// Largest GraphQL request body, in bytes (larger ones get 413).
    #[arg(id = "graphql_max_body_bytes", long = "graphql-max-body-bytes", env = "GRAPHQL_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Most selections one document may make once fragments are expanded (every field,
    /// alias and fragment spread counts).
    #[arg(
        id = "graphql_max_fields",
        long = "graphql-max-fields",
        env = "GRAPHQL_MAX_FIELDS",
        default_value_t = 200
    )]
    pub max_fields: usize,
    /// Most complexity one query may have: a field costs 1, a list field its page size
    /// (`first`) times its selection.
    #[arg(
        id = "graphql_max_complexity",
        long = "graphql-max-complexity",
        env = "GRAPHQL_MAX_COMPLEXITY",
        default_value_t = 1000
    )]
    pub max_complexity: usize,
    /// Longest a query or mutation may run before it is abandoned with `TIMEOUT`.
    #[arg(id = "graphql_query_timeout", long = "graphql-query-timeout", env = "GRAPHQL_QUERY_TIMEOUT", default_value = "10s", value_parser = platform::config::parse_duration)]
    pub query_timeout: Duration,
    /// Most subscriptions one principal may hold open at once (over all its connections).
    #[arg(
        id = "graphql_max_subscriptions",
        long = "graphql-max-subscriptions",
        env = "GRAPHQL_MAX_SUBSCRIPTIONS",
        default_value_t = 10
    )]
    pub max_subscriptions: usize,
    /// Most WebSocket connections the API holds open at once; more are refused with 503.
    #[arg(
        id = "graphql_max_sockets",
        long = "graphql-max-sockets",
        env = "GRAPHQL_MAX_SOCKETS",
        default_value_t = 1024
    )]
    pub max_sockets: usize,
    /// Most WebSocket connections one principal may hold open (checked at `connection_init`).
    #[arg(
        id = "graphql_max_sockets_per_caller",
        long = "graphql-max-sockets-per-caller",
        env = "GRAPHQL_MAX_SOCKETS_PER_CALLER",
        default_value_t = 8
    )]
    pub max_sockets_per_caller: usize,
    /// Messages per second one WebSocket connection may send, sustained (a burst of as many
    /// again is allowed); faster clients are slowed down, not dropped.
    #[arg(
        id = "graphql_ws_messages_per_second",
        long = "graphql-ws-messages-per-second",
        env = "GRAPHQL_WS_MESSAGES_PER_SECOND",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub ws_messages_per_second: u32,
    /// Largest WebSocket message (and frame) accepted, in bytes.
    #[arg(id = "graphql_max_ws_message_bytes", long = "graphql-max-ws-message-bytes", env = "GRAPHQL_MAX_WS_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_ws_message_bytes: usize,
    /// Serve the query console on GET /graphql (a page inside the binary, no external script).
    #[arg(id = "graphql_console", long = "graphql-console", env = "GRAPHQL_CONSOLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub console: bool,
}

impl Default for GraphqlLimits {
    fn default() -> Self {
        platform::config::defaults()
    }
}

/// The number of selections `doc` makes once every fragment spread is expanded where it is
/// used (each field, each spread, aliases and repeated fragments included), saturating at
/// `usize::MAX`. A fragment that spreads itself (directly or not) counts as unbounded.
///
/// Linear in the document: each fragment's expanded size is computed once and reused, so a
/// few hundred bytes of fragments that multiply each other cost nothing to count, and the
/// count says how much the executor (and async-graphql's own validation, which expands
/// fragments the same way) would walk.
pub fn fields_selected(doc: &ExecutableDocument) -> usize {
    let mut sizes = FragmentSizes {
        doc,
        done: HashMap::new(),
        visiting: Vec::new(),
    };
    doc.operations
        .iter()
        .map(|(_, op)| sizes.of_set(&op.node.selection_set.node))
        .fold(0, usize::saturating_add)
}

struct FragmentSizes<'a> {
    doc: &'a ExecutableDocument,
    done: HashMap<&'a str, usize>,
    /// Fragments being expanded (to refuse cycles).
    visiting: Vec<&'a str>,
}

impl<'a> FragmentSizes<'a> {
    fn of_set(&mut self, set: &'a SelectionSet) -> usize {
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(f) => {
                    1usize.saturating_add(self.of_set(&f.node.selection_set.node))
                }
                Selection::InlineFragment(f) => self.of_set(&f.node.selection_set.node),
                Selection::FragmentSpread(s) => {
                    1usize.saturating_add(self.of_fragment(s.node.fragment_name.node.as_str()))
                }
            })
            .fold(0, usize::saturating_add)
    }

    fn of_fragment(&mut self, name: &'a str) -> usize {
        if let Some(n) = self.done.get(name) {
            return *n;
        }
        if self.visiting.contains(&name) {
            return usize::MAX;
        }
        // An undefined fragment is refused by validation; here it is only its spread.
        let Some(fragment) = self.doc.fragments.get(name) else {
            return 0;
        };
        self.visiting.push(name);
        let n = self.of_set(&fragment.node.selection_set.node);
        self.visiting.pop();
        self.done.insert(name, n);
        n
    }
}

/// The schema extension that applies the document limit and the query timeout to every
/// operation, over HTTP and over WebSocket alike, before async-graphql validates the
/// document (its validation expands fragments too).
pub struct Bounds {
    pub max_fields: usize,
    pub query_timeout: Duration,
}

impl ExtensionFactory for Bounds {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(BoundsExtension {
            max_fields: self.max_fields,
            query_timeout: self.query_timeout,
        })
    }
}

struct BoundsExtension {
    max_fields: usize,
    query_timeout: Duration,
}

#[async_graphql::async_trait::async_trait]
impl Extension for BoundsExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        // Counted before async-graphql parses for itself: its parse step already walks every
        // fragment expansion (its recursion-depth check), exponentially for a fragment bomb.
        // A document that does not parse is left to it (it reports where).
        if let Ok(doc) = async_graphql::parser::parse_query(query) {
            let max = self.max_fields;
            if fields_selected(&doc) > max {
                return Err(refusal(
                    "TOO_MANY_FIELDS",
                    format!(
                        "a document may select at most {max} fields (aliases and fragment uses count)"
                    ),
                ));
            }
        }
        next.run(ctx, query, variables).await
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> async_graphql::Response {
        match tokio::time::timeout(self.query_timeout, next.run(ctx, operation_name)).await {
            Ok(response) => response,
            Err(_) => {
                metrics::counter!("graphql_timeouts_total").increment(1);
                async_graphql::Response::from_errors(vec![refusal(
                    "TIMEOUT",
                    format!(
                        "the query ran longer than {}s and was abandoned",
                        self.query_timeout.as_secs_f64()
                    ),
                )])
            }
        }
    }
}

fn refusal(code: &'static str, message: String) -> ServerError {
    async_graphql::Error::new(message)
        .extend_with(|_, e| e.set("code", code))
        .into_server_error(async_graphql::Pos::default())
}

/// Subscriptions held per principal (over all its connections).
pub type SubscriptionSlots = platform::limits::KeyedSlots;

/// One of `who`'s subscription slots, held by the subscription's stream (freed when it ends
/// or its connection goes); `LIMITED` when she holds the most allowed.
pub(super) fn subscription_slot(
    ctx: &async_graphql::Context<'_>,
    who: &platform::auth::Principal,
) -> async_graphql::Result<platform::limits::Slot> {
    ctx.data::<SubscriptionSlots>()?
        .acquire(&who.actor())
        .ok_or_else(|| {
            super::errors::error(
                "LIMITED",
                "this caller holds the most subscriptions allowed (GRAPHQL_MAX_SUBSCRIPTIONS)",
            )
        })
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;

    use super::*;

    #[test]
    fn aliases_fragment_uses_and_spreads_count_as_fields() {
        let count = |q: &str| fields_selected(&parse_query(q).unwrap());
        assert_eq!(count("{ a b { c d } }"), 4);
        let aliases: String = (0..2000).map(|i| format!("a{i}: order(id: 1) ")).collect();
        assert_eq!(count(&format!("{{ {aliases} }}")), 2000);
        // A fragment of 3 fields used 4 times: 4 fields + 4 spreads + 12 fields.
        let q = "{ x { ...F } y { ...F } z { ...F } w { ...F } } fragment F on T { a b c }";
        assert_eq!(count(q), 20);
        // Fragments that multiply each other are counted by what they expand to.
        let nest = "{ ...A } fragment A on Q { a1: x { ...B } a2: x { ...B } a3: x { ...B } }
                    fragment B on Q { b1: x { ...C } b2: x { ...C } b3: x { ...C } }
                    fragment C on Q { c1 c2 c3 c4 c5 c6 c7 c8 c9 c10 }";
        assert_eq!(count(nest), 1 + 3 * (2 + 3 * (2 + 10)));
        // A cycle is unbounded.
        assert_eq!(count("{ ...A } fragment A on Q { a { ...A } }"), usize::MAX);
    }

    /// 14 fragments each spreading the next ten times, the last spreading one that does not
    /// exist: ~10^14 spreads once expanded, counted at once (and refused), never walked.
    #[test]
    fn a_fragment_bomb_is_counted_without_being_expanded() {
        let mut q = String::from("{ ...F0 }");
        for i in 0..14 {
            let spreads: String = (0..10)
                .map(|j| format!("f{j}: x {{ ...F{} }} ", i + 1))
                .collect();
            q.push_str(&format!(" fragment F{i} on Q {{ {spreads} }}"));
        }
        q.push_str(" fragment F14 on Q { ...Missing }");
        // The walk would take days: finishing at all shows it was not walked.
        let n = fields_selected(&parse_query(&q).unwrap());
        assert!(n > 10usize.pow(14), "{n}");
    }
}
