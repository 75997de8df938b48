//! Which spans a test's code opened, with the trace each one joined: a `tracing` layer that
//! keeps `(span name, trace_id)` for every span that records a `trace_id` field (see
//! `platform::trace`). Installed once per test binary as the global subscriber, together
//! with the OpenTelemetry layer that gives spans their trace contexts; spans from every
//! thread (the relay's, the saga's, the projector's tasks) land here.

use std::sync::{Mutex, OnceLock};

use tracing::{
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*, registry::LookupSpan};

static SEEN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the capturing subscriber (once; later calls do nothing).
pub fn capture() {
    INSTALLED.get_or_init(|| {
        let provider = platform::trace::provider();
        // Leaked on purpose: the provider must outlive every span of the test binary.
        let provider: &'static _ = Box::leak(Box::new(provider));
        tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::INFO)
            .with(platform::trace::layer(provider))
            .with(Capture)
            .try_init()
            .expect("no other global subscriber in this test binary");
    });
}

/// The names of the spans that joined `trace_id`, sorted and deduplicated.
pub fn in_trace(trace_id: &str) -> Vec<String> {
    let mut names: Vec<String> = SEEN
        .lock()
        .expect("spans lock")
        .iter()
        .filter(|(_, t)| t == trace_id)
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

struct Capture;

struct TraceId(Option<String>);

impl Visit for TraceId {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "trace_id" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "trace_id" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut v = TraceId(None);
        attrs.record(&mut v);
        if let (Some(t), Some(span)) = (v.0, ctx.span(id)) {
            SEEN.lock()
                .expect("spans lock")
                .push((span.name().to_owned(), t));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut v = TraceId(None);
        values.record(&mut v);
        if let (Some(t), Some(span)) = (v.0, ctx.span(id)) {
            SEEN.lock()
                .expect("spans lock")
                .push((span.name().to_owned(), t));
        }
    }
}
