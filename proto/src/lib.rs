//! The wire format of Switchyard: every `.proto` file lives beside this crate (in
//! `switchyard/v1/`) and its `build.rs` is the only protobuf code generation in the workspace.
//!
//! - `ExpertService` (expert nodes): a long-lived bidirectional `Dispatch` stream per router,
//!   plus `Health` and `Status`.
//! - `Router` (routers): server-streaming `Generate` and `ClusterStatus`.
//!
//! Tensors cross the wire as `bytes` with a dtype and a shape ([`v1::Tensor`]); [`tensor`]
//! converts them to and from `f32` rows and validates them.
//!
//! # Layout
//! - [`v1`]: the generated messages, clients and servers.
//! - [`tensor`]: `f32` rows ⇄ [`v1::Tensor`], with shape and dtype checks.
//! - [`server`]: what every gRPC server accepts (connection limit, handshake deadline,
//!   keepalives).
//! - [`tls`]: mutual TLS between the roles, and who may call what.
//! - [`probe`]: `/live` and `/ready` for orchestrators, and the same readiness as gRPC health.

pub mod probe;
pub mod server;
pub mod tensor;
pub mod tls;

/// An error with its sources, `outer: inner: …` (tonic's transport errors say only
/// "transport error" at the top).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let inner = s.to_string();
        if !text.contains(&inner) {
            text.push_str(": ");
            text.push_str(&inner);
        }
        source = s.source();
    }
    text
}

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// Most tokens one dispatch may carry; routers split larger steps. Sizes the gRPC message
/// limit on both ends (tonic's default of 4 MiB is too small for prompt-sized batches).
pub const MAX_DISPATCH_TOKENS: usize = 8192;

/// HTTP/2 flow-control windows of dispatch connections: large enough that a whole
/// prompt-sized dispatch is in flight without waiting for window updates (the 64 KiB default
/// stalls a decode batch of 16 tokens of width 1024 on every layer).
pub const DISPATCH_STREAM_WINDOW: u32 = 64 << 20;
pub const DISPATCH_CONNECTION_WINDOW: u32 = 128 << 20;

/// The largest dispatch or partial-sum message for a model `hidden` wide, with room for the
/// routes.
pub fn max_dispatch_message_bytes(hidden: usize) -> usize {
    MAX_DISPATCH_TOKENS * hidden * 4 + MAX_DISPATCH_TOKENS * 16 * 12 + (1 << 20)
}
