//! Raft messages to the other coordinators: one task per member, each with a lazily connected
//! gRPC channel, sending batches in order. A member that cannot be reached is reported to raft
//! (`report_unreachable`, and a failed snapshot), which backs off and retries on its own.

use std::collections::HashMap;
use std::time::Duration;

use raft::prelude::{Message, MessageType};
use switchyard_proto::tls::{Role, Security};
use switchyard_proto::v1::RaftBatch;
use switchyard_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;

use crate::node::{Handle, Msg};
use crate::peer::encode_message;

/// Batches queued for one member at most; more are dropped (raft retransmits).
const QUEUE: usize = 256;
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends what arrives on `outbox` to its members, until the raft thread drops its sender.
pub async fn run(
    mut outbox: mpsc::UnboundedReceiver<Vec<Message>>,
    handle: Handle,
    security: Security,
    token: Option<String>,
) {
    let mut peers: HashMap<u64, (String, mpsc::Sender<Vec<Message>>)> = HashMap::new();
    while let Some(messages) = outbox.recv().await {
        let mut by_peer: HashMap<u64, Vec<Message>> = HashMap::new();
        for m in messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, batch) in by_peer {
            let Some(address) = handle.view.borrow().state.members.get(&to).cloned() else {
                tracing::debug!(to, "no address for coordinator {to}; message dropped");
                handle.send(Msg::Unreachable(to)).ok();
                continue;
            };
            let sender = match peers.get(&to) {
                Some((a, tx)) if *a == address && !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    tokio::spawn(send_to(to, address.clone(), rx, handle.clone(), security.clone(), token.clone()));
                    peers.insert(to, (address, tx.clone()));
                    tx
                }
            };
            if sender.try_send(batch).is_err() {
                handle.send(Msg::Unreachable(to)).ok();
            }
        }
    }
}

async fn send_to(
    to: u64,
    address: String,
    mut batches: mpsc::Receiver<Vec<Message>>,
    handle: Handle,
    security: Security,
    token: Option<String>,
) {
    let token = match token.map(|t| t.parse::<tonic::metadata::MetadataValue<_>>()).transpose() {
        Ok(t) => t,
        Err(_) => {
            tracing::error!("the raft token is not a valid header value");
            return;
        }
    };
    let endpoint = match security.endpoint(&address, Role::Coordinator) {
        Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true).timeout(SEND_TIMEOUT),
        Err(e) => {
            tracing::error!(to, %address, "coordinator {to}: {e}");
            return;
        }
    };
    let mut client = CoordinatorClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    while let Some(batch) = batches.recv().await {
        let snapshots = batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).count();
        let mut request =
            tonic::Request::new(RaftBatch { messages: batch.iter().map(|m| encode_message(m).into()).collect() });
        if let Some(token) = &token {
            request.metadata_mut().insert(crate::service::RAFT_TOKEN, token.clone());
        }
        let delivered = match client.raft(request).await {
            Ok(_) => true,
            Err(status) => {
                tracing::debug!(to, %address, "raft messages not delivered: {}", status.message());
                handle.send(Msg::Unreachable(to)).ok();
                false
            }
        };
        for _ in 0..snapshots {
            handle.send(Msg::Snapshot { to, delivered }).ok();
        }
    }
}
