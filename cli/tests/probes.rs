//! Orchestrators' probes on real processes: `/live` and `/ready` on `--probe-listen`, and the
//! same readiness as gRPC health on each role's gRPC port.

mod common;

use std::time::Duration;

use common::*;

/// The status line and body of `GET path`, or `None` while nothing listens.
fn probe(address: &str, path: &str) -> Option<(String, String)> {
    std::net::TcpStream::connect(address).ok()?;
    Some(http_get(address, path))
}

fn ready(address: &str) -> bool {
    probe(address, "/ready").is_some_and(|(status, _)| status == "HTTP/1.1 200 OK")
}

/// gRPC health of the readiness service on a role's gRPC port, over mutual TLS.
fn grpc_ready(address: &str, role: switchyard_proto::tls::Role) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let security = test_security(switchyard_proto::tls::Role::Admin, "probe-admin");
        let channel = security.endpoint(address, role).unwrap().connect().await.unwrap();
        let request = HealthCheckRequest { service: switchyard_proto::probe::GRPC_SERVICE.into() };
        let Ok(answer) = HealthClient::new(channel).check(request).await else { return false };
        answer.into_inner().status() == tonic_health::pb::health_check_response::ServingStatus::Serving
    })
}

#[test]
fn every_role_says_when_it_is_live_and_when_it_is_ready() {
    use switchyard_proto::tls::Role;
    let model = fixture("mixtral");
    let data = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();
    let coordinator_probe = free_address();
    let coordinator =
        start_lone_coordinator(&mut procs, data.path(), &["--min-nodes", "2", "--probe-listen", &coordinator_probe]);
    assert!(wait_until(Duration::from_secs(20), || ready(&coordinator_probe)), "a lone member leads: ready");
    assert!(wait_until(Duration::from_secs(5), || grpc_ready(&coordinator, Role::Coordinator)));

    // The first node registers, but the first placement waits for two: live, not ready.
    let first_probe = free_address();
    let node = |procs: &mut Procs, name: &str, probe_address: &str| {
        let args = ["expert-node", "--model", &model, "--coordinators", &coordinator, "--probe-listen", probe_address];
        address_of(&procs.start(name, &args, &[]), "expert-node")
    };
    let first = node(&mut procs, "n1", &first_probe);
    let live = || probe(&first_probe, "/live").is_some_and(|(status, _)| status == "HTTP/1.1 200 OK");
    assert!(wait_until(Duration::from_secs(10), live));
    let (status, why) = probe(&first_probe, "/ready").unwrap();
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{why}");
    assert!(why.contains("not registered") || why.contains("no active epoch"), "{why}");
    assert!(!grpc_ready(&first, Role::Node));

    // With the second, the placement comes: both ready, on HTTP and gRPC.
    let second_probe = free_address();
    node(&mut procs, "n2", &second_probe);
    assert!(wait_until(Duration::from_secs(30), || ready(&first_probe) && ready(&second_probe)));
    assert!(wait_until(Duration::from_secs(5), || grpc_ready(&first, Role::Node)));

    // The coordinator is killed: the nodes keep serving what they hold, and stay live.
    procs.kill("coordinator");
    assert_eq!(probe(&first_probe, "/live").unwrap().0, "HTTP/1.1 200 OK");
    assert_eq!(probe(&coordinator_probe, "/live"), None);
}
