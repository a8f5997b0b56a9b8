//! The wire format of Switchyard: every `.proto` file lives beside this crate and its
//! `build.rs` is the only protobuf code generation in the workspace.
//!
//! Nothing crosses a process boundary yet: the single-process engine (`switchyard generate`)
//! is the only way to run a model today, so this crate defines no messages so far. The
//! expert-dispatch service (router ↔ expert node) and the coordinator's raft transport are
//! the first services it will hold.
//!
//! # Layout
//! (empty until the first service lands)
