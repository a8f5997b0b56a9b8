//! The Switchyard expert node: loads the (layer, expert) weights placed on it and runs
//! them for the routers that dispatch activations to it.
//!
//! Not built yet: the expert code it will serve is `switchyard_model::moe`, which today
//! runs in-process.
//!
//! # Layout
//! (empty until expert dispatch lands)
