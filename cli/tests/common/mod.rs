//! Helpers for tests that run the real `switchyard` binary: fixtures, one-shot commands, and a
//! cluster started with `switchyard up` that is stopped (and checked for orphans) on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn fixture(arch: &str) -> String {
    fixtures().join(arch).to_str().unwrap().to_string()
}

pub fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).envs(tls_env(args, &[])).output().expect("run switchyard")
}

/// The CA of the roles a test starts itself (one per test binary); `switchyard up` makes its own.
fn test_ca() -> &'static Path {
    static CA: OnceLock<tempfile::TempDir> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["tls", "ca", "--dir", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "tls ca: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .path()
}

/// Issues a certificate of `role` from the CA in `dir`; returns the environment that makes a
/// `switchyard` process present it.
pub fn certificate_env(dir: &Path, role: &str, name: &str) -> Vec<(String, String)> {
    let d = dir.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["tls", "issue", "--dir", d, "--role", role, "--name", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "tls issue: {}", String::from_utf8_lossy(&out.stderr));
    vec![
        ("SWITCHYARD_TLS_CA".into(), format!("{d}/ca.pem")),
        ("SWITCHYARD_TLS_CERT".into(), format!("{d}/{name}.pem")),
        ("SWITCHYARD_TLS_KEY".into(), format!("{d}/{name}-key.pem")),
    ]
}

/// A `role` certificate from the CA of the roles a test starts, for calls the test makes itself.
pub fn test_security(role: switchyard_proto::tls::Role, name: &str) -> switchyard_proto::tls::Security {
    let env = certificate_env(test_ca(), role.name(), name);
    switchyard_proto::tls::TlsFlags::files(&env[0].1, &env[1].1, &env[2].1).load(role).unwrap()
}

/// What makes `switchyard args` talk mutual TLS to the roles a test starts: a certificate
/// of its own, for the role its subcommand plays (an admin's for `cluster`), from the test's
/// CA. Nothing where `args` or `env` already say how (or for `up`, which makes its own).
pub fn tls_env(args: &[&str], env: &[(&str, &str)]) -> Vec<(String, String)> {
    let given = |k: &str| k.starts_with("SWITCHYARD_TLS_") || k == "SWITCHYARD_INSECURE_PLAINTEXT";
    if env.iter().any(|(k, _)| given(k)) || args.iter().any(|a| a.starts_with("--tls-") || *a == "--insecure-plaintext")
    {
        return Vec::new();
    }
    let role = match args.first().copied() {
        Some("coordinator") => "coordinator",
        Some("expert-node") => "expert-node",
        Some("router") => "router",
        Some("cluster") => "admin",
        _ => return Vec::new(),
    };
    if role == "admin" {
        // One for every CLI call (status polls call often): it identifies no process.
        static ADMIN: OnceLock<Vec<(String, String)>> = OnceLock::new();
        return ADMIN
            .get_or_init(|| certificate_env(test_ca(), "admin", &format!("admin-{}", std::process::id())))
            .clone();
    }
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{role}-{}-{}", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed));
    certificate_env(test_ca(), role, &name)
}

pub fn expected(arch: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("expected.json")).unwrap()).unwrap()
}

/// Runs `switchyard args`, asserts success and returns stdout.
pub fn stdout_of(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(out.status.success(), "switchyard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `switchyard args`, asserts it fails with a one-line error, and returns the error.
pub fn stderr_of_failure(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(!out.status.success(), "switchyard {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "the last line should be the error: {err}");
    assert!(!err.contains("panicked"), "must not panic: {err}");
    last
}

/// The address after `what` in a ready line (`grpc 127.0.0.1:1 http 127.0.0.1:2`).
pub fn address_of(ready: &str, what: &str) -> String {
    let words: Vec<&str> = ready.split(' ').collect();
    let i = words.iter().position(|w| *w == what).unwrap_or_else(|| panic!("no {what} in `{ready}`"));
    words[i + 1].to_string()
}

/// Starts `switchyard args` with stdout piped and waits for its `ready: ...` line; returns the
/// child and what follows `ready: `.
pub fn spawn_ready(args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .envs(tls_env(args, env))
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start switchyard");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ready: ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(addr) => (child, addr),
        Err(_) => {
            let _ = child.kill();
            panic!("switchyard {args:?} did not print a ready line");
        }
    }
}

pub fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); it has exited, which is what matters here.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.rsplit(')').next().unwrap_or_default().trim_start().starts_with('Z')
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (directly or through `switchyard up`).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A free loopback address for a process the test may restart on the same port.
pub fn free_address() -> String {
    switchyard_proto::server::stable_loopback_address().unwrap().to_string()
}

/// Starts a one-member coordinator group (it leads at once) as `coordinator` in `procs`, with
/// its data in `data` and `extra` flags; returns its address.
pub fn start_lone_coordinator(procs: &mut Procs, data: &Path, extra: &[&str]) -> String {
    let mut args = vec!["coordinator", "--id", "1", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    let ready = procs.start("coordinator", &args, &[]);
    ready.rsplit(' ').next().unwrap().to_string()
}

/// Processes started by a test, killed when it ends.
#[derive(Default)]
pub struct Procs(pub Vec<(String, Child)>);

impl Procs {
    /// Starts `switchyard args` (with `env`) as `name`; returns its ready line.
    pub fn start(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
        let (child, ready) = spawn_ready(args, env);
        self.0.push((name.to_string(), child));
        ready
    }

    pub fn pid(&self, name: &str) -> u32 {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c.id()).unwrap_or_else(|| panic!("no process {name}"))
    }

    pub fn kill(&mut self, name: &str) {
        let i = self.0.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut child) = self.0.remove(i);
        signal(child.id(), libc::SIGKILL);
        child.wait().unwrap();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// `GET path` on `address` (`host:port`) over HTTP/1.1: the status line and the body.
pub fn http_get(address: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// A cluster started with `switchyard up`.
pub struct UpCluster {
    pub child: Child,
    /// The router's gRPC address.
    pub addr: String,
    /// The OpenAI API's base URL, `http://host:port/v1`.
    pub http: String,
    /// The coordinators' addresses, comma-separated (empty: a fixed placement).
    pub coordinators: String,
    /// A key of a tenant with `metrics = true`, for a cluster started with `--tenants`.
    pub api_key: Option<String>,
    /// Where `up` keeps the cluster's CA and certificates (`None`: plaintext).
    pub tls: Option<PathBuf>,
}

impl UpCluster {
    /// `switchyard up` with a fixed placement (`--coordinators 0`) and `args`.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut full = vec!["--coordinators", "0"];
        full.extend_from_slice(args);
        Self::start_with(&full, env)
    }

    /// `switchyard up` with just `args` (coordinators by default).
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut full = vec!["up", "--http", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let (child, ready) = spawn_ready(&full, env);
        let coordinators =
            if ready.contains("coordinators") { address_of(&ready, "coordinators") } else { String::new() };
        UpCluster {
            child,
            addr: address_of(&ready, "grpc"),
            http: format!("http://{}/v1", address_of(&ready, "http")),
            coordinators,
            api_key: None,
            tls: ready.contains(" tls ").then(|| PathBuf::from(address_of(&ready, "tls"))),
        }
    }

    pub fn status(&self) -> Value {
        let mut args = vec!["cluster", "status", "--router", &self.addr, "--json"];
        if let Some(key) = &self.api_key {
            args.extend(["--api-key", key]);
        }
        serde_json::from_str(&stdout_of(&args)).unwrap()
    }

    /// The coordinators' view (`cluster status --coordinators ... --json`'s `coordinator`).
    pub fn coordinator_status(&self) -> Value {
        let args = ["cluster", "status", "--coordinators", &self.coordinators, "--json"];
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .envs(self.tls_env("admin", "admin"))
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["coordinator"].clone()
    }

    /// A `role` certificate of this cluster's CA (issued now, as `name`), for calls the test
    /// makes itself.
    pub fn security(&self, role: switchyard_proto::tls::Role, name: &str) -> switchyard_proto::tls::Security {
        let env = self.tls_env(role.name(), name);
        switchyard_proto::tls::TlsFlags::files(&env[0].1, &env[1].1, &env[2].1).load(role).unwrap()
    }

    /// The environment that makes a process present a `role` certificate of this cluster's
    /// CA (issued now, as `name`).
    pub fn tls_env(&self, role: &str, name: &str) -> Vec<(String, String)> {
        let dir = self.tls.as_ref().expect("the cluster runs mutual TLS");
        certificate_env(dir, role, name)
    }

    pub fn node_pids(&self) -> Vec<u32> {
        self.status()["nodes"].as_array().unwrap().iter().map(|n| n["pid"].as_u64().unwrap() as u32).collect()
    }

    /// SIGTERM to `up`; asserts it and every expert node exit.
    pub fn stop(mut self) {
        let pids = self.node_pids();
        signal(self.child.id(), libc::SIGTERM);
        let up = self.child.id();
        assert!(wait_until(Duration::from_secs(20), || !alive(up) || self.child.try_wait().unwrap().is_some()));
        assert!(wait_until(Duration::from_secs(10), || pids.iter().all(|&p| !alive(p))), "expert nodes outlived `up`");
    }
}

impl Drop for UpCluster {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A client of the expert node at `address`, connecting with `security`.
pub async fn expert_client(
    address: &str,
    security: &switchyard_proto::tls::Security,
) -> switchyard_proto::v1::expert_service_client::ExpertServiceClient<tonic::transport::Channel> {
    let endpoint = security.endpoint(address, switchyard_proto::tls::Role::Node).unwrap();
    switchyard_proto::v1::expert_service_client::ExpertServiceClient::new(
        endpoint.connect().await.expect("the node answers"),
    )
}

/// The router's standard gRPC health (`grpc.health.v1`) for its `Router` service.
pub fn grpc_health(address: &str) -> tonic_health::pb::health_check_response::ServingStatus {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap();
        let mut client = HealthClient::new(channel.connect().await.expect("the router answers"));
        let request = HealthCheckRequest { service: "switchyard.v1.Router".into() };
        client.check(request).await.expect("a health answer").into_inner().status()
    })
}

/// Waits until the router at `router` (gRPC) runs `n` requests at once: they are
/// mid-generation.
pub fn wait_running(router: &str, n: usize) {
    let mut last = Value::Null;
    let running = wait_until(Duration::from_secs(30), || {
        last = serde_json::from_str(&stdout_of(&["cluster", "status", "--router", router, "--json"])).unwrap();
        last["running_requests"].as_u64() == Some(n as u64)
    });
    assert!(running, "the router never ran {n} requests at once: {last:#}");
}
