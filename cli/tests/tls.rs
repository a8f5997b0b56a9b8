//! Mutual TLS between the roles, as an attacker on the network meets it: real coordinator and
//! expert-node processes with certificates from one CA, called by clients presenting no
//! certificate, another CA's, or the wrong role's.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;
use switchyard_proto::tls::{Role, Security, TlsFlags};
use switchyard_proto::v1::coordinator_client::CoordinatorClient;
use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{
    ChangeMembersRequest, CoordinatorStatusRequest, DispatchRequest, DrainNodeRequest, ModelShape, NodeHeartbeat,
    RegisterNodeRequest, StatusRequest,
};
use tonic::{Code, Status};

/// A certificate of `role` from the CA in `dir`, loaded as this process's security.
fn security_of(dir: &Path, role: Role, name: &str) -> Security {
    let env = certificate_env(dir, role.name(), name);
    TlsFlags::files(&env[0].1, &env[1].1, &env[2].1).load(role).unwrap()
}

async fn coordinator(
    security: &Security,
    address: &str,
) -> Result<CoordinatorClient<tonic::transport::Channel>, String> {
    let endpoint = security.endpoint(address, Role::Coordinator)?.connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| switchyard_proto::error_chain(&e))?;
    Ok(CoordinatorClient::new(channel))
}

fn denied(result: Result<impl std::fmt::Debug, Status>, needs: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(needs), "{}", status.message());
}

#[test]
fn every_internal_call_needs_a_certificate_of_the_right_role() {
    let model = fixture("mixtral");
    let data = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();
    let coordinator_address = start_lone_coordinator(&mut procs, data.path(), &["--min-nodes", "1", "--replicas", "1"]);
    let node_ready =
        procs.start("node", &["expert-node", "--model", &model, "--coordinators", &coordinator_address], &[]);
    let node_address = address_of(&node_ready, "expert-node");
    let status = || -> Value {
        let out = switchyard(&["cluster", "status", "--coordinators", &coordinator_address, "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).map(|v| v["coordinator"].clone()).unwrap_or_default()
    };
    let placed = wait_until(Duration::from_secs(60), || {
        status()["epochs"].as_array().is_some_and(|e| e.iter().any(|e| e["state"] == "active"))
    });
    assert!(placed, "the node registered over mutual TLS and got a placement: {:#}", status());

    let foreign_dir = tempfile::tempdir().unwrap();
    assert!(switchyard(&["tls", "ca", "--dir", foreign_dir.path().to_str().unwrap()]).status.success());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // No TLS at all: the server speaks only TLS.
        let plaintext = TlsFlags::plaintext().load(Role::Admin).unwrap();
        let mut client = coordinator(&plaintext, &coordinator_address).await.unwrap();
        assert!(client.status(CoordinatorStatusRequest {}).await.is_err(), "a plaintext call must fail");

        // A certificate of another CA: the handshake fails.
        let foreign = security_of(foreign_dir.path(), Role::Admin, "intruder");
        let refused = match coordinator(&foreign, &coordinator_address).await {
            Err(e) => e,
            Ok(mut c) => c.status(CoordinatorStatusRequest {}).await.unwrap_err().to_string(),
        };
        assert!(refused.contains("certificate") || refused.contains("alert"), "{refused}");

        // The cluster's CA, the wrong roles.
        let admin = test_security(Role::Admin, "admin-probe");
        let node_cert = test_security(Role::Node, "impostor");
        let router_cert = test_security(Role::Router, "router-probe");

        // The coordinator's own certificate is checked by the client too: a server that is not
        // a coordinator (here: the expert node) is refused when a coordinator is expected.
        let wrong_server = match coordinator(&admin, &node_address).await {
            Err(e) => e,
            Ok(mut c) => c.status(CoordinatorStatusRequest {}).await.unwrap_err().to_string(),
        };
        assert!(wrong_server.contains("coordinator.switchyard"), "{wrong_server}");

        let mut as_node = coordinator(&node_cert, &coordinator_address).await.unwrap();
        denied(
            as_node.drain_node(DrainNodeRequest { node: "1".into() }).await,
            "`DrainNode` needs a certificate of role admin or router",
        );
        denied(
            as_node.change_members(ChangeMembersRequest { add: Default::default(), remove: vec![1] }).await,
            "`ChangeMembers` needs a certificate of role admin",
        );
        // A node heartbeats only as itself.
        let id = status()["nodes"][0]["id"].as_u64().unwrap();
        denied(
            as_node.heartbeat(NodeHeartbeat { node_id: id, loaded_epoch: 0, held_bytes: 0 }).await,
            "a node heartbeats only as itself",
        );
        // Metadata that claims a forwarded admin call counts only from a coordinator.
        let mut spoofed = tonic::Request::new(DrainNodeRequest { node: "1".into() });
        spoofed.metadata_mut().insert("switchyard-forwarded", "1".parse().unwrap());
        spoofed.metadata_mut().insert("switchyard-caller-roles", "8".parse().unwrap());
        spoofed.metadata_mut().insert("switchyard-caller-fingerprint", "00".parse().unwrap());
        denied(as_node.drain_node(spoofed).await, "`DrainNode` needs");
        // Nor can it take over the registered node's address.
        let shape = ModelShape {
            model_type: "mixtral".into(),
            num_layers: 2,
            moe_layers: vec![0, 1],
            num_experts: 8,
            hidden_size: 32,
            expert_bytes: 1,
        };
        let register = RegisterNodeRequest { address: node_address.clone(), memory_budget: 0, model: Some(shape) };
        let taken = as_node.register_node(register.clone()).await.unwrap_err();
        assert!(taken.message().contains("registered with another certificate"), "{taken:?}");

        let mut as_router = coordinator(&router_cert, &coordinator_address).await.unwrap();
        denied(as_router.register_node(register).await, "`RegisterNode` needs a certificate of role expert-node");
        denied(
            as_router.change_members(ChangeMembersRequest { add: Default::default(), remove: vec![1] }).await,
            "`ChangeMembers` needs",
        );

        // The expert node: only routers dispatch; any of the cluster's roles reads its status.
        let endpoint = node_cert.endpoint(&node_address, Role::Node).unwrap();
        let mut node_client = ExpertServiceClient::new(endpoint.connect().await.unwrap());
        assert!(node_client.status(StatusRequest {}).await.is_ok());
        let stream = tokio_stream::iter(Vec::<DispatchRequest>::new());
        denied(node_client.dispatch(stream).await, "`Dispatch` needs a certificate of role router");

        // The admin may read and drain.
        let mut as_admin = coordinator(&admin, &coordinator_address).await.unwrap();
        assert!(as_admin.status(CoordinatorStatusRequest {}).await.is_ok());
        assert_eq!(
            as_admin.drain_node(DrainNodeRequest { node: id.to_string() }).await.unwrap().into_inner().node_id,
            id
        );
    });

    // The CLI without a certificate says what to give.
    let err =
        stderr_of_failure(&["cluster", "drain", "1", "--coordinators", &coordinator_address, "--insecure-plaintext"]);
    assert!(err.contains("cannot drain"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["cluster", "drain", "1", "--coordinators", &coordinator_address])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tls-ca") && err.contains("--insecure-plaintext"), "{err}");
}

#[test]
fn plaintext_is_only_an_explicit_choice_and_says_what_it_gives_up() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let model = fixture("mixtral");
    // Without TLS flags a role refuses to start, naming what to give.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["expert-node", "--model", &model, "--experts", "all"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tls-ca, --tls-cert and --tls-key"), "{err}");
    // With --insecure-plaintext it serves, and warns.
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["expert-node", "--model", &model, "--experts", "all", "--insecure-plaintext"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready =
        BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok).find(|l| l.starts_with("ready: "));
    signal(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(ready.is_some(), "{err}");
    assert!(err.contains("neither encrypted nor authenticated"), "{err}");
}
