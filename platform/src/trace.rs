//! Spans that follow a message across processes: the W3C `traceparent` a checkout's HTTP
//! request carries (or the command API makes up) is stored with its events and copied into
//! every outbox row, Kafka and RabbitMQ message it causes. Each hop opens a span (HTTP
//! command, append, relay publish, projector apply, saga step, participant step) and makes
//! that traceparent its parent with [`follow`], so one checkout is one trace from the HTTP
//! request to the last saga step, and every log line inside carries its `trace_id` and
//! `span_id` (the JSON logs print the current span's fields).
//!
//! The span that receives a remote parent must not have been entered yet (OpenTelemetry
//! fixes a span's trace when it starts), so each hop creates its span, calls [`follow`],
//! then runs its work inside (`.instrument(span)`); spans below it are ordinary
//! `#[instrument]` spans in the same trace. Spans that want the ids in their log lines
//! declare `trace_id` and `span_id` empty; [`follow`] / [`record_ids`] fill them in.

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes the span described by `traceparent` the parent of `span` (nothing if there is
/// none or it is malformed: the span starts a trace of its own), and records the span's
/// `trace_id` and `span_id` fields.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return; // filtered out by the log level: nothing to join, nothing to record
    }
    if let Some(tp) = traceparent {
        let parent = TraceContextPropagator::new().extract(&Traceparent(tp));
        if parent.span().span_context().is_valid()
            && let Err(e) = span.set_parent(parent)
        {
            // A span already entered, or a subscriber without the OpenTelemetry layer.
            tracing::debug!(error = %e, "the span cannot join the message's trace");
        }
    }
    record_ids(span);
}

/// A carrier holding only a `traceparent` (no map allocated per message).
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Records `span`'s `trace_id` and `span_id` fields (a span inside a followed one is in its
/// trace already; this puts the ids in its log lines).
pub fn record_ids(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", sc.trace_id().to_string());
        span.record("span_id", sc.span_id().to_string());
    }
}

/// The trace id of `span` (32 hex digits), if it is in a trace.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The tracer provider of this process: spans get W3C ids and are sampled when their parent
/// was; nothing is exported (the ids travel in logs and messages). A deployment that wants
/// a collector adds an exporter here.
pub fn provider() -> SdkTracerProvider {
    SdkTracerProvider::builder().build()
}

/// The `tracing` layer that gives spans OpenTelemetry contexts from `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("shop"))
}
