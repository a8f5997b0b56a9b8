//! `switchyard up`: a whole cluster on this machine. Starts a coordinator group (3 members
//! by default), N expert nodes that register with it, and a router that follows its placement,
//! all as child processes on loopback; prints `ready: grpc ADDRESS http ADDRESS coordinators
//! A,B,C tls DIR` once the router serves, and stops every child on Ctrl-C or SIGTERM. With
//! `--coordinators 0` the placement is fixed instead: every expert on R nodes, given to each
//! node with `--experts`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use switchyard_expert_node::ExpertSet;
use switchyard_model::ModelSpec;
use switchyard_proto::tls::{Role, TlsFlags};

use crate::certs::{Authority, as_args};
use crate::launch::{Output, Proc, runtime, shutdown_signal};
use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory in Hugging Face layout (default: the embedded code model in
    /// models/switchyard-code-moe).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Expert nodes to start.
    #[arg(long, env = "SWITCHYARD_EXPERT_NODES_COUNT", default_value_t = 2)]
    expert_nodes: usize,
    /// Nodes each expert is placed on (replicas for failover and load spreading); default 2
    /// with coordinators (where memory allows), 1 without.
    #[arg(long, env = "SWITCHYARD_REPLICAS")]
    replicas: Option<usize>,
    /// Coordinator group members to start (raft; 3 or 5 survive the loss of 1 or 2). 0: no
    /// coordinators, a fixed placement.
    #[arg(long, env = "SWITCHYARD_COORDINATORS_COUNT", default_value_t = 3)]
    coordinators: usize,
    /// Passed to the coordinators: an expert node silent this many milliseconds is declared
    /// dead and its experts re-placed.
    #[arg(long, env = "SWITCHYARD_NODE_TIMEOUT_MS", default_value_t = 1000)]
    node_timeout_ms: u64,
    /// Passed to the coordinators: how often the balancer looks at the load, in milliseconds.
    #[arg(long, env = "SWITCHYARD_BALANCE_INTERVAL_MS", default_value_t = 2000)]
    balance_interval_ms: u64,
    /// Passed to the coordinators: rebalance when the busiest node's predicted load passes
    /// the mean by this factor.
    #[arg(long, env = "SWITCHYARD_IMBALANCE_THRESHOLD", default_value_t = 1.25)]
    imbalance_threshold: f64,
    /// Address of the router's gRPC API (port 0: any free port).
    #[arg(long, env = "SWITCHYARD_GRPC", default_value = "127.0.0.1:0")]
    grpc: SocketAddr,
    /// Address of the router's OpenAI HTTP API.
    #[arg(long, env = "SWITCHYARD_HTTP", default_value = "127.0.0.1:8000")]
    http: SocketAddr,
    /// Compute threads per expert node (default: one per core).
    #[arg(long, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    /// Passed to every expert node (see `switchyard expert-node --help`).
    #[arg(long, env = "SWITCHYARD_MEMORY_BUDGET")]
    memory_budget: Option<String>,
    /// Passed to the router (see `switchyard router --help`).
    #[arg(long, env = "SWITCHYARD_DISPATCH_TIMEOUT_MS", default_value_t = 10_000)]
    dispatch_timeout_ms: u64,
    /// Passed to the router: sequences batched into one step at most.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,
    /// Keep the cluster's files here: each child's log in `DIR/logs/NAME.log`, each
    /// coordinator's raft state in `DIR/coordinator-ID` (a restart with the same directory
    /// resumes it). Default: a temporary directory, removed at exit.
    #[arg(long, env = "SWITCHYARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Passed to the router: memory of the paged KV cache.
    #[arg(long, env = "SWITCHYARD_KV_CACHE_MEMORY", default_value = "4GiB")]
    kv_cache_memory: String,
    /// Passed to the router: no prefix caching.
    #[arg(long, env = "SWITCHYARD_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    /// Tenants with API keys and limits (TOML): given to the coordinators, so the router
    /// enforces one budget per tenant with them (to the router itself with `--coordinators 0`).
    #[arg(long, env = "SWITCHYARD_TENANTS")]
    tenants: Option<PathBuf>,
    /// Passed to the router: bytes of prompt one request may send at most.
    #[arg(long, env = "SWITCHYARD_MAX_PROMPT_BYTES")]
    max_prompt_bytes: Option<String>,
    /// Passed to the router: prompts tokenized at once (default: one per core).
    #[arg(long, env = "SWITCHYARD_TOKENIZER_THREADS")]
    tokenizer_threads: Option<usize>,
    /// Passed to the router: seconds a client has to send request headers (and a
    /// keep-alive connection may idle).
    #[arg(long, env = "SWITCHYARD_HTTP_HEADER_TIMEOUT_SECS")]
    http_header_timeout_secs: Option<f64>,
    /// Passed to the router: HTTP connections open at once at most.
    #[arg(long, env = "SWITCHYARD_HTTP_MAX_CONNECTIONS")]
    http_max_connections: Option<usize>,
    /// Passed to the router: seconds a client has to send a request's body.
    #[arg(long, env = "SWITCHYARD_HTTP_BODY_TIMEOUT_SECS")]
    http_body_timeout_secs: Option<f64>,
    /// Passed to the router: requests waiting for a slot at most.
    #[arg(long, env = "SWITCHYARD_MAX_QUEUE", default_value_t = 1024)]
    max_queue: usize,
    /// Passed to the router and every expert node: `cuda:N` keeps the dense layers, the KV
    /// cache and the experts in that GPU's memory (a build with `--features cuda`).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: switchyard_kernels::Device,
    /// Connect the cluster's processes without TLS. By default `up` makes a CA and a
    /// certificate per process in `DATA_DIR/tls` (kept across restarts), and every internal
    /// connection is mutual TLS.
    #[arg(long, env = "SWITCHYARD_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
}

/// How long a child may take to load and serve.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// Expert `e` goes to nodes `e, e+1, ..., e+replicas-1` (mod `nodes`): every node gets an
/// equal share and the replicas of an expert are on different nodes.
pub fn spread(num_experts: usize, nodes: usize, replicas: usize) -> Vec<ExpertSet> {
    (0..nodes)
        .map(|n| ExpertSet::experts((0..num_experts).filter(|e| (0..replicas).any(|r| (e + r) % nodes == n))))
        .collect()
}

/// How each expert node started by [`start_nodes`] learns its experts.
pub enum Placement<'a> {
    /// `--experts`: one fixed share per node.
    Fixed(&'a [ExpertSet]),
    /// `--coordinators`: this many nodes register with the coordinators at these addresses.
    Coordinated { nodes: usize, coordinators: &'a [String] },
}

/// The TLS flags of the process `name` in `role`: a certificate `tls` issues it, or plaintext.
pub fn tls_args(tls: Option<&Authority>, role: Role, name: &str) -> Result<Vec<String>> {
    match tls {
        Some(authority) => Ok(as_args(&authority.issue(role, name)?)),
        None => Ok(vec!["--insecure-plaintext".into()]),
    }
}

/// Starts expert nodes (with `extra` flags) placed by `placement`, each with its own
/// certificate from `tls` (plaintext without); returns them and their addresses once all
/// serve.
pub async fn start_nodes(
    model: &std::path::Path,
    placement: Placement<'_>,
    extra: &[String],
    tls: Option<&Authority>,
    out: &Output,
) -> Result<(Vec<Proc>, Vec<String>)> {
    let flags: Vec<[String; 2]> = match placement {
        Placement::Fixed(sets) => sets.iter().map(|set| ["--experts".into(), set.to_string()]).collect(),
        Placement::Coordinated { nodes, coordinators } => {
            vec![["--coordinators".into(), coordinators.join(",")]; nodes]
        }
    };
    let mut procs = Vec::new();
    for (i, flag) in flags.iter().enumerate() {
        let mut args = vec![
            "expert-node".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend_from_slice(flag);
        args.extend_from_slice(extra);
        let name = format!("expert-node-{i}");
        args.extend(tls_args(tls, Role::Node, &name)?);
        procs.push(Proc::spawn(&name, &args, out)?);
    }
    let mut addresses = Vec::new();
    for i in 0..procs.len() {
        let ready = ready_among(&mut procs, i).await?;
        addresses.push(ready.rsplit(' ').next().unwrap_or_default().to_string());
    }
    Ok((procs, addresses))
}

/// Where the cluster in a data directory keeps its coordinators' addresses: a restart must
/// bring each member back where the group's raft state says it is.
const ADDRESSES_FILE: &str = "coordinators.json";

/// The coordinators' addresses: those recorded in `data_dir` by an earlier start, or free
/// loopback ports, then recorded. Every member must know every address at start.
fn coordinator_addresses(count: usize, data_dir: &Path) -> Result<Vec<String>> {
    let file = data_dir.join(ADDRESSES_FILE);
    if file.exists() {
        let text = std::fs::read_to_string(&file)?;
        let addresses: Vec<String> = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a list of addresses: {e}", file.display()))?;
        if addresses.len() != count {
            bail!(
                "{} holds a cluster of {} coordinators, not --coordinators {count}: start it with the same \
                 count (and change members with `switchyard cluster add-coordinator`), or use another --data-dir",
                data_dir.display(),
                addresses.len()
            );
        }
        tracing::info!("resuming the cluster in {} (coordinators on {})", data_dir.display(), addresses.join(","));
        return Ok(addresses);
    }
    if (1..=count).any(|id| data_dir.join(format!("coordinator-{id}")).exists()) {
        bail!(
            "{} holds coordinator state but no {ADDRESSES_FILE}: it was not made by `switchyard up`",
            data_dir.display()
        );
    }
    let mut addresses = Vec::new();
    for _ in 0..count {
        addresses.push(switchyard_proto::server::stable_loopback_address()?.to_string());
    }
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(&file, serde_json::to_string(&addresses)?)?;
    Ok(addresses)
}

/// Waits for `procs[i]`'s ready line; fails as soon as it or any other of `procs` exits.
async fn ready_among(procs: &mut Vec<Proc>, i: usize) -> Result<String> {
    let mut me = procs.remove(i);
    let ready = me.ready_while(procs, START_TIMEOUT).await;
    procs.insert(i, me);
    ready
}

/// Starts `count` coordinators on free loopback ports, each knowing all the others; returns
/// them and their addresses.
async fn start_coordinators(
    args: &Args,
    data_dir: &Path,
    extra: &[String],
    tls: Option<&Authority>,
    out: &Output,
) -> Result<(Vec<Proc>, Vec<String>)> {
    let addresses = coordinator_addresses(args.coordinators, data_dir)?;
    let peers: Vec<String> = addresses.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
    // Only the members may step the raft group: they share a token made up here.
    let token = {
        use std::hash::{BuildHasher, RandomState};
        let (a, b) = (RandomState::new().hash_one(std::process::id()), RandomState::new().hash_one(data_dir));
        format!("{a:016x}{b:016x}")
    };
    let mut procs = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let mut a = vec![
            "coordinator".to_string(),
            "--id".into(),
            (i + 1).to_string(),
            "--listen".into(),
            address.clone(),
            "--peers".into(),
            peers.join(","),
            "--data-dir".into(),
            data_dir.join(format!("coordinator-{}", i + 1)).display().to_string(),
            "--min-nodes".into(),
            args.expert_nodes.to_string(),
            "--replicas".into(),
            args.replicas.unwrap_or(2).to_string(),
            "--node-timeout-ms".into(),
            args.node_timeout_ms.to_string(),
            "--balance-interval-ms".into(),
            args.balance_interval_ms.to_string(),
            "--imbalance-threshold".into(),
            args.imbalance_threshold.to_string(),
        ];
        a.extend_from_slice(extra);
        let name = format!("coordinator-{}", i + 1);
        a.extend(tls_args(tls, Role::Coordinator, &name)?);
        let env = [("SWITCHYARD_RAFT_TOKEN", token.as_str())];
        procs.push(Proc::spawn_with_env(&name, &a, &env, out)?);
    }
    for i in 0..procs.len() {
        ready_among(&mut procs, i).await?;
    }
    Ok((procs, addresses))
}

pub fn run(args: Args, otlp_endpoint: Option<String>) -> Result<()> {
    if args.expert_nodes == 0 {
        bail!("--expert-nodes must be at least 1");
    }
    args.device.ensure_available()?;
    let replicas = args.replicas.unwrap_or(if args.coordinators > 0 { 2 } else { 1 });
    if replicas == 0 || (args.coordinators == 0 && replicas > args.expert_nodes) {
        bail!("--replicas must be between 1 and --expert-nodes ({}), got {replicas}", args.expert_nodes);
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => embedded_model()?,
    };
    let spec = ModelSpec::from_dir(&model)?;
    let sets = spread(spec.num_experts, args.expert_nodes, replicas);
    let (data_dir, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("switchyard-up-{}", std::process::id())), true),
    };
    let out = Output { quiet: false, log_dir: args.data_dir.as_ref().map(|d| d.join("logs")) };
    let progress = Progress::new("starting");
    let steps = args.expert_nodes + 1 + args.coordinators;
    progress.update(0, steps);
    let result = run_cluster(&args, otlp_endpoint, &model, &sets, &data_dir, &out, &progress);
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

fn run_cluster(
    args: &Args,
    otlp_endpoint: Option<String>,
    model: &Path,
    sets: &[ExpertSet],
    data_dir: &Path,
    out: &Output,
    progress: &Progress,
) -> Result<()> {
    let steps = args.expert_nodes + 1 + args.coordinators;
    // The cluster's CA, and the certificate `up` itself (and an operator's CLI) uses.
    let tls_dir = data_dir.join("tls");
    let authority = if args.insecure_plaintext { None } else { Some(Authority::open_or_create(&tls_dir)?) };
    let admin = match &authority {
        Some(a) => a.issue(Role::Admin, "admin")?,
        None => TlsFlags::plaintext(),
    };
    let tls = authority.as_ref();
    runtime()?.block_on(async {
        let mut extra = Vec::new();
        if let Some(t) = args.threads {
            extra.extend(["--threads".to_string(), t.to_string()]);
        }
        if let Some(b) = &args.memory_budget {
            extra.extend(["--memory-budget".to_string(), b.clone()]);
        }
        extra.extend(["--device".to_string(), args.device.to_string()]);
        let otlp: Vec<String> = otlp_endpoint.iter().flat_map(|e| ["--otlp-endpoint".to_string(), e.clone()]).collect();
        extra.extend(otlp.iter().cloned());
        let mut children = Vec::new();
        let mut coordinators = Vec::new();
        let started = async {
            let placement = if args.coordinators > 0 {
                let (procs, addresses) = start_coordinators(args, data_dir, &otlp, tls, out).await?;
                children.extend(procs);
                progress.update(args.coordinators, steps);
                coordinators = addresses;
                let placement = Placement::Coordinated { nodes: args.expert_nodes, coordinators: &coordinators };
                children.extend(start_nodes(model, placement, &extra, tls, out).await?.0);
                vec!["--coordinators".to_string(), coordinators.join(",")]
            } else {
                let (nodes, addresses) = start_nodes(model, Placement::Fixed(sets), &extra, tls, out).await?;
                children.extend(nodes);
                vec!["--expert-nodes".to_string(), addresses.join(",")]
            };
            progress.update(steps - 1, steps);
            let router_args = vec![
                "router".to_string(),
                "--model".into(),
                model.display().to_string(),
                "--listen".into(),
                args.grpc.to_string(),
                "--http".into(),
                args.http.to_string(),
                "--dispatch-timeout-ms".into(),
                args.dispatch_timeout_ms.to_string(),
                "--max-batch".into(),
                args.max_batch.to_string(),
                "--max-queue".into(),
                args.max_queue.to_string(),
                "--kv-cache-memory".into(),
                args.kv_cache_memory.clone(),
                "--device".into(),
                args.device.to_string(),
            ];
            let mut router_args = router_args;
            if args.no_prefix_caching {
                router_args.push("--no-prefix-caching".into());
            }
            router_args.extend(placement);
            router_args.extend(tls_args(tls, Role::Router, "router")?);
            router_args.extend(otlp.iter().cloned());
            if let Some(t) = &args.tenants {
                if coordinators.is_empty() {
                    router_args.extend(["--tenants".to_string(), t.display().to_string()]);
                } else {
                    // The coordinators keep them: one budget for every router.
                    let security = admin.load(Role::Admin).map_err(anyhow::Error::msg)?;
                    let client = switchyard_coordinator::client::Client::new(&coordinators, &security)
                        .map_err(anyhow::Error::msg)?;
                    crate::cluster::set_tenants(&client, t).await?;
                }
            }
            let passed = [
                ("--max-prompt-bytes", args.max_prompt_bytes.clone()),
                ("--tokenizer-threads", args.tokenizer_threads.map(|n| n.to_string())),
                ("--http-header-timeout-secs", args.http_header_timeout_secs.map(|s| s.to_string())),
                ("--http-max-connections", args.http_max_connections.map(|n| n.to_string())),
                ("--http-body-timeout-secs", args.http_body_timeout_secs.map(|s| s.to_string())),
            ];
            for (flag, value) in passed {
                if let Some(v) = value {
                    router_args.extend([flag.to_string(), v]);
                }
            }
            let mut router = Proc::spawn("router", &router_args, out)?;
            let addr = router.ready_while(&mut children, START_TIMEOUT).await?;
            children.push(router);
            Ok::<_, anyhow::Error>(addr)
        };
        let outcome = tokio::select! {
            addr = started => match addr {
                Ok(addr) => {
                    progress.clone().finish();
                    let mut ready = format!("ready: {addr}");
                    if !coordinators.is_empty() {
                        ready.push_str(&format!(" coordinators {}", coordinators.join(",")));
                    }
                    if tls.is_some() {
                        ready.push_str(&format!(" tls {}", tls_dir.display()));
                    }
                    println!("{ready}");
                    greet(model, &addr, args.expert_nodes, args.coordinators, tls.map(|_| tls_dir.as_path()));
                    tracing::info!(nodes = args.expert_nodes, coordinators = args.coordinators, "cluster up");
                    // Dropped (so aborted) when the cluster stops.
                    let mut announcer = tokio::task::JoinSet::new();
                    if !coordinators.is_empty() {
                        announcer.spawn(announce_epochs(coordinators.clone(), admin.clone()));
                    }
                    watch(&mut children).await
                }
                Err(e) => Err(e),
            },
            _ = shutdown_signal() => Ok(()),
        };
        for c in children.iter_mut().rev() {
            c.stop().await;
        }
        outcome
    })
}

/// The embedded default model: a small MoE trained on Python (tools/train_code_model.py),
/// kept in the repository beside this crate.
pub(crate) fn embedded_model() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/switchyard-code-moe");
    match dir.canonicalize() {
        Ok(dir) if dir.join("config.json").exists() => Ok(dir),
        _ => bail!(
            "no --model given and the embedded model is not at {} (it ships in the repository's models/)",
            dir.display()
        ),
    }
}

/// Tells a person on the terminal where the API is and how to try it.
fn greet(model: &Path, ready: &str, nodes: usize, coordinators: usize, tls: Option<&Path>) {
    let words: Vec<&str> = ready.split(' ').collect();
    let Some(http) = words.iter().position(|w| *w == "http").and_then(|i| words.get(i + 1)) else { return };
    let name = model.file_name().map_or_else(|| model.display().to_string(), |n| n.to_string_lossy().into_owned());
    let body = serde_json::json!({"model": name, "prompt": "def fibonacci(n):", "max_tokens": 64, "temperature": 0});
    eprintln!();
    let group = if coordinators > 0 { format!(", placed by {coordinators} coordinators") } else { String::new() };
    eprintln!("Switchyard serves {name} on http://{http}/v1 (a router and {nodes} expert nodes{group}). Try:");
    eprintln!();
    eprintln!("  curl -s http://{http}/v1/completions -H 'content-type: application/json' -d '{body}'");
    eprintln!();
    if let Some(dir) = tls {
        eprintln!("The roles talk over mutual TLS; the CA and an admin certificate for `switchyard cluster` are in");
        eprintln!("{}: --tls-ca {0}/ca.pem --tls-cert {0}/admin.pem --tls-key {0}/admin-key.pem", dir.display());
        eprintln!();
    }
    eprintln!("Ctrl-C stops the cluster.");
}

/// Prints each placement epoch as it becomes active, with why it was made (a node died, a
/// rebalance...), so the terminal shows the coordinators at work.
async fn announce_epochs(coordinators: Vec<String>, admin: TlsFlags) {
    use switchyard_coordinator::convert::{active, epoch_state_name};
    let Ok(security) = admin.load(Role::Admin) else { return };
    let Ok(client) = switchyard_coordinator::client::Client::new(&coordinators, &security) else { return };
    let mut placements = client.watch();
    let mut shown = 0;
    while placements.changed().await.is_ok() {
        let Some(p) = placements.borrow_and_update().clone() else { continue };
        let Some((epoch, assignment)) = active(&p) else { continue };
        if epoch <= shown {
            continue;
        }
        shown = epoch;
        let reason = p.epochs.iter().find(|e| epoch_state_name(e.state) == "active").map_or("", |e| e.reason.as_str());
        let nodes: std::collections::BTreeSet<u64> = assignment.values().flatten().copied().collect();
        eprintln!("[placement] epoch {epoch} active on {} expert nodes: {reason}", nodes.len());
    }
}

/// Runs until Ctrl-C/SIGTERM (Ok) or until the router exits on its own (an error). An expert
/// node that exits is reported and left down: the router fails its work over to replicas.
async fn watch(children: &mut [Proc]) -> Result<()> {
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut exited = vec![false; children.len()];
    let group = children.iter().filter(|c| c.name.starts_with("coordinator")).count();
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tick.tick() => {
                for i in 0..children.len() {
                    if exited[i] {
                        continue;
                    }
                    let Some(status) = children[i].try_wait()? else { continue };
                    exited[i] = true;
                    let what = children[i].exited(status, "").await;
                    if children[i].name == "router" {
                        bail!("{what}; stopping the cluster");
                    }
                    if children[i].name.starts_with("coordinator") {
                        let dead = children.iter().zip(&exited).filter(|(c, e)| **e && c.name.starts_with("coordinator")).count();
                        tracing::warn!("{what}; {}", quorum(group, group - dead));
                    } else {
                        tracing::warn!("{what}; its experts are served by their replicas, and re-placed if coordinated");
                    }
                }
            }
        }
    }
}

/// What a coordinator group of `members` can still do with `live` of them.
fn quorum(members: usize, live: usize) -> String {
    if live > members / 2 {
        format!("{live} of {members} coordinators live, a majority: the group goes on deciding placements")
    } else {
        format!(
            "{live} of {members} coordinators live, no majority: requests are still served on the current placement, \
             but no node failure or imbalance is acted on until {} members are back",
            members / 2 + 1
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quorum_messages_tell_the_truth() {
        assert!(super::quorum(3, 2).contains("a majority: the group goes on"));
        let lost = super::quorum(3, 1);
        assert!(lost.contains("1 of 3") && lost.contains("no majority") && lost.contains("until 2 members"), "{lost}");
        assert!(super::quorum(5, 3).contains("a majority"));
        assert!(super::quorum(5, 2).contains("until 3 members"));
    }

    #[test]
    fn spread_places_every_expert_on_distinct_nodes() {
        let sets = super::spread(8, 3, 2);
        for e in 0..8 {
            let holders = sets.iter().filter(|s| s.contains(0, e)).count();
            assert_eq!(holders, 2, "expert {e}");
        }
        let sizes: Vec<usize> = sets.iter().map(|s| (0..8).filter(|&e| s.contains(0, e)).count()).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
    }
}
