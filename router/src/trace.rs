//! Joining a caller's trace: a request that carries a W3C `traceparent` (HTTP header or gRPC
//! metadata) gets its span parented under the caller's span.

use std::collections::HashMap;

use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Parents `span` under the trace context `get` finds (`traceparent`, `tracestate`), if any.
pub fn join_caller(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    let carrier: HashMap<String, String> =
        ["traceparent", "tracestate"].into_iter().filter_map(|k| Some((k.to_string(), get(k)?))).collect();
    if !carrier.is_empty() {
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        let _ = span.set_parent(parent);
    }
}
