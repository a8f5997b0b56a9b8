//! Errors of the expert node, and their one mapping to gRPC statuses.
//!
//! The status code tells a router what to do: `INVALID_ARGUMENT` — the dispatch itself is
//! wrong, fail the step; `NOT_FOUND` — this node does not hold the expert (any more), and
//! `RESOURCE_EXHAUSTED` — the device is out of memory for this dispatch: send the work to
//! another replica; `UNAVAILABLE` — the node is going away or has failed: take it out.

use switchyard_kernels::KernelError;
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
    #[error("{0}")]
    Tls(String),
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
    /// The compute thread stopped after a panic or a device fault; the node no longer serves.
    #[error("the expert node failed and no longer serves: {0}")]
    Failed(String),
}

impl From<KernelError> for NodeError {
    fn from(e: KernelError) -> Self {
        NodeError::Model(ModelError::Kernel(e))
    }
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
            NodeError::ShuttingDown | NodeError::Failed(_) => tonic::Status::unavailable(message),
            NodeError::Model(m) => match m {
                ModelError::Kernel(k) if k.is_out_of_memory() => tonic::Status::resource_exhausted(message),
                ModelError::ExpertUnavailable { .. } => tonic::Status::not_found(message),
                ModelError::InvalidRequest(_) | ModelError::TokenOutOfRange { .. } => {
                    tonic::Status::invalid_argument(message)
                }
                ModelError::Kernel(_)
                | ModelError::Io { .. }
                | ModelError::NotACheckpoint { .. }
                | ModelError::InvalidJson { .. }
                | ModelError::Config { .. }
                | ModelError::UnsupportedArchitecture(_)
                | ModelError::UnsupportedOnDevice { .. }
                | ModelError::Safetensors { .. }
                | ModelError::MissingTensor(_)
                | ModelError::ShapeMismatch { .. }
                | ModelError::QuantizedShape { .. }
                | ModelError::UndeclaredQuantization { .. }
                | ModelError::UnsupportedDtype { .. }
                | ModelError::UnsupportedQuantization(_)
                | ModelError::Tokenizer(_)
                | ModelError::PromptTooLong { .. }
                | ModelError::Dispatch { .. }
                | ModelError::NonFinite { .. }
                | ModelError::NonFiniteTensor { .. }
                | ModelError::KvCacheFull { .. } => tonic::Status::internal(message),
            },
            NodeError::Placement(_)
            | NodeError::OverBudget { .. }
            | NodeError::EmptyPlacement
            | NodeError::Io(_)
            | NodeError::Tls(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_tell_the_router_what_to_do() {
        let oom =
            KernelError::OutOfMemory { op: "linear", device: switchyard_kernels::Device::Cuda(0), bytes: 1 << 30 };
        assert_eq!(tonic::Status::from(NodeError::from(oom)).code(), tonic::Code::ResourceExhausted);
        let held = NodeError::NotHeld { id: 1, layer: 0, expert: 3, epoch: 2 };
        assert_eq!(tonic::Status::from(held).code(), tonic::Code::NotFound);
        assert_eq!(tonic::Status::from(NodeError::Failed("panic".into())).code(), tonic::Code::Unavailable);
        let bad = NodeError::BadRoutes { id: 1, message: "x".into() };
        assert_eq!(tonic::Status::from(bad).code(), tonic::Code::InvalidArgument);
    }
}
