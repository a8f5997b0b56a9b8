//! Trust and abuse on the HTTP API, against the real binary on loopback: tenants pay up front
//! for what they may generate and get the rest back, `/metrics` needs an allowed key, an
//! over-limit tenant costs no tokenization, big prompts and slow clients cannot stall the
//! router, and `/health` says when an expert has no reachable replica.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

/// A tenants file in a temporary directory: `(name, key, extra TOML lines)` each.
fn tenants_file(dir: &tempfile::TempDir, tenants: &[(&str, &str, &str)]) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    for (name, key, extra) in tenants {
        let hash = sha256_hex(key);
        write!(text, "[[tenant]]\nname = \"{name}\"\napi_key_sha256 = \"{hash}\"\n{extra}\n\n").unwrap();
    }
    let path = dir.path().join("tenants.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn sha256_hex(key: &str) -> String {
    switchyard_router::tenants::hash_key(key).iter().map(|b| format!("{b:02x}")).collect()
}

/// `host:port` of a cluster's HTTP API.
fn host(cluster: &UpCluster) -> String {
    cluster.http.trim_start_matches("http://").trim_end_matches("/v1").to_string()
}

/// One HTTP/1.1 request (`Connection: close`): the status code and the body.
fn request(address: &str, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_string())
}

fn post(address: &str, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let (code, text) = request(address, "POST", path, key, Some(&body.to_string()));
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The value of a metric line that starts with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok()).unwrap_or(0.0)
}

#[test]
fn tenants_reserve_what_they_may_generate_and_get_back_what_they_did_not() {
    let dir = tempfile::tempdir().unwrap();
    let tenants =
        tenants_file(&dir, &[("small", "small-key", "tokens_per_minute = 200"), ("ops", "ops-key", "metrics = true")]);
    let model = fixture("mixtral");
    // Slow generation down so a streaming request is still running when its client leaves.
    let mut cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "1", "--tenants", &tenants],
        &[("SWITCHYARD_FAULT_DISPATCH_DELAY_MS", "10")],
    );
    cluster.api_key = Some("ops-key".into());
    let http = host(&cluster);
    let completion = |max_tokens: u64, n: u64, stream: bool| {
        json!({"model": "mixtral", "prompt": [1, 2], "max_tokens": max_tokens, "n": n, "ignore_eos": true,
               "temperature": 0, "stream": stream})
    };
    let small = Some("small-key");

    // A request that can never fit 200 tokens a minute is a client error naming the field.
    let (code, body) = post(&http, "/v1/completions", small, &completion(250, 1, false));
    assert_eq!(code, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    assert!(message.contains("needs 252 tokens") && message.contains("limit is 200"), "{message}");
    assert!(message.contains("lower `max_tokens` to 198"), "{message}");
    let (code, body) = post(&http, "/v1/completions", small, &completion(2, 128, false));
    assert_eq!((code, &body["error"]["param"]), (400, &json!("n")), "{body}");

    // n × (prompt + max_tokens) = 2 × (2 + 40) = 84 is reserved and used in full.
    let (code, body) = post(&http, "/v1/completions", small, &completion(40, 2, false));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 80);
    let (_, metrics) = request(&http, "GET", "/metrics", Some("ops-key"), None);
    assert_eq!(metric(&metrics, r#"switchyard:tenant_prompt_tokens_total{tenant="small"}"#), 4.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"switchyard:tenant_generation_tokens_total{tenant="small"}"#), 80.0);

    // About 116 are left: 2 + 150 does not fit now (429, not 400: it will later).
    let (code, body) = post(&http, "/v1/completions", small, &completion(150, 1, false));
    assert_eq!(code, 429, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("reserves 152"), "{body}");

    // A stream reserving 2 + 110 whose client leaves after a few tokens gives back the rest.
    let mut stream = TcpStream::connect(&http).unwrap();
    let body = completion(110, 1, true).to_string();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer small-key\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| *w == b"data: ").count() < 3 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&seen).contains("[DONE]"), "the stream must still be running");
    drop(stream);
    // Without the refund the bucket would hold a few tokens and need ~25 s to reach 92.
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || post(&http, "/v1/completions", small, &completion(90, 1, false)).0
            == 200),
        "the unused reservation of the abandoned stream did not come back"
    );
    println!("refund seen after {:?}", started.elapsed());
    cluster.stop();
}

#[test]
fn metrics_need_the_key_of_a_tenant_allowed_to_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let tenants = tenants_file(&dir, &[("app", "app-key", ""), ("ops", "ops-key", "metrics = true")]);
    let model = fixture("mixtral");
    let mut cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "1", "--tenants", &tenants], &[]);
    cluster.api_key = Some("ops-key".into());
    let http = host(&cluster);
    let (code, body) = request(&http, "GET", "/metrics", None, None);
    assert_eq!(code, 401, "{body}");
    let (code, body) = request(&http, "GET", "/metrics", Some("wrong"), None);
    assert_eq!(code, 401, "{body}");
    let (code, body) = request(&http, "GET", "/metrics", Some("app-key"), None);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("metrics = true"), "{body}");
    let (code, _) =
        post(&http, "/v1/completions", Some("app-key"), &json!({"model": "mixtral", "prompt": [1], "max_tokens": 1}));
    assert_eq!(code, 200);
    let (code, body) = request(&http, "GET", "/metrics", Some("ops-key"), None);
    assert_eq!(code, 200);
    assert!(body.contains(r#"switchyard:tenant_requests_total{tenant="app"} 1"#), "{body}");
    // /health stays open: load balancers probe it without a key.
    assert_eq!(request(&http, "GET", "/health", None, None).0, 200);
    cluster.stop();
}

#[test]
fn an_over_limit_tenant_is_refused_before_its_prompt_is_tokenized() {
    let dir = tempfile::tempdir().unwrap();
    let tenants =
        tenants_file(&dir, &[("once", "once-key", "requests_per_minute = 1"), ("ops", "ops-key", "metrics = true")]);
    let model = fixture("mixtral");
    let mut cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "1", "--tenants", &tenants, "--max-prompt-bytes", "4096"],
        &[],
    );
    cluster.api_key = Some("ops-key".into());
    let http = host(&cluster);
    let tokenized = || {
        let (_, metrics) = request(&http, "GET", "/metrics", Some("ops-key"), None);
        metric(&metrics, "switchyard:tokenize_seconds_count")
    };
    let once = Some("once-key");
    let (code, body) =
        post(&http, "/v1/completions", once, &json!({"model": "mixtral", "prompt": "hello", "max_tokens": 1}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(tokenized(), 1.0);
    for prompt in [json!("hello again"), json!("x".repeat(8000))] {
        let (code, body) = post(
            &http,
            "/v1/completions",
            once,
            &json!({"model": "mixtral", "prompt": prompt.clone(), "max_tokens": 1}),
        );
        assert_eq!(code, 429, "{body}");
        let chat = json!({"model": "mixtral", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1});
        assert_eq!(post(&http, "/v1/chat/completions", once, &chat).0, 429);
    }
    assert_eq!(tokenized(), 1.0, "refused requests must not be tokenized");
    cluster.stop();
}

#[test]
fn prompts_over_the_size_limit_are_refused_and_big_ones_do_not_stall_the_server() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "1", "--max-prompt-bytes", "2MiB", "--tokenizer-threads", "1"],
        &[],
    );
    let http = host(&cluster);
    let big = "the quick brown fox jumps over the lazy dog ".repeat((3 << 20) / 44);
    assert!(big.len() > 2 << 20);
    let (code, body) =
        post(&http, "/v1/completions", None, &json!({"model": "mixtral", "prompt": big, "max_tokens": 1}));
    assert_eq!((code, &body["error"]["param"]), (400, &json!("prompt")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("at most 2097152 bytes"), "{body}");
    let chat = json!({"model": "mixtral", "messages": [{"role": "user", "content": big}], "max_tokens": 1});
    let (code, body) = post(&http, "/v1/chat/completions", None, &chat);
    assert_eq!((code, &body["error"]["param"]), (400, &json!("messages")), "{body}");
    // The body limit follows the prompt limit (4× plus room for the rest of the request).
    let huge = "x".repeat(9 << 20);
    let (code, _) = post(&http, "/v1/completions", None, &json!({"model": "mixtral", "prompt": huge, "max_tokens": 1}));
    assert_eq!(code, 413);

    // Prompts under the limit that take a while to tokenize, several at once: /health
    // answers promptly all the while (they tokenize off the async workers).
    let allowed = big[..(2 << 20) - 100].to_string();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (http, prompt) = (http.clone(), allowed.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let body = json!({"model": "mixtral", "prompt": prompt, "max_tokens": 1});
                let (code, _) = post(&http, "/v1/completions", None, &body);
                (code, started.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    while !clients.iter().all(|c| c.is_finished()) {
        let started = Instant::now();
        assert_eq!(request(&http, "GET", "/health", None, None).0, 200);
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
    }
    let took: Vec<(u16, Duration)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    println!("big prompts: {took:?}; slowest /health meanwhile: {slowest:?}");
    // Tokenized (then refused: far over the model's context).
    assert!(took.iter().all(|(code, _)| *code == 400), "{took:?}");
    // Measured against the same run's tokenization, not a wall-clock budget: were the async
    // workers tokenizing, a /health would wait about as long as a prompt takes.
    let quickest = took.iter().map(|(_, t)| *t).min().unwrap();
    assert!(slowest * 4 < quickest, "/health took {slowest:?} while a prompt took {quickest:?} to tokenize");
    cluster.stop();
}

#[test]
fn slow_clients_are_cut_off_and_cannot_take_every_connection() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "1", "--http-header-timeout-secs", "1", "--http-max-connections", "60"],
        &[],
    );
    let http = host(&cluster);
    // 50 connections that send half a request line and then nothing.
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(&http).unwrap();
            s.write_all(b"GET /hea").unwrap();
            s
        })
        .collect();
    // The server still answers others meanwhile.
    assert_eq!(request(&http, "GET", "/health", None, None).0, 200);
    // And closes each slow one after the header timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &mut slow {
        s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 512];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue, // an error response before the close is fine
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    break false;
                }
                Err(_) => break true, // reset
            }
        };
        assert!(closed, "a connection that never sent its headers is still open after 10 s");
    }
    // An idle keep-alive connection is closed too.
    let mut keep = TcpStream::connect(&http).unwrap();
    keep.write_all(format!("GET /health HTTP/1.1\r\nHost: {http}\r\n\r\n").as_bytes()).unwrap();
    keep.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let eof = loop {
        match keep.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    assert!(eof, "an idle keep-alive connection is still open after 10 s");
    cluster.stop();
}

#[test]
fn at_most_max_connections_are_served_at_once() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(
        &["--model", &model, "--expert-nodes", "1", "--http-header-timeout-secs", "1", "--http-max-connections", "10"],
        &[],
    );
    let http = host(&cluster);
    let slow: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(&http).unwrap();
            s.write_all(b"GET /hea").unwrap();
            s
        })
        .collect();
    // The 11th waits for a slot: it is answered only once the server let a slow one go.
    assert_eq!(request(&http, "GET", "/health", None, None).0, 200);
    let mut closed = 0;
    for s in &slow {
        s.set_nonblocking(true).unwrap();
        let mut reader: &TcpStream = s;
        let mut buf = [0u8; 512];
        if !matches!(reader.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            closed += 1;
        }
    }
    assert!(closed >= 1, "the 11th connection was served while 10 were held open");
    cluster.stop();
}

#[test]
fn health_is_unavailable_while_an_expert_has_no_reachable_replica() {
    let model = fixture("mixtral");
    let mut procs = Procs::default();
    let a = address_of(&procs.start("a", &["expert-node", "--model", &model, "--experts", "0-3"], &[]), "expert-node");
    let b = address_of(&procs.start("b", &["expert-node", "--model", &model, "--experts", "4-7"], &[]), "expert-node");
    let nodes = format!("{a},{b}");
    let ready =
        procs.start("router", &["router", "--model", &model, "--expert-nodes", &nodes, "--http", "127.0.0.1:0"], &[]);
    let http = address_of(&ready, "http");
    let grpc = address_of(&ready, "grpc");
    assert_eq!(http_get(&http, "/health").0, "HTTP/1.1 200 OK");
    assert_eq!(grpc_health(&grpc), ServingStatus::Serving);
    procs.kill("b");
    let mut last = String::new();
    let unavailable = wait_until(Duration::from_secs(10), || {
        let (status, body) = http_get(&http, "/health");
        last = body;
        status == "HTTP/1.1 503 Service Unavailable"
    });
    assert!(unavailable, "/health stayed 200 with node b gone: {last}");
    assert!(last.contains("layer 0 expert 4 has no reachable replica") && last.contains(&b), "{last}");
    // gRPC health says the same.
    let not_serving = wait_until(Duration::from_secs(10), || grpc_health(&grpc) == ServingStatus::NotServing);
    assert!(not_serving, "gRPC health stayed SERVING with node b gone");
}

#[test]
fn the_grpc_api_takes_the_same_keys_and_limits_as_http() {
    use switchyard_proto::v1::generate_request::Prompt;
    use switchyard_proto::v1::router_client::RouterClient;
    use switchyard_proto::v1::{GenerateRequest, generate_response};
    use tonic::Code;

    let dir = tempfile::tempdir().unwrap();
    let tenants = tenants_file(
        &dir,
        &[
            ("once", "once-key", "requests_per_minute = 1"),
            ("small", "small-key", "tokens_per_minute = 50"),
            ("ops", "ops-key", "metrics = true"),
        ],
    );
    let model = fixture("mixtral");
    let mut cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "1", "--tenants", &tenants], &[]);
    cluster.api_key = Some("ops-key".into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = format!("http://{}", cluster.addr);
    let call = |key: Option<&str>, max_tokens: u32, top_logprobs: u32| {
        rt.block_on(async {
            let mut client = RouterClient::connect(addr.clone()).await.unwrap();
            let mut request = tonic::Request::new(GenerateRequest {
                prompt: Some(Prompt::Text("def fibonacci(n):".into())),
                max_tokens,
                top_logprobs,
                ..Default::default()
            });
            if let Some(key) = key {
                request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
            }
            let mut stream = client.generate(request).await?.into_inner();
            let mut tokens = 0;
            while let Some(event) = stream.message().await? {
                tokens += usize::from(matches!(event.event, Some(generate_response::Event::Token(_))));
            }
            Ok::<usize, tonic::Status>(tokens)
        })
    };
    let refused = |r: Result<usize, tonic::Status>| r.expect_err("should be refused");
    // No key, or a wrong one: UNAUTHENTICATED.
    assert_eq!(refused(call(None, 4, 0)).code(), Code::Unauthenticated);
    assert_eq!(refused(call(Some("guess"), 4, 0)).code(), Code::Unauthenticated);
    // A tenant's request limit holds on gRPC as on HTTP.
    assert_eq!(call(Some("once-key"), 4, 0).unwrap(), 4);
    let over = refused(call(Some("once-key"), 4, 0));
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(over.message().contains("requests per minute"), "{}", over.message());
    // A reservation that can never fit the token limit names `max_tokens`.
    let too_big = refused(call(Some("small-key"), 100, 0));
    assert_eq!(too_big.code(), Code::InvalidArgument, "{too_big:?}");
    assert!(too_big.message().contains("max_tokens"), "{}", too_big.message());
    // Top log-probabilities are capped as on HTTP.
    let many = refused(call(Some("small-key"), 2, 2048));
    assert!(many.code() == Code::InvalidArgument && many.message().contains("top_logprobs"), "{many:?}");
    // The cluster's status names every node: only for a tenant that may read metrics.
    let status = ["cluster", "status", "--router", &cluster.addr, "--json"];
    let err = stderr_of_failure(&status);
    assert!(err.contains("API key"), "{err}");
    let err = stderr_of_failure(&[&status[..], &["--api-key", "small-key"]].concat());
    assert!(err.contains("may not read the cluster's status"), "{err}");
    assert!(stdout_of(&[&status[..], &["--api-key", "ops-key"]].concat()).contains("\"nodes\""));
    // `generate --router` passes a key with --api-key.
    let args = ["generate", "--router", &cluster.addr, "--prompt", "x", "--max-tokens", "3", "--json"];
    let err = stderr_of_failure(&args);
    assert!(err.contains("API key"), "{err}");
    let out: Value = serde_json::from_str(&stdout_of(&[&args[..], &["--api-key", "small-key"]].concat())).unwrap();
    assert_eq!(out["tokens"].as_array().unwrap().len(), 3);
    cluster.stop();
}

#[test]
fn a_body_that_trickles_is_answered_408() {
    let model = fixture("mixtral");
    let cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "1", "--http-body-timeout-secs", "1"], &[]);
    let http = host(&cluster);
    // Headers at once, then a few bytes of a 100-byte body, then nothing.
    let mut slow = TcpStream::connect(&http).unwrap();
    write!(
        slow,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    )
    .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = slow.read(&mut buf) {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "a trickling body got: {response:?}");
    // The others are served meanwhile.
    assert_eq!(request(&http, "GET", "/health", None, None).0, 200);
    cluster.stop();
}

#[test]
fn routers_following_the_coordinators_share_one_budget_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let ops = ("ops", "ops-key", "metrics = true");
    let tenants = tenants_file(&dir, &[("small", "small-key", "tokens_per_minute = 200"), ops]);
    let model = fixture("mixtral");
    // `up` gives the tenants to the coordinators; a second router follows the same ones.
    let mut cluster = UpCluster::start_with(&["--model", &model, "--expert-nodes", "1", "--tenants", &tenants], &[]);
    cluster.api_key = Some("ops-key".into());
    let env = cluster.tls_env("router", "router-2");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut procs = Procs::default();
    let args = ["router", "--model", &model, "--coordinators", &cluster.coordinators, "--http", "127.0.0.1:0"];
    let second = address_of(&procs.start("router-2", &args, &env), "http");
    let first = host(&cluster);

    // 2 × (2 + 90) fit the 200 tokens a minute; a third does not, on either router (each
    // router's own bucket would still hold 108).
    let completion = json!({"model": "mixtral", "prompt": [1, 2], "max_tokens": 90, "ignore_eos": true,
                            "temperature": 0});
    let key = Some("small-key");
    assert_eq!(post(&first, "/v1/completions", key, &completion).0, 200);
    assert_eq!(post(&second, "/v1/completions", key, &completion).0, 200);
    for router in [&first, &second] {
        let (code, body) = post(router, "/v1/completions", key, &completion);
        assert_eq!(code, 429, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("200 tokens per minute"), "{body}");
    }
    assert_eq!(post(&second, "/v1/completions", None, &completion).0, 401);

    // New tenants reach every router without a restart.
    let replaced = tenants_file(&dir, &[("big", "big-key", "tokens_per_minute = 100000"), ops]);
    let admin = cluster.tls_env("admin", "ops");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["cluster", "set-tenants", &replaced, "--coordinators", &cluster.coordinators])
        .envs(admin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for router in [&first, &second] {
        let switched = wait_until(Duration::from_secs(10), || {
            post(router, "/v1/completions", Some("big-key"), &completion).0 == 200
        });
        assert!(switched, "{router} did not take the new tenants");
        assert_eq!(post(router, "/v1/completions", key, &completion).0, 401);
    }

    // A router cannot be given its own tenants while it follows coordinators.
    let err = stderr_of_failure(&[&args[..], &["--tenants", &tenants]].concat());
    assert!(err.contains("cluster set-tenants"), "{err}");
    drop(procs);
    cluster.stop();
}

#[test]
fn grpc_generate_is_checked_and_detokenized_as_http() {
    use switchyard_proto::v1::generate_request::Prompt;
    use switchyard_proto::v1::router_client::RouterClient;
    use switchyard_proto::v1::{GenerateRequest, generate_response};

    let model = fixture("mixtral");
    let cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "1"], &[]);
    let http = host(&cluster);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = format!("http://{}", cluster.addr);
    // (the streamed deltas joined, the finished text), or the refusal.
    let grpc = |request: GenerateRequest| {
        rt.block_on(async {
            let mut client = RouterClient::connect(addr.clone()).await.unwrap();
            let mut stream = client.generate(request).await?.into_inner();
            let (mut deltas, mut finished) = (String::new(), None);
            while let Some(event) = stream.message().await? {
                match event.event {
                    Some(generate_response::Event::Token(t)) => deltas.push_str(&t.delta),
                    Some(generate_response::Event::Finished(f)) => finished = Some(f.text),
                    _ => {}
                }
            }
            Ok::<_, tonic::Status>((deltas, finished.expect("a finished event")))
        })
    };
    let prompt = "def fibonacci(n):";
    let base = GenerateRequest {
        prompt: Some(Prompt::Text(prompt.into())),
        max_tokens: 24,
        presence_penalty: Some(0.5),
        logit_bias: [(5, -100.0)].into(),
        ..Default::default()
    };
    let body = |stop: &[String]| {
        json!({"model": "mixtral", "prompt": prompt, "max_tokens": 24, "temperature": 0, "presence_penalty": 0.5,
               "logit_bias": {"5": -100}, "stop": stop})
    };
    let (code, full) = post(&http, "/v1/completions", None, &body(&[]));
    assert_eq!(code, 200, "{full}");
    let full = full["choices"][0]["text"].as_str().unwrap().to_string();
    // The same controls give the same text on both APIs.
    let (deltas, finished) = grpc(base.clone()).unwrap();
    assert_eq!((deltas.as_str(), finished.as_str()), (full.as_str(), full.as_str()));
    // A stop string from the middle of that text cuts both at the same place.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    let stop: String = chars[3..5].iter().collect();
    let (_, cut) = post(&http, "/v1/completions", None, &body(std::slice::from_ref(&stop)));
    let cut = cut["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(cut.len() < full.len() && !cut.contains(&stop), "{cut:?} / {full:?}");
    let (deltas, finished) = grpc(GenerateRequest { stop: vec![stop], ..base.clone() }).unwrap();
    assert_eq!((deltas.as_str(), finished.as_str()), (cut.as_str(), cut.as_str()));
    // Structured output: the same grammar gives the same text on both APIs, and a schema the
    // grammar engine does not implement is refused naming the field.
    let guided = json!({"model": "mixtral", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                        "presence_penalty": 0.5, "logit_bias": {"5": -100}, "guided_regex": "[a-z]{3,6}"});
    let (code, text) = post(&http, "/v1/completions", None, &guided);
    assert_eq!(code, 200, "{text}");
    let text = text["choices"][0]["text"].as_str().unwrap().to_string();
    assert!((3..=6).contains(&text.len()) && text.chars().all(|c| c.is_ascii_lowercase()), "{text:?}");
    let (deltas, finished) = grpc(GenerateRequest { guided_regex: "[a-z]{3,6}".into(), ..base.clone() }).unwrap();
    assert_eq!((deltas.as_str(), finished.as_str()), (text.as_str(), text.as_str()));
    let status =
        grpc(GenerateRequest { guided_json: r#"{"type": "object", "if": {}}"#.into(), ..base.clone() }).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("guided_json") && status.message().contains("if"), "{status:?}");
    // A value out of range is refused with the HTTP API's message, naming the field.
    let (_, refused) = post(&http, "/v1/completions", None, &json!({"model": "mixtral", "prompt": "x", "min_p": 2}));
    let status = grpc(GenerateRequest { min_p: Some(2.0), ..base }).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains(refused["error"]["message"].as_str().unwrap()), "{status:?} / {refused}");
    cluster.stop();
}

#[test]
fn grpc_generate_reports_prompt_logprobs_and_cached_tokens() {
    use switchyard_proto::v1::generate_request::Prompt;
    use switchyard_proto::v1::router_client::RouterClient;
    use switchyard_proto::v1::{GenerateRequest, Started, TokenIds, generate_response};

    #[derive(serde::Deserialize)]
    struct Case {
        ids: Vec<u32>,
        logprobs: Vec<f32>,
    }
    #[derive(serde::Deserialize)]
    struct Recorded {
        cases: Vec<Case>,
    }
    let model = fixture("mixtral");
    let text = std::fs::read_to_string(std::path::Path::new(&model).join("prompt_logprobs.json")).unwrap();
    let recorded: Recorded = serde_json::from_str(&text).unwrap();
    let case = recorded.cases.iter().max_by_key(|c| c.ids.len()).unwrap();
    let cluster = UpCluster::start(&["--model", &model, "--expert-nodes", "1"], &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = format!("http://{}", cluster.addr);
    let started = |request: GenerateRequest| -> Result<Started, tonic::Status> {
        rt.block_on(async {
            let mut client = RouterClient::connect(addr.clone()).await.unwrap();
            let mut stream = client.generate(request).await?.into_inner();
            let mut first = None;
            while let Some(event) = stream.message().await? {
                if let Some(generate_response::Event::Started(s)) = event.event {
                    first.get_or_insert(s);
                }
            }
            Ok(first.expect("a started event"))
        })
    };
    let base = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: case.ids.clone() })),
        max_tokens: 1,
        ..Default::default()
    };
    // transformers' log-probability of every prompt token but the first.
    let scored = started(GenerateRequest { prompt_logprobs: Some(5), ..base.clone() }).unwrap();
    assert_eq!(scored.prompt_logprobs.len(), case.ids.len() - 1);
    for (i, (got, want)) in scored.prompt_logprobs.iter().zip(&case.logprobs).enumerate() {
        assert_eq!(got.id, case.ids[i + 1]);
        assert!((got.logprob - want).abs() < 1e-3, "position {}: {} vs transformers {want}", i + 1, got.logprob);
        assert_eq!(got.top_logprobs.len(), 5);
    }
    let status = started(GenerateRequest { prompt_logprobs: Some(21), ..base.clone() }).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("prompt_logprobs"), "{status:?}");
    // The scored prompt's blocks are cached: the same prompt again takes all but its last
    // (partial) block from them; another salt takes none.
    let servable = (case.ids.len() - 1) / 16 * 16;
    assert!(servable > 0);
    assert_eq!(started(base.clone()).unwrap().cached_tokens as usize, servable);
    assert!(started(base.clone()).unwrap().prompt_logprobs.is_empty(), "not asked for");
    assert_eq!(started(GenerateRequest { cache_salt: "other".into(), ..base }).unwrap().cached_tokens, 0);
    cluster.stop();
}
