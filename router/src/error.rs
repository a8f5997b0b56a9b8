//! Errors of the router.

use std::time::Duration;

use switchyard_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Config(String),
    #[error("expert nodes not reachable within {}s: {nodes}", wait.as_secs())]
    NodesUnreachable { wait: Duration, nodes: String },
    #[error("layer {layer} expert {expert} is held by no expert node; every expert needs at least one")]
    Uncovered { layer: usize, expert: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
