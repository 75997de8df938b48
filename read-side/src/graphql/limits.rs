//! Bounds on what one caller can make the GraphQL API do, checked before and around
//! execution: request body size, fields per document (aliases and fragments included), a
//! complexity that weighs list sizes (on the resolvers), a query timeout, WebSocket message
//! size, and subscriptions per principal.
//!
//! Why here and not only in the schema: async-graphql limits depth and complexity, but a
//! document of 2,000 aliased cheap fields stays under both and still runs 2,000 resolvers;
//! a body is buffered before any of them is checked; and a subscription is a standing cost
//! that a single token could multiply without end.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};

/// The limits, each configurable (docs/security.md lists them with their defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct GraphqlLimits {
    /// Largest GraphQL request body, in bytes (larger ones get 413).
    #[arg(id = "graphql_max_body_bytes", long = "graphql-max-body-bytes", env = "GRAPHQL_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Most fields one document may select, counting every alias and every fragment use.
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

/// How deep fragment spreads may nest while counting (validation refuses cycles later; this
/// only keeps the count itself bounded).
const MAX_FRAGMENT_NESTING: usize = 16;

/// The number of fields `doc` selects, fragments expanded where they are used, counted up to
/// `cap + 1` at most (so a hostile document costs at most that much counting).
pub fn fields_selected(doc: &ExecutableDocument, cap: usize) -> usize {
    let mut count = 0;
    for (_, op) in doc.operations.iter() {
        count_set(doc, &op.node.selection_set.node, 0, cap, &mut count);
    }
    count
}

fn count_set(
    doc: &ExecutableDocument,
    set: &SelectionSet,
    nesting: usize,
    cap: usize,
    count: &mut usize,
) {
    for item in &set.items {
        if *count > cap {
            return;
        }
        match &item.node {
            Selection::Field(f) => {
                *count += 1;
                count_set(doc, &f.node.selection_set.node, nesting, cap, count);
            }
            Selection::InlineFragment(f) => {
                count_set(doc, &f.node.selection_set.node, nesting, cap, count);
            }
            Selection::FragmentSpread(s) => {
                if nesting >= MAX_FRAGMENT_NESTING {
                    *count = cap + 1;
                    return;
                }
                if let Some(frag) = doc.fragments.get(&s.node.fragment_name.node) {
                    count_set(doc, &frag.node.selection_set.node, nesting + 1, cap, count);
                }
            }
        }
    }
}

/// Open subscriptions per principal, shared by every connection of the API.
#[derive(Clone, Default)]
pub struct SubscriptionSlots {
    open: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

/// One open subscription; dropping it (the stream ends or the client goes) frees the slot.
pub struct Slot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    who: String,
}

impl SubscriptionSlots {
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// A slot for `who`, or `None` when it already holds the maximum.
    pub fn acquire(&self, who: &str) -> Option<Slot> {
        let mut open = self.open.lock().expect("slots lock");
        let n = open.entry(who.to_owned()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            open: self.open.clone(),
            who: who.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("slots lock");
        if let Some(n) = open.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.who);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;

    use super::*;

    #[test]
    fn aliases_and_fragment_uses_count_as_fields() {
        let count = |q: &str| fields_selected(&parse_query(q).unwrap(), 10_000);
        assert_eq!(count("{ a b { c d } }"), 4);
        let aliases: String = (0..2000).map(|i| format!("a{i}: order(id: 1) ")).collect();
        assert_eq!(count(&format!("{{ {aliases} }}")), 2000);
        // A fragment of 3 fields used 4 times is 12 fields, plus the 4 fields using it.
        let q = "{ x { ...F } y { ...F } z { ...F } w { ...F } } fragment F on T { a b c }";
        assert_eq!(count(q), 16);
        // Nested fragments multiply; the count stops just past the cap.
        let nest = "{ ...A } fragment A on Q { a1: x { ...B } a2: x { ...B } a3: x { ...B } }
                    fragment B on Q { b1: x { ...C } b2: x { ...C } b3: x { ...C } }
                    fragment C on Q { c1 c2 c3 c4 c5 c6 c7 c8 c9 c10 }";
        assert_eq!(
            fields_selected(&parse_query(nest).unwrap(), 10_000),
            3 + 9 + 90
        );
        assert_eq!(fields_selected(&parse_query(nest).unwrap(), 50), 51);
        // A cycle (invalid, refused by validation later) still ends.
        let cycle = "{ ...A } fragment A on Q { a { ...A } }";
        assert!(fields_selected(&parse_query(cycle).unwrap(), 200) > 0);
    }

    #[test]
    fn subscription_slots_are_per_principal_and_freed_on_drop() {
        let slots = SubscriptionSlots::new(2);
        let a1 = slots.acquire("customer:a").unwrap();
        let _a2 = slots.acquire("customer:a").unwrap();
        assert!(slots.acquire("customer:a").is_none());
        assert!(
            slots.acquire("customer:b").is_some(),
            "others are not affected"
        );
        drop(a1);
        assert!(slots.acquire("customer:a").is_some());
    }
}
