//! The coordinator group as real processes on loopback: `switchyard coordinator` members, expert
//! nodes that register with them, and a router that follows their placement. Leaders and
//! expert nodes are SIGKILLed under load; the group restarts from disk; a skewed workload is
//! rebalanced. Every request must still complete with the single-process engine's tokens.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A three-member group on fixed ports with its data in `dir`.
struct Group {
    addresses: Vec<String>,
    peers: String,
}

impl Group {
    fn new() -> Self {
        let addresses: Vec<String> = (0..3).map(|_| free_address()).collect();
        let peers = addresses.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        Group { addresses, peers }
    }

    fn list(&self) -> String {
        self.addresses.join(",")
    }

    fn start_member(&self, procs: &mut Procs, id: usize, dir: &Path, extra: &[&str]) {
        let data = dir.join(format!("coordinator-{id}"));
        let mut args = vec![
            "coordinator",
            "--id",
            ["1", "2", "3"][id - 1],
            "--listen",
            &self.addresses[id - 1],
            "--peers",
            &self.peers,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        procs.start(&format!("coordinator-{id}"), &args, &[]);
    }

    fn start(&self, procs: &mut Procs, dir: &Path, extra: &[&str]) {
        for id in 1..=3 {
            self.start_member(procs, id, dir, extra);
        }
    }

    /// `cluster status --coordinators` from the members in `only` (all when empty), or `None`
    /// if none answers.
    fn status_from(&self, only: &[usize]) -> Option<Value> {
        let list: Vec<&str> =
            (1..=3).filter(|i| only.is_empty() || only.contains(i)).map(|i| self.addresses[i - 1].as_str()).collect();
        let out = switchyard(&["cluster", "status", "--coordinators", &list.join(","), "--json"]);
        out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap()["coordinator"].clone())
    }

    /// Waits until the active epoch satisfies `cond`; returns the status.
    fn wait_for(&self, timeout: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(timeout, || {
            last = self.status_from(&[]).unwrap_or(Value::Null);
            !last.is_null() && cond(&last)
        });
        assert!(ok, "timed out waiting for {what}: {last:#}");
        last
    }
}

fn active_epoch(status: &Value) -> Option<&Value> {
    status["epochs"].as_array()?.iter().find(|e| e["state"] == "active")
}

/// Nodes (ids) the active epoch places experts on.
fn placed_nodes(status: &Value) -> Vec<u64> {
    let mut nodes: Vec<u64> = active_epoch(status)
        .map(|e| {
            e["experts"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|x| x[2].as_array().unwrap().clone())
                .collect::<Vec<Value>>()
        })
        .unwrap_or_default()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// The registered nodes as the replicated state records them (id, address, state, experts):
/// without the load figures, which each leader measures afresh from heartbeats.
fn registered(status: &Value) -> Vec<Value> {
    let fields = ["id", "address", "state", "experts"];
    status["nodes"].as_array().unwrap().iter().map(|n| fields.iter().map(|f| n[*f].clone()).collect()).collect()
}

fn node_state(status: &Value, id: u64) -> String {
    status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap()["state"].as_str().unwrap().to_string()
}

/// The prompt of fixture case `case` of the Mixtral fixture.
fn prompt(case: usize) -> String {
    expected("mixtral")["cases"][case]["prompt"].as_str().unwrap().to_string()
}

fn generate_args(prompt: &str, max_tokens: usize) -> Vec<String> {
    ["generate", "--prompt", prompt, "--max-tokens", &max_tokens.to_string(), "--logprobs", "3", "--json"]
        .map(String::from)
        .to_vec()
}

/// Starts `generate --router` for each prompt; returns the running clients.
fn start_clients(router: &str, prompts: &[String], max_tokens: usize) -> Vec<Child> {
    prompts
        .iter()
        .map(|prompt| {
            let mut args = generate_args(prompt, max_tokens);
            args.extend(["--router".into(), router.into()]);
            Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Waits for the clients and checks each answer is the single-process engine's on `model`,
/// byte for byte (tokens, log-probabilities, top-3).
fn check_clients(clients: Vec<Child>, model: &str, prompts: &[String], max_tokens: usize) {
    for (client, prompt) in clients.into_iter().zip(prompts) {
        let out = client.wait_with_output().unwrap();
        assert!(out.status.success(), "a request failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut local = generate_args(prompt, max_tokens);
        local.extend(["--model".into(), model.to_string()]);
        let local = stdout_of(&local.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(String::from_utf8(out.stdout).unwrap(), local, "{prompt:?} differs from the single process");
    }
}

#[test]
fn a_killed_leader_is_replaced_without_losing_the_placement() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();
    let group = Group::new();
    group.start(&mut procs, dir.path(), &["--min-nodes", "2"]);
    let model = fixture("mixtral");
    let env_delay = [("SWITCHYARD_FAULT_DISPATCH_DELAY_MS", "3")];
    for i in 0..2 {
        let (child, _) = spawn_ready(&["expert-node", "--model", &model, "--coordinators", &group.list()], &env_delay);
        procs.0.push((format!("node-{i}"), child));
    }
    let ready = procs.start("router", &["router", "--model", &model, "--coordinators", &group.list()], &[]);
    let router = address_of(&ready, "grpc");
    let before = group.wait_for(Duration::from_secs(20), "an active epoch on 2 nodes", |s| placed_nodes(s).len() == 2);

    let prompts: Vec<String> = (0..3).map(prompt).collect();
    let clients = start_clients(&router, &prompts, 80);
    wait_running(&router, clients.len());
    let leader = before["leader"].as_u64().unwrap() as usize;
    let killed = Instant::now();
    procs.kill(&format!("coordinator-{leader}"));
    let survivors: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    let mut after = Value::Null;
    // How fast is the raft timing's business (ELECTION_TICKS × TICK) and varies with the
    // machine's load; the test waits on the condition and reports the time it saw.
    let elected = wait_until(Duration::from_secs(20), || {
        after = group.status_from(&survivors).unwrap_or(Value::Null);
        after["leader"].as_u64().is_some_and(|l| l != 0 && l as usize != leader)
    });
    assert!(elected, "no new leader: {after:#}");
    eprintln!("a new leader was seen {:?} after the kill", killed.elapsed());
    // Nothing committed is lost: the same nodes and the same active epoch.
    assert_eq!(active_epoch(&after), active_epoch(&before));
    assert_eq!(registered(&after), registered(&before));
    check_clients(clients, &model, &prompts, 80);

    // The new leader takes decisions: drain a node, and its experts move to the other one.
    let drained = before["nodes"][0]["id"].as_u64().unwrap();
    let out = stdout_of(&["cluster", "drain", &drained.to_string(), "--coordinators", &group.list()]);
    assert!(out.contains(&format!("draining expert node {drained}")), "{out}");
    let status = group.wait_for(Duration::from_secs(10), "the drained node's experts to move", |s| {
        !placed_nodes(s).contains(&drained) && s["pending_epoch"].is_null()
    });
    assert_eq!(node_state(&status, drained), "draining");
    let clients = start_clients(&router, &prompts[..1], 20);
    check_clients(clients, &model, &prompts[..1], 20);
}

#[test]
fn the_group_restarts_from_disk_with_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();
    let group = Group::new();
    let extra = ["--node-timeout-ms", "5000"];
    group.start(&mut procs, dir.path(), &extra);
    let model = fixture("mixtral");
    procs.start("node-0", &["expert-node", "--model", &model, "--coordinators", &group.list()], &[]);
    let before = group.wait_for(Duration::from_secs(20), "an active epoch", |s| active_epoch(s).is_some());

    for id in 1..=3 {
        procs.kill(&format!("coordinator-{id}"));
    }
    group.start(&mut procs, dir.path(), &extra);
    let after =
        group.wait_for(Duration::from_secs(10), "a leader after the restart", |s| s["leader"].as_u64() != Some(0));
    assert_eq!(after["epochs"], before["epochs"]);
    assert_eq!(registered(&after), registered(&before));
    assert_eq!(after["members"], before["members"]);
    assert!(after["commit_index"].as_u64() >= before["commit_index"].as_u64());
    assert!(alive(procs.pid("node-0")));
}

#[test]
fn a_killed_expert_node_is_replaced_and_every_request_completes() {
    // One replica per expert: the dead node's experts exist nowhere until the coordinators
    // re-place them, so the requests must wait for the new epoch rather than fail.
    let model = fixture("mixtral");
    let cluster = UpCluster::start_with(
        &["--model", &model, "--expert-nodes", "3", "--replicas", "1"],
        &[("SWITCHYARD_FAULT_DISPATCH_DELAY_MS", "3")],
    );
    let status = cluster.status();
    let victim = status["nodes"][0]["pid"].as_u64().unwrap() as u32;
    let victim_address = status["nodes"][0]["address"].as_str().unwrap().to_string();
    let prompts: Vec<String> = (0..3).map(prompt).collect();
    let clients = start_clients(&cluster.addr, &prompts, 100);
    wait_running(&cluster.addr, clients.len());
    let killed = Instant::now();
    signal(victim, libc::SIGKILL);
    let mut replaced = Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        replaced = cluster.coordinator_status();
        let dead = replaced["nodes"].as_array().unwrap().iter().find(|n| n["address"] == victim_address.as_str());
        dead.is_some_and(|n| n["state"] == "dead")
            && replaced["pending_epoch"].is_null()
            && !placed_nodes(&replaced).contains(&dead.unwrap()["id"].as_u64().unwrap())
    });
    assert!(ok, "the dead node's experts were not re-placed: {replaced:#}");
    eprintln!("the dead node's experts were re-placed {:?} after the kill", killed.elapsed());
    check_clients(clients, &model, &prompts, 100);
    cluster.stop();
}

#[test]
fn the_balancer_replicates_hot_experts_and_evens_the_load() {
    // The embedded code model: trained routing is skewed, as real models' is.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/switchyard-code-moe");
    let model = model.to_str().unwrap();
    let cluster = UpCluster::start_with(
        &["--model", model, "--expert-nodes", "4", "--replicas", "1", "--balance-interval-ms", "1000"],
        &[],
    );
    // A skewed workload: the same prompt over and over routes to the same few experts.
    let hot = vec!["import numpy as np".to_string(); 4];
    let load = || {
        for c in start_clients(&cluster.addr, &hot, 40) {
            c.wait_with_output().unwrap();
        }
    };
    let mut status = Value::Null;
    let rebalanced = wait_until(Duration::from_secs(60), || {
        load();
        status = cluster.coordinator_status();
        active_epoch(&status).unwrap()["reason"].as_str().unwrap().starts_with("rebalance")
    });
    assert!(rebalanced, "no rebalance: {status:#}");
    // The decision records the load the leader measured when it took it.
    let reason = active_epoch(&status).unwrap()["reason"].as_str().unwrap().to_string();
    let before: f64 = reason
        .strip_prefix("rebalance: measured imbalance ")
        .and_then(|r| r.split(';').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no measured imbalance in {reason:?}"));
    assert!(before > 1.25, "the workload was not skewed: measured imbalance {before:.2}");
    let experts = active_epoch(&status).unwrap()["experts"].as_array().unwrap();
    let replicated = experts.iter().filter(|x| x[2].as_array().unwrap().len() > 1).count();
    assert!(replicated > 0, "no expert gained a replica: {status:#}");
    // Under the new epoch the busiest node carries less of the load (a full window of it).
    let mut after = f64::MAX;
    wait_until(Duration::from_secs(20), || {
        load();
        let s = cluster.coordinator_status();
        let busy = s["nodes"].as_array().unwrap().iter().all(|n| n["rows_per_second"].as_f64().unwrap() > 0.0);
        if busy && s["pending_epoch"].is_null() {
            after = after.min(s["imbalance"].as_f64().unwrap());
        }
        after < before
    });
    assert!(after < before, "measured imbalance {before:.2} before the rebalance, {after:.2} after");
    // ... and the answers are still the single process's.
    check_clients(start_clients(&cluster.addr, &hot[..1], 20), model, &hot[..1], 20);
    cluster.stop();
}

#[test]
fn a_coordinator_joins_and_another_leaves_while_the_group_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();
    let group = Group::new();
    group.start(&mut procs, dir.path(), &[]);
    let model = fixture("mixtral");
    procs.start("node-0", &["expert-node", "--model", &model, "--coordinators", &group.list()], &[]);
    let before = group.wait_for(Duration::from_secs(20), "an active epoch", |s| active_epoch(s).is_some());

    // A member that is not running is not added: it would count in the majority.
    let fourth = free_address();
    let err =
        stderr_of_failure(&["cluster", "add-coordinator", &format!("4={fourth}"), "--coordinators", &group.list()]);
    assert!(err.contains(&fourth) && err.contains("does not answer") && err.contains("--join"), "{err}");
    // Nor are two at once.
    let two = [(4, fourth.clone()), (5, free_address())].into();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let refused = rt.block_on(async {
        let client = switchyard_coordinator::client::Client::new(
            &group.addresses,
            &test_security(switchyard_proto::tls::Role::Admin, "admin-members"),
        )
        .unwrap();
        client.change_members(two, Vec::new()).await.unwrap_err()
    });
    assert!(refused.message().contains("one coordinator at a time"), "{}", refused.message());
    let ids =
        |s: &Value| s["members"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(ids(&group.status_from(&[]).unwrap()), [1, 2, 3]);

    // Member 4 starts with no configuration and is added to the running group.
    let peers = format!("{},4={fourth}", group.peers);
    let data = dir.path().join("coordinator-4");
    procs.start(
        "coordinator-4",
        &[
            "coordinator",
            "--id",
            "4",
            "--join",
            "--listen",
            &fourth,
            "--peers",
            &peers,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    let out = stdout_of(&["cluster", "add-coordinator", &format!("4={fourth}"), "--coordinators", &group.list()]);
    assert!(out.contains("coordinator 4 added"), "{out}");
    let status = group.wait_for(Duration::from_secs(10), "four members", |s| ids(s) == [1, 2, 3, 4]);
    // The new member has the group's state (it caught up from a snapshot).
    let mut from_fourth = Value::Null;
    let caught_up = wait_until(Duration::from_secs(10), || {
        let out = switchyard(&["cluster", "status", "--coordinators", &fourth, "--json"]);
        from_fourth =
            serde_json::from_slice::<Value>(&out.stdout).map(|v| v["coordinator"].clone()).unwrap_or_default();
        from_fourth["epochs"] == before["epochs"] && ids(&from_fourth) == [1, 2, 3, 4]
    });
    assert!(caught_up, "member 4 did not catch up: {from_fourth:#}");

    // A follower leaves; the three left keep deciding.
    let leader = status["leader"].as_u64().unwrap();
    let leaving = (1..=3).find(|&i| i != leader).unwrap();
    let list = format!("{},{fourth}", group.list());
    let out = stdout_of(&["cluster", "remove-coordinator", &leaving.to_string(), "--coordinators", &list]);
    assert!(out.contains(&format!("coordinator {leaving} removed")), "{out}");
    procs.kill(&format!("coordinator-{leaving}"));
    let node = before["nodes"][0]["id"].as_u64().unwrap().to_string();
    stdout_of(&["cluster", "drain", &node, "--coordinators", &list]);
    let mut last = Value::Null;
    let decided = wait_until(Duration::from_secs(10), || {
        let out = switchyard(&["cluster", "status", "--coordinators", &list, "--json"]);
        last = serde_json::from_slice::<Value>(&out.stdout).map(|v| v["coordinator"].clone()).unwrap_or_default();
        last["nodes"][0]["state"] == "draining" && ids(&last).len() == 3 && !ids(&last).contains(&leaving)
    });
    assert!(decided, "the group of three did not take the drain: {last:#}");
}

#[test]
fn a_node_declared_dead_while_frozen_comes_back_under_a_new_id() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start_with(&["--model", &model, "--expert-nodes", "3"], &[]);
    let status = cluster.status();
    let frozen = status["nodes"][0]["pid"].as_u64().unwrap() as u32;
    let address = status["nodes"][0]["address"].as_str().unwrap().to_string();
    let before = cluster.coordinator_status();
    let old_id = before["nodes"].as_array().unwrap().iter().find(|n| n["address"] == address.as_str()).unwrap()["id"]
        .as_u64()
        .unwrap();

    // Frozen past the node timeout: declared dead, its experts re-placed on the others.
    signal(frozen, libc::SIGSTOP);
    let mut last = Value::Null;
    let replaced = wait_until(Duration::from_secs(10), || {
        last = cluster.coordinator_status();
        node_state(&last, old_id) == "dead" && last["pending_epoch"].is_null() && !placed_nodes(&last).contains(&old_id)
    });
    signal(frozen, libc::SIGCONT);
    assert!(replaced, "the frozen node was not replaced: {last:#}");

    // Thawed, it learns it was declared dead, drops its experts, registers again and is given
    // a share under a new id.
    let rejoined = wait_until(Duration::from_secs(15), || {
        last = cluster.coordinator_status();
        let again =
            last["nodes"].as_array().unwrap().iter().find(|n| n["address"] == address.as_str() && n["id"] != old_id);
        again.is_some_and(|n| n["state"] == "serving" && placed_nodes(&last).contains(&n["id"].as_u64().unwrap()))
    });
    assert!(rejoined, "the node did not come back: {last:#}");
    let prompts: Vec<String> = (0..2).map(prompt).collect();
    check_clients(start_clients(&cluster.addr, &prompts, 30), &model, &prompts, 30);
    cluster.stop();
}

/// An expert node's own health (its `Health` RPC).
fn node_health(address: &str) -> switchyard_proto::v1::ServingState {
    use switchyard_proto::v1::HealthRequest;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let admin = test_security(switchyard_proto::tls::Role::Admin, "admin-health");
        let mut client = expert_client(address, &admin).await;
        client.health(HealthRequest {}).await.expect("a health answer").into_inner().state()
    })
}

#[test]
fn a_node_whose_compute_thread_panics_stops_serving_and_its_experts_are_replaced() {
    // Every expert on two of three nodes; node 0's compute thread panics at its 60th dispatch
    // (an injected fault), while three requests are mid-generation.
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();
    let group = Group::new();
    group.start(&mut procs, dir.path(), &["--min-nodes", "3", "--replicas", "2"]);
    let model = fixture("mixtral");
    let slow = ("SWITCHYARD_FAULT_DISPATCH_DELAY_MS", "3");
    let mut addresses = Vec::new();
    for i in 0..3 {
        let env: &[(&str, &str)] = if i == 0 { &[slow, ("SWITCHYARD_FAULT_PANIC_AT_DISPATCH", "60")] } else { &[slow] };
        let args = ["expert-node", "--model", &model, "--coordinators", &group.list()];
        addresses.push(address_of(&procs.start(&format!("node-{i}"), &args, env), "expert-node"));
    }
    let ready = procs.start("router", &["router", "--model", &model, "--coordinators", &group.list()], &[]);
    let router = address_of(&ready, "grpc");
    let status = group.wait_for(Duration::from_secs(20), "an active epoch on 3 nodes", |s| placed_nodes(s).len() == 3);
    let failing =
        status["nodes"].as_array().unwrap().iter().find(|n| n["address"] == addresses[0].as_str()).unwrap()["id"]
            .as_u64()
            .unwrap();
    use switchyard_proto::v1::ServingState;
    assert_eq!(node_health(&addresses[0]), ServingState::Serving);

    let prompts: Vec<String> = (0..3).map(prompt).collect();
    let mut clients = start_clients(&router, &prompts, 80);
    assert!(
        wait_until(Duration::from_secs(30), || node_health(&addresses[0]) == ServingState::NotServing),
        "the node whose compute thread panicked still says SERVING"
    );
    assert!(
        clients.iter_mut().all(|c| c.try_wait().unwrap().is_none()),
        "the requests finished before the fault; the test proves nothing"
    );
    // Its heartbeats stopped: the coordinators declare it dead and re-place its experts.
    group.wait_for(Duration::from_secs(10), "the failed node's experts to be re-placed", |s| {
        node_state(s, failing) == "dead" && !placed_nodes(s).contains(&failing) && s["pending_epoch"].is_null()
    });
    check_clients(clients, &model, &prompts, 80);
    // The other nodes serve on.
    assert_eq!(node_health(&addresses[1]), ServingState::Serving);
    let clients = start_clients(&router, &prompts[..1], 20);
    check_clients(clients, &model, &prompts[..1], 20);
}

#[test]
fn up_resumes_its_cluster_from_the_data_dir_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let model = fixture("mixtral");
    let args = ["--model", &model, "--expert-nodes", "2", "--data-dir", data];
    let prompts: Vec<String> = (0..2).map(prompt).collect();

    let first = UpCluster::start_with(&args, &[]);
    check_clients(start_clients(&first.addr, &prompts, 16), &model, &prompts, 16);
    let before = first.coordinator_status();
    let coordinators = first.coordinators.clone();
    // `up` dies without a word; its children follow (they are told when their parent dies).
    signal(first.child.id(), libc::SIGKILL);
    drop(first);
    let freed = wait_until(Duration::from_secs(30), || {
        coordinators.split(',').all(|a| std::net::TcpStream::connect(a).is_err())
    });
    assert!(freed, "the first cluster's coordinators still listen on {coordinators}");

    let second = UpCluster::start_with(&args, &[]);
    assert_eq!(second.coordinators, coordinators, "the coordinators must come back where their raft state says");
    let after = second.coordinator_status();
    assert_eq!(after["members"], before["members"]);
    assert!(after["term"].as_u64() >= before["term"].as_u64());
    check_clients(start_clients(&second.addr, &prompts, 16), &model, &prompts, 16);
    second.stop();

    // Another count of coordinators is not the same cluster.
    let err = stderr_of_failure(&[
        "up",
        "--model",
        &model,
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--coordinators",
        "5",
    ]);
    assert!(err.contains("3 coordinators") && err.contains("--coordinators 5"), "{err}");
}

#[test]
fn up_ends_with_the_failing_nodes_own_error() {
    use switchyard_model::checkpoint::{Checkpoint, Tensor, write_safetensors};
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("mixtral")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let victim = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let mut names: Vec<String> = ckpt.names().filter(|n| *n != victim).map(str::to_string).collect();
    names.sort();
    let kept: Vec<Tensor> = names.iter().map(|n| ckpt.get(n).unwrap()).collect();
    drop(ckpt);
    write_safetensors(&tmp.path().join("model.safetensors"), &kept).unwrap();

    let model = tmp.path().to_str().unwrap();
    // The router serves the dense layers, so only an expert node meets the missing expert: `up`
    // ends with that node's own error instead of waiting for a placement that never comes.
    let err = stderr_of_failure(&["up", "--model", model, "--http", "127.0.0.1:0", "--expert-nodes", "2"]);
    assert!(err.contains("expert-node-") && err.contains(victim) && err.contains("missing"), "{err}");
}

#[test]
fn a_node_that_answers_wrongly_is_caught_on_probation_and_drained() {
    let model = fixture("mixtral");
    let cluster =
        UpCluster::start_with(&["--model", &model, "--expert-nodes", "2", "--balance-interval-ms", "500"], &[]);
    // A third node registers with the same coordinators; it adds 50 to every partial sum it
    // answers (a rogue process, or a device that corrupts silently).
    // An insider: it holds a valid expert-node certificate of the cluster.
    let mut env = cluster.tls_env("expert-node", "rogue");
    env.push(("SWITCHYARD_FAULT_WRONG_ANSWERS".into(), "50".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut procs = Procs::default();
    let rogue_ready =
        procs.start("rogue", &["expert-node", "--model", &model, "--coordinators", &cluster.coordinators], &env);
    let rogue_address = rogue_ready.rsplit(' ').next().unwrap().to_string();
    let rogue_id = |s: &Value| {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["address"] == rogue_address.as_str())
            .map(|n| n["id"].as_u64().unwrap())
    };
    let mut status = Value::Null;
    let placed = wait_until(Duration::from_secs(30), || {
        status = cluster.coordinator_status();
        rogue_id(&status).is_some_and(|id| placed_nodes(&status).contains(&id))
    });
    assert!(placed, "the coordinators never gave the new node experts: {status:#}");
    let rogue = rogue_id(&status).unwrap();

    // The router follows the placement; without traffic, nothing has been checked yet.
    let mut router = Value::Null;
    let on_probation = wait_until(Duration::from_secs(20), || {
        router = cluster.status();
        let nodes = router["nodes"].as_array().unwrap();
        nodes.iter().any(|n| n["address"] == rogue_address.as_str() && n["state"] == "on probation")
    });
    assert!(on_probation, "the router does not hold the new node on probation: {router:#}");

    // Its answers never reach a user: every request is the single process's, token for token,
    // while the router's canary checks catch it, refuse it and have the coordinators drain it
    // (nothing else drains a node here).
    let prompts: Vec<String> = (0..3).map(prompt).collect();
    let drained = wait_until(Duration::from_secs(30), || {
        check_clients(start_clients(&cluster.addr, &prompts, 24), &model, &prompts, 24);
        status = cluster.coordinator_status();
        node_state(&status, rogue) == "draining" && !placed_nodes(&status).contains(&rogue)
    });
    assert!(drained, "the node that answers wrongly was not refused and drained: {status:#}");
    check_clients(start_clients(&cluster.addr, &prompts, 24), &model, &prompts, 24);
    cluster.stop();
}
