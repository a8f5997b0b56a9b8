//! The Switchyard router: takes requests (OpenAI HTTP, gRPC), tokenizes them, schedules
//! them into batches, runs the dense part of the model and dispatches each token's
//! activations to the expert nodes that hold its experts.
//!
//! Not built yet: today the whole model runs in one process through
//! `switchyard_model::Engine`, which this crate will drive with a remote expert dispatcher.
//!
//! # Layout
//! (empty until expert dispatch lands)
