//! Logs and traces. Logs go to stderr through `tracing` (filtered by `SWITCHYARD_LOG`). With
//! `--otlp-endpoint http://HOST:PORT`, spans are also exported to an OpenTelemetry collector
//! over OTLP/HTTP (JSON encoding, `POST /v1/traces`), each process under its own service name,
//! and the W3C trace context is propagated to expert nodes inside every dispatch.

use std::io::{IsTerminal, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Result, bail};
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde_json::{Value as Json, json};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the span exporter running; flushes it when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: could not flush traces: {e}");
        }
    }
}

/// Sets up logging, and span export to `otlp` (if given) as service `service`.
pub fn init(service: &str, otlp: Option<&str>) -> Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("warn")));
    let Some(endpoint) = otlp else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = OtlpJson::new(endpoint)?;
    let resource = Resource::builder_empty().with_service_name(service.to_string()).build();
    let provider = SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchyard"))
        .with_filter(EnvFilter::new("info,h2=off,hyper=off,tonic=off,tower=off"));
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Telemetry { provider: Some(provider) })
}

/// An OTLP/HTTP exporter with the JSON encoding, over plain HTTP/1.1.
#[derive(Debug)]
struct OtlpJson {
    host: String,
    path: String,
    resource: Vec<KeyValue>,
}

impl OtlpJson {
    fn new(endpoint: &str) -> Result<Self> {
        let Some(rest) = endpoint.strip_prefix("http://") else {
            bail!("--otlp-endpoint must be an http:// URL (OTLP/HTTP), got {endpoint}");
        };
        let (host, base) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let path = format!("/{}/v1/traces", base.trim_end_matches('/')).replace("//", "/");
        Ok(OtlpJson { host: host.to_string(), path, resource: Vec::new() })
    }

    fn post(&self, body: &[u8]) -> std::io::Result<u16> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&self.host)?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("cannot resolve {}", self.host)))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            body.len()
        )?;
        s.write_all(body)?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        let status = std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok(status)
    }
}

fn any_value(v: &Value) -> Json {
    match v {
        Value::Bool(b) => json!({"boolValue": b}),
        Value::I64(i) => json!({"intValue": i.to_string()}),
        Value::F64(f) => json!({"doubleValue": f}),
        other => json!({"stringValue": other.to_string()}),
    }
}

fn attributes(kvs: &[KeyValue]) -> Json {
    kvs.iter().map(|kv| json!({"key": kv.key.as_str(), "value": any_value(&kv.value)})).collect()
}

fn nanos(t: std::time::SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()).to_string()
}

fn span_json(s: &SpanData) -> Json {
    let kind = match s.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    let parent = if s.parent_span_id == opentelemetry::trace::SpanId::INVALID {
        String::new()
    } else {
        s.parent_span_id.to_string()
    };
    json!({
        "traceId": s.span_context.trace_id().to_string(),
        "spanId": s.span_context.span_id().to_string(),
        "parentSpanId": parent,
        "name": s.name,
        "kind": kind,
        "startTimeUnixNano": nanos(s.start_time),
        "endTimeUnixNano": nanos(s.end_time),
        "attributes": attributes(&s.attributes),
    })
}

impl SpanExporter for OtlpJson {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let body = json!({"resourceSpans": [{
            "resource": {"attributes": attributes(&self.resource)},
            "scopeSpans": [{"scope": {"name": "switchyard"}, "spans": batch.iter().map(span_json).collect::<Vec<_>>()}],
        }]});
        match self.post(body.to_string().as_bytes()) {
            Ok(200..=299) => Ok(()),
            Ok(status) => Err(OTelSdkError::InternalFailure(format!("OTLP endpoint answered {status}"))),
            Err(e) => Err(OTelSdkError::InternalFailure(format!("OTLP export to {}: {e}", self.host))),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
    }
}
