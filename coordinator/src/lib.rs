//! The Switchyard coordinator: a raft group that owns cluster membership and the expert
//! placement (epochs of (layer, expert) → nodes), detects failed nodes and rebalances.
//!
//! Not built yet.
//!
//! # Layout
//! (empty until the coordinator lands)
