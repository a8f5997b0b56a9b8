//! One coordinator served on loopback: what reaches its gRPC service from outside the group
//! cannot harm it.

use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use switchyard_coordinator::{Config, Coordinator};
use switchyard_proto::v1::coordinator_client::CoordinatorClient;
use switchyard_proto::v1::{ChangeMembersRequest, CoordinatorStatusRequest, RaftBatch};
use tokio::net::TcpListener;
use tonic::Code;

fn config(dir: &std::path::Path) -> Config {
    Config {
        id: 1,
        peers: Vec::new(),
        data_dir: dir.to_path_buf(),
        join: false,
        min_nodes: 1,
        replicas: 2,
        node_timeout_ms: 1000,
        balance_interval_ms: 2000,
        imbalance_threshold: 1.25,
        load_timeout_secs: 120,
        raft_token: Some("members-only".into()),
        limits: Default::default(),
        tls: switchyard_proto::tls::TlsFlags::plaintext(),
        probes: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_step_the_group_and_it_cannot_be_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let coordinator = Coordinator::start(&config(dir.path()), &address).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(coordinator.serve(listener, async {
        let _ = stopped.await;
    }));
    let mut client = CoordinatorClient::connect(format!("http://{address}")).await.unwrap();
    // A lone member elects itself.
    let mut leader = 0;
    for _ in 0..100 {
        leader = client.status(CoordinatorStatusRequest {}).await.map(|s| s.into_inner().leader_id).unwrap_or(0);
        if leader == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leader, 1);

    // A forged heartbeat that would commit past the log's end (a fatal raft-rs assertion).
    let mut forged = Message::default();
    forged.set_msg_type(MessageType::MsgHeartbeat);
    forged.from = 99;
    forged.to = 1;
    forged.term = 1_000;
    forged.commit = u64::MAX;
    let batch = || RaftBatch { messages: vec![forged.write_to_bytes().unwrap().into()] };
    let refused = client.raft(batch()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // With the token it is delivered, and dropped: 99 is not a member.
    let mut request = tonic::Request::new(batch());
    request.metadata_mut().insert("switchyard-raft-token", "members-only".parse().unwrap());
    client.raft(request).await.unwrap();
    let status = client.status(CoordinatorStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.leader_id, status.term), (1, leader_term(&status)));

    // Removing the last member is refused, naming why; the group goes on.
    let empty = ChangeMembersRequest { add: Default::default(), remove: vec![1] };
    let err = client.change_members(empty).await.unwrap_err();
    assert!(err.message().contains("would remove every coordinator"), "{err:?}");
    assert_eq!(client.status(CoordinatorStatusRequest {}).await.unwrap().into_inner().leader_id, 1);

    let _ = stop.send(());
    served.await.unwrap().unwrap();
}

/// The term the status reports (the forged message's term 1000 must not have been adopted).
fn leader_term(status: &switchyard_proto::v1::CoordinatorStatus) -> u64 {
    assert!(status.term < 1_000, "a stranger's term was adopted: {}", status.term);
    status.term
}
