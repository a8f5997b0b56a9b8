//! The sharded cluster end to end, as real processes on loopback: `switchyard up` starts a
//! router and expert nodes, `switchyard generate --router` is the client, and the answers
//! must be the single-process engine's.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `generate` arguments for fixture case `case` of `arch`.
fn generate_args(arch: &str, case: usize, max_tokens: usize) -> Vec<String> {
    let exp = expected(arch);
    let prompt = exp["cases"][case]["prompt"].as_str().unwrap().to_string();
    let max_tokens = max_tokens.to_string();
    ["generate", "--prompt", &prompt, "--max-tokens", &max_tokens, "--logprobs", "3", "--json"]
        .map(String::from)
        .to_vec()
}

fn with(args: &[String], extra: &[&str]) -> Vec<String> {
    let mut v = args.to_vec();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(args: &[String]) -> String {
    stdout_of(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Fixture cases 0 and 2 through the router at `router`: the single process's answer on
/// `model`, and transformers' greedy tokens. Byte for byte with top-2 routing; with more
/// experts per token a node's partial sum adds them in another order than the single process
/// does, so there the tokens and texts are the same and the log-probabilities within 1e-4.
fn answers_like_the_single_process_and_transformers(arch: &str, model: &str, router: &str) {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{model}/config.json")).unwrap()).unwrap();
    let top_k = config["num_experts_per_tok"].as_u64();
    for case in [0, 2] {
        let args = generate_args(arch, case, 20);
        let local = run(&with(&args, &["--model", model]));
        let remote = run(&with(&args, &["--router", router]));
        let got: Value = serde_json::from_str(&remote).unwrap();
        if top_k.is_some_and(|k| k > 2) {
            let want: Value = serde_json::from_str(&local).unwrap();
            assert_close(&got, &want, &format!("{arch} case {case}: the cluster against the single process"));
        } else {
            assert_eq!(remote, local, "{arch} case {case}: the cluster differs from the single process");
        }
        let ids: Vec<Value> = got["tokens"].as_array().unwrap().iter().map(|t| t["id"].clone()).collect();
        assert_eq!(&Value::from(ids), &expected(arch)["cases"][case]["tokens"], "{arch} case {case}");
    }
}

/// `got` and `want` are the same JSON but for numbers, which differ by at most 1e-4.
fn assert_close(got: &Value, want: &Value, what: &str) {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4, "{what}: {a} against {b}");
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{what}: {got} against {want}");
            a.iter().zip(b).for_each(|(a, b)| assert_close(a, b, what));
        }
        (Value::Object(a), Value::Object(b)) => {
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}");
            a.iter().zip(b.values()).for_each(|((_, a), b)| assert_close(a, b, what));
        }
        _ => assert_eq!(got, want, "{what}"),
    }
}

#[test]
fn three_expert_nodes_reproduce_the_single_process_engine_for_every_architecture() {
    let archs = [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "gpt_oss",
        "deepseek_v3",
        "deepseek_v3_fp8",
        "deepseek_v2",
        "glm4_moe",
    ];
    for arch in archs {
        let model = fixture(arch);
        let cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "3"], &[]);
        let status = cluster.status();
        let nodes = status["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{arch}");
        // Each node holds a third of the experts, and no expert is on two nodes.
        let mut held: Vec<Value> = nodes.iter().flat_map(|n| n["experts"].as_array().unwrap().clone()).collect();
        let total = held.len();
        held.dedup();
        assert_eq!(held.len(), total, "{arch}: an expert is on two nodes");
        assert!(nodes.iter().all(|n| n["state"] == "serving"));

        answers_like_the_single_process_and_transformers(arch, &model, &cluster.addr);
        // Every node did work: the experts really are split.
        let status = cluster.status();
        for n in status["nodes"].as_array().unwrap() {
            assert!(n["dispatches"].as_u64().unwrap() > 0, "{arch}: node {} got no dispatch", n["address"]);
        }
        cluster.stop();
    }
}

/// With `--device cuda:0` the router keeps its dense layers and KV cache, and every node its
/// experts, in GPU memory (here all on one GPU; the dispatches still cross gRPC): the answers
/// are transformers' greedy tokens and log-probabilities.
#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn a_cluster_on_the_gpu_reproduces_transformers() {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"] {
        let model = fixture(arch);
        let cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "2", "--device", "cuda:0"], &[]);
        for case in [0, 2] {
            let got: Value =
                serde_json::from_str(&run(&with(&generate_args(arch, case, 20), &["--router", &cluster.addr])))
                    .unwrap();
            let want = &expected(arch)["cases"][case];
            let tokens = got["tokens"].as_array().unwrap();
            let ids: Vec<Value> = tokens.iter().map(|t| t["id"].clone()).collect();
            assert_eq!(&Value::from(ids), &want["tokens"], "{arch} case {case}");
            for (t, lp) in tokens.iter().zip(want["logprobs"].as_array().unwrap()) {
                let diff = (t["logprob"].as_f64().unwrap() - lp.as_f64().unwrap()).abs();
                assert!(diff < 1e-3, "{arch} case {case}: logprob off by {diff}");
            }
        }
        cluster.stop();
    }
}

#[test]
fn requests_survive_a_sigkilled_expert_node_when_experts_have_replicas() {
    let model = fixture("mixtral");
    // Slow dispatches a little so the node dies while the requests are mid-generation.
    let cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "3", "--replicas", "2"],
        &[("SWITCHYARD_FAULT_DISPATCH_DELAY_MS", "3")],
    );
    let requests: Vec<Vec<String>> =
        (0..3).map(|case| with(&generate_args("mixtral", case, 120), &["--ignore-eos"])).collect();
    let reference: Vec<Value> =
        requests.iter().map(|a| serde_json::from_str(&run(&with(a, &["--model", &model]))).unwrap()).collect();

    let mut clients: Vec<std::process::Child> = requests
        .iter()
        .map(|a| {
            Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(with(a, &["--router", &cluster.addr]))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Wait until generation is under way, then kill one node outright.
    let dispatches = || -> u64 {
        cluster.status()["nodes"].as_array().unwrap().iter().map(|n| n["dispatches"].as_u64().unwrap()).sum()
    };
    assert!(wait_until(Duration::from_secs(30), || dispatches() >= 40), "generation did not start");
    let victim = cluster.node_pids()[1];
    signal(victim, libc::SIGKILL);
    assert!(
        clients.iter_mut().all(|c| c.try_wait().unwrap().is_none()),
        "the requests finished before the node died; the test proves nothing"
    );

    for (client, want) in clients.into_iter().zip(&reference) {
        let out = client.wait_with_output().unwrap();
        assert!(out.status.success(), "a request failed: {}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids =
            |v: &Value| v["tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(want), "tokens differ after failover");
        for (a, b) in got["tokens"].as_array().unwrap().iter().zip(want["tokens"].as_array().unwrap()) {
            let (a, b) = (a["logprob"].as_f64().unwrap(), b["logprob"].as_f64().unwrap());
            assert!((a - b).abs() < 1e-4, "logprob {a} vs {b}");
        }
    }
    let status = cluster.status();
    let states: Vec<&str> = status["nodes"].as_array().unwrap().iter().map(|n| n["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["serving", "unreachable", "serving"]);
    cluster.stop();
}

#[test]
fn a_hung_expert_node_times_out_and_its_work_goes_to_a_replica() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "2", "--replicas", "2", "--dispatch-timeout-ms", "300"],
        &[],
    );
    let args = with(&generate_args("mixtral", 1, 20), &["--ignore-eos"]);
    let want = run(&with(&args, &["--model", &model]));
    // Both nodes hold every expert; freeze one so whatever is sent to it never returns.
    let frozen = cluster.node_pids()[0];
    signal(frozen, libc::SIGSTOP);
    let got = run(&with(&args, &["--router", &cluster.addr]));
    signal(frozen, libc::SIGCONT);
    assert_eq!(got, want, "the request must complete on the other replica with the same answer");
    let status = cluster.status();
    // Replicas share the experts, so the frozen node was sent work and timed out.
    let error = status["nodes"][0]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("did not answer within 300 ms"), "{status}");
    cluster.stop();
}

#[test]
fn an_expert_without_a_reachable_replica_fails_the_request_clearly() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "2"], &[]);
    let victim = cluster.node_pids()[0];
    signal(victim, libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || !alive(victim)));
    let args = with(&generate_args("mixtral", 0, 20), &["--router", &cluster.addr]);
    let err = stderr_of_failure(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("Unavailable") && err.contains("no reachable replica"), "{err}");
    assert!(err.contains("expert"), "the error names the expert: {err}");
    drop(cluster); // `up` sees its child gone and stops; drop reaps it.
}

#[test]
fn a_router_refuses_a_placement_that_leaves_experts_unheld() {
    let model = fixture("mixtral");
    let (mut node, ready) = spawn_ready(&["expert-node", "--model", &model, "--experts", "0-3"], &[]);
    let addr = address_of(&ready, "expert-node");
    let err = stderr_of_failure(&["router", "--model", &model, "--expert-nodes", &addr]);
    assert!(err.contains("layer 0 expert 4 is held by no expert node"), "{err}");
    let _ = node.kill();
    let _ = node.wait();
}

#[test]
fn an_expert_node_refuses_a_placement_over_its_memory_budget() {
    let model = fixture("mixtral");
    let err = stderr_of_failure(&["expert-node", "--model", &model, "--experts", "all", "--memory-budget", "1KiB"]);
    assert!(err.contains("--memory-budget is 1024 bytes") && err.contains("the placement needs"), "{err}");
}

#[test]
fn the_router_rejects_bad_requests_with_invalid_argument() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "1"], &[]);
    let err = stderr_of_failure(&["generate", "--router", &cluster.addr, "--prompt-ids", "1,99999"]);
    assert!(err.contains("InvalidArgument") && err.contains("99999"), "{err}");
    let err =
        stderr_of_failure(&["generate", "--router", &cluster.addr, "--prompt-ids", "1", "--max-tokens", "100000"]);
    assert!(err.contains("InvalidArgument") && err.contains("context"), "{err}");
    cluster.stop();
}

#[test]
fn a_dispatch_a_node_has_no_memory_for_is_retried_on_another_replica() {
    // Two nodes hold every expert; node a answers its third dispatch as a device out of
    // memory would (an injected fault).
    let model = fixture("mixtral");
    let mut procs = Procs::default();
    let node = |procs: &mut Procs, name: &str, env: &[(&str, &str)]| {
        let ready = procs.start(name, &["expert-node", "--model", &model, "--experts", "all"], env);
        address_of(&ready, "expert-node")
    };
    let a = node(&mut procs, "a", &[("SWITCHYARD_FAULT_OOM_AT_DISPATCH", "3")]);
    let b = node(&mut procs, "b", &[]);
    let nodes = format!("{a},{b}");
    let ready =
        procs.start("router", &["router", "--model", &model, "--expert-nodes", &nodes, "--http", "127.0.0.1:0"], &[]);
    let (grpc, http) = (address_of(&ready, "grpc"), address_of(&ready, "http"));

    let args = with(&generate_args("mixtral", 1, 20), &["--ignore-eos"]);
    let want = run(&with(&args, &["--model", &model]));
    let got = run(&with(&args, &["--router", &grpc]));
    assert_eq!(got, want, "the request must complete on the other replica with the same answer");
    // The fault fired and its share went to the replica; node a keeps serving.
    let (_, metrics) = http_get(&http, "/metrics");
    assert!(
        metrics.contains(r#"switchyard:expert_dispatch_retries_total{code="resource_exhausted"} 1"#),
        "one dispatch retried after RESOURCE_EXHAUSTED:\n{metrics}"
    );
    let status: Value = serde_json::from_str(&stdout_of(&["cluster", "status", "--router", &grpc, "--json"])).unwrap();
    assert!(status["nodes"].as_array().unwrap().iter().all(|n| n["state"] == "serving"), "{status}");
}

#[test]
fn a_router_whose_engine_thread_panics_stops_serving_and_says_why() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "1"],
        &[("SWITCHYARD_FAULT_ENGINE_PANIC_AT_STEP", "5")],
    );
    let http = cluster.http.trim_start_matches("http://").trim_end_matches("/v1").to_string();
    assert_eq!(http_get(&http, "/health").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(&http, "/ready").0, "HTTP/1.1 200 OK");
    assert_eq!(grpc_health(&cluster.addr), tonic_health::pb::health_check_response::ServingStatus::Serving);

    // The request in the engine when it panics fails with the reason, not a hang.
    let args = with(&generate_args("mixtral", 0, 20), &["--router", &cluster.addr]);
    let err = stderr_of_failure(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("Unavailable") && err.contains("injected fault at step 5"), "{err}");
    // The router now says it does not serve, on HTTP and gRPC health, and refuses new work.
    let (status, body) = http_get(&http, "/health");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("engine failed") && body.contains("injected fault at step 5"), "{body}");
    // Orchestrators' probes: not ready, but the process still answers.
    assert_eq!(http_get(&http, "/ready").0, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(http_get(&http, "/live").0, "HTTP/1.1 200 OK");
    assert!(wait_until(Duration::from_secs(5), || {
        grpc_health(&cluster.addr) == tonic_health::pb::health_check_response::ServingStatus::NotServing
    }));
    let err = stderr_of_failure(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("Unavailable") && err.contains("engine failed"), "{err}");
    cluster.stop();
}

/// An expert node's own status (its `Status` RPC).
fn node_status(address: &str, security: &switchyard_proto::tls::Security) -> switchyard_proto::v1::NodeStatus {
    use switchyard_proto::v1::StatusRequest;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = expert_client(address, security).await;
        client.status(StatusRequest {}).await.expect("a status").into_inner()
    })
}

/// Bytes one expert of `arch`'s quantized fixture takes as stored (values and scales), read
/// from its checkpoint; and as dense bf16.
fn quantized_expert_bytes(arch: &str) -> (u64, u64) {
    use switchyard_model::checkpoint::Checkpoint;
    let ckpt = Checkpoint::open(std::path::Path::new(&fixture(arch))).unwrap();
    let size = |name: &str| ckpt.get(name).unwrap().size_in_bytes() as u64;
    match arch {
        "gpt_oss_mxfp4" => {
            let p = "model.layers.0.mlp.experts";
            let packed = ["gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"]
                .iter()
                .map(|t| size(&format!("{p}.{t}")))
                .sum::<u64>()
                / 8;
            let dense = 2 * (192 * 96 + 96 * 96);
            (packed, dense)
        }
        _ => {
            let p = "model.layers.1.mlp.experts.0";
            let packed = ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .map(|t| size(&format!("{p}.{t}.weight")) + size(&format!("{p}.{t}.weight_scale_inv")))
                .sum::<u64>();
            (packed, 2 * 3 * 32 * 64)
        }
    }
}

#[test]
fn expert_nodes_serve_quantized_experts_packed() {
    for arch in ["gpt_oss_mxfp4", "qwen3_moe_fp8"] {
        let model = fixture(arch);
        // With coordinators, which count what each node holds from its heartbeats.
        let cluster = UpCluster::start_with(&["--model", &model, "--expert-nodes", "2"], &[]);
        answers_like_the_single_process_and_transformers(arch, &model, &cluster.addr);
        // Each node holds its experts packed: the bytes it reports are the stored size.
        let (packed, dense) = quantized_expert_bytes(arch);
        assert!(packed < dense, "{arch}: {packed} packed bytes an expert vs {dense} dense");
        let admin = cluster.security(switchyard_proto::tls::Role::Admin, "admin-probe");
        for n in cluster.status()["nodes"].as_array().unwrap() {
            let status = node_status(n["address"].as_str().unwrap(), &admin);
            assert!(!status.experts.is_empty(), "{arch}: a node holds nothing");
            assert_eq!(status.expert_bytes, status.experts.len() as u64 * packed, "{arch}: {status:?}");
        }
        // ... and so do the coordinators, from the nodes' heartbeats.
        let mut seen = Value::Null;
        let counted = wait_until(Duration::from_secs(10), || {
            seen = cluster.coordinator_status();
            seen["nodes"].as_array().unwrap().iter().all(|n| {
                n["held_bytes"].as_u64() == Some(n["experts"].as_u64().unwrap() * packed)
                    && n["experts"].as_u64() > Some(0)
            })
        });
        assert!(counted, "{arch}: the coordinators' view of the nodes' bytes: {seen:#}");
        cluster.stop();
    }
}

#[test]
fn a_router_given_sigterm_finishes_what_it_holds_within_its_bound() {
    let model = fixture("mixtral");
    let mut procs = Procs::default();
    // Each dispatch waits 10 ms, so requests are still running when the signal comes.
    let delay = [("SWITCHYARD_FAULT_DISPATCH_DELAY_MS", "10")];
    let node = address_of(
        &procs.start("node", &["expert-node", "--model", &model, "--experts", "all"], &delay),
        "expert-node",
    );
    let router = |procs: &mut Procs, name: &str, extra: &[&str]| {
        let args =
            [&["router", "--model", &model, "--expert-nodes", &node, "--http", "127.0.0.1:0"][..], extra].concat();
        let ready = procs.start(name, &args, &[]);
        (address_of(&ready, "grpc"), address_of(&ready, "http"))
    };
    let client = |grpc: &str, max_tokens: usize| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(with(&generate_args("mixtral", 2, max_tokens), &["--ignore-eos", "--router", grpc]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let exit_of = |procs: &mut Procs, name: &str| {
        let i = procs.0.iter().position(|(n, _)| n == name).unwrap();
        procs.0.remove(i).1.wait().unwrap()
    };

    // The request it holds completes, exactly; new connections are refused meanwhile.
    let (grpc, http) = router(&mut procs, "router", &[]);
    let want = run(&with(&generate_args("mixtral", 2, 60), &["--ignore-eos", "--model", &model]));
    let mut running = client(&grpc, 60);
    wait_running(&grpc, 1);
    signal(procs.pid("router"), libc::SIGTERM);
    let refused = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&http).is_err() && std::net::TcpStream::connect(&grpc).is_err()
    });
    assert!(refused, "the draining router still takes connections");
    assert!(running.try_wait().unwrap().is_none(), "refused only once the request ended: not during the drain");
    let out = running.wait_with_output().unwrap();
    assert!(out.status.success(), "the request was cut: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want, "the drained request differs from the single process");
    assert!(exit_of(&mut procs, "router").success(), "the router did not exit cleanly after its drain");

    // A drain that outlasts its bound is cut: the router exits, the request fails.
    let (grpc, _) = router(&mut procs, "bounded", &["--drain-timeout-secs", "0.2"]);
    let running = client(&grpc, 200);
    wait_running(&grpc, 1);
    signal(procs.pid("bounded"), libc::SIGTERM);
    assert!(exit_of(&mut procs, "bounded").success(), "the router did not exit cleanly at its bound");
    let out = running.wait_with_output().unwrap();
    assert!(!out.status.success(), "a 200-token request at 20 ms a token cannot finish in a 0.2 s drain");
}
