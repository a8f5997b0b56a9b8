//! `switchyard bench cluster`: what the coordinators do under load, on a cluster started with
//! `switchyard up` (child processes on loopback):
//!
//! - failover: clients keep sending completions while one expert node is SIGKILLed; reports
//!   the time from the kill to the new placement epoch being active, and the requests that
//!   failed meanwhile (target: under 3 s, none);
//! - balance: clients send prompts drawn from a Zipf distribution (a few prompts, and so a few
//!   experts, take most of the traffic); reports the max/mean node load the leader measured
//!   before its rebalance and the same measure after it;
//! - a node that answers wrongly: under load, an expert node that adds 50 to every partial sum
//!   registers; reports the time until it holds experts and until it is refused and drained,
//!   and the answers that differed from the cluster's answers before it came (target: none).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use switchyard_coordinator::client::Client;
use switchyard_coordinator::convert::{active, epoch_state_name, node_state_name};
use switchyard_proto::tls::{Role, TlsFlags};
use switchyard_proto::v1::{ClusterStatusRequest, CoordinatorStatus};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::progress::Progress;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Checkpoint (default: the embedded code model).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<std::path::PathBuf>,
    /// Expert nodes in the cluster.
    #[arg(long, default_value_t = 4)]
    expert_nodes: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Tokens per completion.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Replica counts to measure failover with (1: the dead node's experts exist nowhere
    /// until they are re-placed).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    replicas: Vec<usize>,
    /// Zipf exponent of the balance workload's prompt choice.
    #[arg(long, default_value_t = 1.2)]
    zipf: f64,
    /// The coordinators' rebalancing threshold (max/mean predicted node load) in the balance
    /// measurement.
    #[arg(long, default_value_t = 1.1)]
    imbalance_threshold: f64,
}

type Http = HttpClient<HttpConnector, Full<Bytes>>;

/// Prompts of the balance workload, most popular first.
const PROMPTS: [&str; 8] = [
    "import numpy as np",
    "def fibonacci(n):",
    "class Stack:",
    "for i in range(10):",
    "import os\nimport sys",
    "def main():",
    "with open(path) as f:",
    "try:\n    import json",
];

/// A cluster started with `switchyard up`, stopped on drop.
struct Up {
    child: tokio::process::Child,
    http: String,
    /// The served model's name.
    model: String,
    router: String,
    coordinators: Client,
    /// The cluster's CA and certificates (`up` makes them).
    tls: std::path::PathBuf,
}

impl Up {
    async fn start(args: &Args, extra: &[&str]) -> Result<Up> {
        let exe = std::env::current_exe()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["up", "--http", "127.0.0.1:0", "--expert-nodes", &args.expert_nodes.to_string()]);
        if let Some(m) = &args.model {
            cmd.arg("--model").arg(m);
        }
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
        let mut child = cmd.spawn().context("cannot start `switchyard up`")?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("ready: ") {
                    return Ok(rest.to_string());
                }
            }
            bail!("`switchyard up` exited before it was ready")
        })
        .await
        .context("`switchyard up` did not get ready in 120 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let word = |w: &str| -> Result<String> {
            let words: Vec<&str> = ready.split(' ').collect();
            let i = words.iter().position(|x| *x == w).with_context(|| format!("no {w} in `{ready}`"))?;
            Ok(words[i + 1].to_string())
        };
        let coordinators: Vec<String> = word("coordinators")?.split(',').map(String::from).collect();
        let http = format!("http://{}", word("http")?);
        let client: Http = HttpClient::builder(TokioExecutor::new()).build_http();
        let models = client.get(format!("{http}/v1/models").parse()?).await?.into_body().collect().await?.to_bytes();
        let models: serde_json::Value = serde_json::from_slice(&models)?;
        let model = models["data"][0]["id"].as_str().context("the server lists no model")?.to_string();
        let tls = std::path::PathBuf::from(word("tls")?);
        let admin = TlsFlags::files(tls.join("ca.pem"), tls.join("admin.pem"), tls.join("admin-key.pem"));
        let security = admin.load(Role::Admin).map_err(anyhow::Error::msg)?;
        Ok(Up {
            child,
            http,
            model,
            router: word("grpc")?,
            coordinators: Client::new(&coordinators, &security).map_err(anyhow::Error::msg)?,
            tls,
        })
    }

    async fn status(&self) -> Result<CoordinatorStatus> {
        self.coordinators.status().await.map_err(|s| anyhow::anyhow!("coordinator status: {}", s.message()))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }
}

/// Clients sending completions until stopped; counts successes and failures, and, given the
/// expected text of each prompt, answers that differ from it.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One greedy completion of `prompt` (`ignore_eos`, `max_tokens` tokens) from the server at
/// `base` serving `model`: its text.
async fn complete(http: &Http, base: &str, model: &str, prompt: &str, max_tokens: usize) -> Result<String> {
    let body =
        json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let req = hyper::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = http.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{status} {}", String::from_utf8_lossy(&body));
    }
    let answer: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(answer["choices"][0]["text"].as_str().context("no text in the answer")?.to_string())
}

impl Load {
    fn start(up: &Up, args: &Args, zipf: Option<f64>) -> Load {
        Self::start_checked(up, args, zipf, None)
    }

    /// [`Load::start`], counting answers that differ from `expected[prompt]`.
    fn start_checked(up: &Up, args: &Args, zipf: Option<f64>, expected: Option<Arc<Vec<String>>>) -> Load {
        let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
        let (stop, ok, failed): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) = Default::default();
        let wrong: Arc<AtomicU64> = Default::default();
        let weights: Vec<f64> = (1..=PROMPTS.len()).map(|k| 1.0 / (k as f64).powf(zipf.unwrap_or(0.0))).collect();
        let tasks = (0..args.clients)
            .map(|c| {
                let (http, stop, ok, failed, wrong) =
                    (http.clone(), stop.clone(), ok.clone(), failed.clone(), wrong.clone());
                let (weights, max_tokens, expected) = (weights.clone(), args.max_tokens, expected.clone());
                let (base, model) = (up.http.clone(), up.model.clone());
                tokio::spawn(async move {
                    let mut rng = switchyard_model::sampling::Rng::new(c as u64 + 1);
                    while !stop.load(Ordering::Relaxed) {
                        let p = pick(&weights, rng.next_f64());
                        match complete(&http, &base, &model, PROMPTS[p], max_tokens).await {
                            Ok(text) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if expected.as_ref().is_some_and(|e| e[p] != text) {
                                    wrong.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                tracing::warn!("request failed: {e:#}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, wrong, tasks }
    }

    async fn finish(self) -> (u64, u64) {
        let (ok, failed, _) = self.finish_checked().await;
        (ok, failed)
    }

    /// Stops the clients: requests that succeeded, failed, and answered wrongly.
    async fn finish_checked(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), self.wrong.load(Ordering::Relaxed))
    }
}

/// Index drawn from `weights` (unnormalized) by `u` in [0, 1).
fn pick(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let mut at = u * total;
    for (i, w) in weights.iter().enumerate() {
        if at < *w {
            return i;
        }
        at -= w;
    }
    weights.len() - 1
}

struct FailoverRow {
    replicas: usize,
    to_epoch: Duration,
    ok: u64,
    failed: u64,
}

async fn failover(args: &Args, replicas: usize) -> Result<FailoverRow> {
    let up = Up::start(args, &["--replicas", &replicas.to_string()]).await?;
    let load = Load::start(&up, args, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut router = crate::cluster::router_client(&up.router).await?;
    let nodes = router.cluster_status(ClusterStatusRequest {}).await?.into_inner().nodes;
    let victim = nodes.first().context("the router has no expert node")?;
    let before = up.status().await?;
    let epoch_before = before.placement.as_ref().and_then(active).map_or(0, |(e, _)| e);
    let killed = Instant::now();
    // SAFETY: kill(2) on an expert node `up` started for this benchmark.
    unsafe { libc::kill(victim.pid as libc::pid_t, libc::SIGKILL) };
    let to_epoch = loop {
        let status = up.status().await?;
        let placement = status.placement.unwrap_or_default();
        let dead = placement.nodes.iter().find(|n| n.address == victim.address).map(|n| n.id);
        let moved = active(&placement)
            .is_some_and(|(e, a)| e > epoch_before && !a.values().flatten().any(|n| Some(*n) == dead));
        let settled = !placement.epochs.iter().any(|e| epoch_state_name(e.state) == "pending");
        if moved && settled {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no new epoch within 30 s of the kill");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed) = load.finish().await;
    up.stop().await;
    Ok(FailoverRow { replicas, to_epoch, ok, failed })
}

struct LeaderRow {
    to_leader: Duration,
    ok: u64,
    failed: u64,
}

/// SIGKILLs the coordinators' leader under load; times the election of a new one.
async fn leader_failover(args: &Args) -> Result<LeaderRow> {
    let up = Up::start(args, &[]).await?;
    let load = Load::start(&up, args, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = up.status().await?;
    let (leader, pid) = (before.leader_id, before.pid);
    if leader == 0 || before.id != leader {
        bail!("no leader answered the status (answered by {}, leader {leader})", before.id);
    }
    let killed = Instant::now();
    // SAFETY: kill(2) on a coordinator `up` started for this benchmark.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let to_leader = loop {
        if let Ok(status) = up.status().await
            && status.leader_id != 0
            && status.leader_id != leader
        {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no new leader within 30 s of the kill");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed) = load.finish().await;
    up.stop().await;
    Ok(LeaderRow { to_leader, ok, failed })
}

struct BalanceRow {
    before: f64,
    after: f64,
    predicted: String,
    to_rebalance: Duration,
}

async fn balance(args: &Args) -> Result<BalanceRow> {
    let threshold = args.imbalance_threshold.to_string();
    let up =
        Up::start(args, &["--replicas", "1", "--balance-interval-ms", "1000", "--imbalance-threshold", &threshold])
            .await?;
    let start = Instant::now();
    let load = Load::start(&up, args, Some(args.zipf));
    let reason = loop {
        let status = up.status().await?;
        let placement = status.placement.unwrap_or_default();
        if let Some(e) = placement.epochs.iter().find(|e| epoch_state_name(e.state) == "active")
            && e.reason.starts_with("rebalance")
        {
            break e.reason.clone();
        }
        if start.elapsed() > Duration::from_secs(60) {
            load.finish().await;
            bail!("no rebalance within 60 s (the workload may not be skewed enough)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let to_rebalance = start.elapsed();
    // The measure after: three full load windows under the new epoch.
    let mut after = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        after.push(up.status().await?.imbalance);
    }
    load.finish().await;
    up.stop().await;
    let before = reason
        .strip_prefix("rebalance: measured imbalance ")
        .and_then(|r| r.split(';').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(f64::NAN);
    let predicted = reason.split("predicted ").nth(1).unwrap_or_default().to_string();
    Ok(BalanceRow { before, after: after.iter().sum::<f64>() / after.len() as f64, predicted, to_rebalance })
}

struct RogueRow {
    to_placed: Duration,
    to_drained: Duration,
    ok: u64,
    failed: u64,
    wrong: u64,
}

/// Under load, an expert node that adds 50 to every partial sum registers with the
/// coordinators; times its placement and its refusal, and counts wrong answers.
async fn rogue_node(args: &Args) -> Result<RogueRow> {
    let up = Up::start(args, &["--balance-interval-ms", "500"]).await?;
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    let mut expected = Vec::new();
    for prompt in PROMPTS {
        expected.push(complete(&http, &up.http, &up.model, prompt, args.max_tokens).await?);
    }
    let load = Load::start_checked(&up, args, None, Some(Arc::new(expected)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => crate::up::embedded_model()?,
    };
    let coordinators = up.coordinators.addresses().join(",");
    // An insider: a process holding a valid expert-node certificate of the cluster.
    let certificate = crate::certs::Authority::open(&up.tls)?.issue(Role::Node, "rogue")?;
    let mut rogue = tokio::process::Command::new(std::env::current_exe()?)
        .args(["expert-node", "--listen", "127.0.0.1:0", "--coordinators", &coordinators, "--model"])
        .arg(&model)
        .args(crate::certs::as_args(&certificate))
        .env("SWITCHYARD_FAULT_WRONG_ANSWERS", "50")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the rogue expert node")?;
    let mut lines = BufReader::new(rogue.stdout.take().context("no stdout")?).lines();
    let address = loop {
        match lines.next_line().await? {
            Some(line) if line.starts_with("ready: ") => break line.rsplit(' ').next().unwrap_or_default().to_string(),
            Some(_) => {}
            None => bail!("the rogue expert node exited before it was ready"),
        }
    };
    let started = Instant::now();
    let mut to_placed = None;
    let to_drained = loop {
        let placement = up.status().await?.placement.unwrap_or_default();
        let node = placement.nodes.iter().find(|n| n.address == address);
        let placed =
            node.is_some_and(|n| active(&placement).is_some_and(|(_, a)| a.values().flatten().any(|&x| x == n.id)));
        if placed && to_placed.is_none() {
            to_placed = Some(started.elapsed());
        }
        let draining = node.is_some_and(|n| node_state_name(n.state) == "draining");
        if to_placed.is_some() && draining && !placed {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the rogue node was not {} within 60 s", if to_placed.is_some() { "drained" } else { "placed" });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed, wrong) = load.finish_checked().await;
    let _ = rogue.kill().await;
    up.stop().await;
    Ok(RogueRow { to_placed: to_placed.unwrap_or_default(), to_drained, ok, failed, wrong })
}

pub fn run(args: Args) -> Result<()> {
    let rt = crate::launch::runtime()?;
    let progress = Progress::new("measuring");
    let steps = args.replicas.len() + 3;
    let mut rows = Vec::new();
    for (i, &r) in args.replicas.iter().enumerate() {
        progress.update(i, steps);
        rows.push(rt.block_on(failover(&args, r))?);
    }
    progress.update(args.replicas.len(), steps);
    println!("Failover: one of {} expert nodes SIGKILLed under {} clients", args.expert_nodes, args.clients);
    println!("| replicas | kill -> new epoch active | requests ok | requests failed |");
    println!("|---:|---:|---:|---:|");
    for r in &rows {
        println!("| {} | {:.2} s | {} | {} |", r.replicas, r.to_epoch.as_secs_f64(), r.ok, r.failed);
    }
    let leader = rt.block_on(leader_failover(&args))?;
    progress.update(args.replicas.len() + 1, steps);
    println!();
    println!("Leader failover: the coordinators' leader SIGKILLed under {} clients", args.clients);
    println!("| kill -> new leader | requests ok | requests failed |");
    println!("|---:|---:|---:|");
    println!("| {:.2} s | {} | {} |", leader.to_leader.as_secs_f64(), leader.ok, leader.failed);
    println!();
    let balanced = rt.block_on(balance(&args))?;
    progress.update(args.replicas.len() + 2, steps);
    let rogue = rt.block_on(rogue_node(&args))?;
    progress.finish();
    println!(
        "Balance: Zipf({}) over {} prompts, {} clients, 1 replica to start",
        args.zipf,
        PROMPTS.len(),
        args.clients
    );
    println!("| measured max/mean before | after (3 windows) | predicted by the plan | time to rebalance |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {:.2} | {:.2} | {} | {:.1} s |",
        balanced.before,
        balanced.after,
        balanced.predicted,
        balanced.to_rebalance.as_secs_f64()
    );
    println!();
    println!("A node that answers wrongly (adds 50 to every partial sum) joins under {} clients", args.clients);
    println!(
        "| ready -> holds experts | ready -> refused and drained | requests ok | requests failed | wrong answers |"
    );
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.2} s | {:.2} s | {} | {} | {} |",
        rogue.to_placed.as_secs_f64(),
        rogue.to_drained.as_secs_f64(),
        rogue.ok,
        rogue.failed,
        rogue.wrong
    );
    Ok(())
}
