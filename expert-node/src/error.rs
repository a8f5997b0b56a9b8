//! Errors of the expert node, and their one mapping to gRPC statuses.

use switchyard_model::ModelError;
use switchyard_proto::tensor::TensorError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid --experts: {0}")]
    Placement(String),
    #[error(
        "the placement needs {needed} bytes of expert weights ({experts} experts) but --memory-budget is {budget} bytes"
    )]
    OverBudget { needed: usize, budget: usize, experts: usize },
    #[error("the placement holds no expert of this model")]
    EmptyPlacement,
    #[error("dispatch {id}: {source}")]
    BadTensor { id: u64, source: TensorError },
    #[error("dispatch {id}: layer {layer} does not exist: the model has {layers} layers")]
    UnknownLayer { id: u64, layer: u32, layers: usize },
    #[error("dispatch {id}: layer {layer} is dense and has no experts")]
    DenseLayer { id: u64, layer: u32 },
    #[error("dispatch {id}: {message}")]
    BadRoutes { id: u64, message: String },
    #[error("dispatch {id}: this node does not hold layer {layer} expert {expert} (epoch {epoch})")]
    NotHeld { id: u64, layer: u32, expert: u32, epoch: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the expert node is shutting down")]
    ShuttingDown,
    #[error("--device: {0}")]
    Device(String),
}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        match e {
            NodeError::BadTensor { .. }
            | NodeError::UnknownLayer { .. }
            | NodeError::DenseLayer { .. }
            | NodeError::BadRoutes { .. } => tonic::Status::invalid_argument(message),
            NodeError::NotHeld { .. } => tonic::Status::not_found(message),
            NodeError::ShuttingDown => tonic::Status::unavailable(message),
            NodeError::Model(_)
            | NodeError::Placement(_)
            | NodeError::OverBudget { .. }
            | NodeError::EmptyPlacement
            | NodeError::Device(_)
            | NodeError::Io(_) => tonic::Status::internal(message),
        }
    }
}
