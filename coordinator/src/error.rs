//! [`CoordinatorError`] and its mapping to gRPC statuses.

use std::path::PathBuf;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("coordinator storage {path}: {source}")]
    Storage { path: PathBuf, source: std::io::Error },
    #[error("coordinator storage {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("this coordinator is not the leader{}", leader_hint(.leader))]
    NotLeader { leader: Option<(u64, String)> },
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("{0}")]
    Config(String),
    #[error("the proposal was dropped ({0}); retry")]
    Dropped(String),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn leader_hint(leader: &Option<(u64, String)>) -> String {
    match leader {
        Some((id, address)) => format!("; the leader is coordinator {id} at {address}"),
        None => "; no leader is known yet (an election is under way)".into(),
    }
}

/// The metadata key naming the leader's address on a `NotLeader` status.
pub const LEADER_METADATA: &str = "switchyard-leader";

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let message = e.to_string();
        match &e {
            CoordinatorError::NotLeader { leader } => {
                let mut status = Status::new(Code::Unavailable, message);
                if let Some((_, address)) = leader
                    && let Ok(value) = address.parse()
                {
                    status.metadata_mut().insert(LEADER_METADATA, value);
                }
                status
            }
            CoordinatorError::Rejected(_) => Status::failed_precondition(message),
            CoordinatorError::Config(_) => Status::invalid_argument(message),
            CoordinatorError::Dropped(_) | CoordinatorError::ShuttingDown => Status::unavailable(message),
            CoordinatorError::Storage { .. }
            | CoordinatorError::Corrupt { .. }
            | CoordinatorError::Raft(_)
            | CoordinatorError::Io(_) => Status::internal(message),
        }
    }
}
