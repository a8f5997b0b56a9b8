//! `switchyard cluster status`: what a router knows of its expert nodes, and what the
//! coordinators decided (raft members, leader, term, nodes, epochs, load);
//! `switchyard cluster drain`: move a node's experts away before it leaves.

use std::io::Write;

use anyhow::{Context, Result};
use serde::Serialize;
use switchyard_proto::tls::{Role, TlsFlags};
use switchyard_proto::v1::ClusterStatusRequest;
use switchyard_proto::v1::router_client::RouterClient;
use tonic::transport::Channel;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// List the expert nodes with their address, state and the (layer, expert) pairs they hold
    /// (from a router), and the raft group, epochs and load (from the coordinators).
    Status {
        /// The router's gRPC address (`host:port`).
        #[arg(long, env = "SWITCHYARD_ROUTER", required_unless_present = "coordinators")]
        router: Option<String>,
        /// Coordinators (`host:port`, comma-separated); any member answers.
        #[arg(long, env = "SWITCHYARD_COORDINATORS", value_delimiter = ',')]
        coordinators: Vec<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// The API key of a tenant with `metrics = true`, where the router has `--tenants`.
        #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// With `--coordinators`: an admin certificate.
        #[command(flatten)]
        tls: TlsFlags,
    },
    /// Move a node's experts to other nodes (a new placement epoch) so it can leave; the node
    /// gets no experts again.
    Drain {
        /// The node: its id or its address.
        node: String,
        /// Coordinators (`host:port`, comma-separated).
        #[arg(long, env = "SWITCHYARD_COORDINATORS", value_delimiter = ',', required = true)]
        coordinators: Vec<String>,
        /// An admin certificate.
        #[command(flatten)]
        tls: TlsFlags,
    },
    /// Add a coordinator to the raft group (start it first with `--join`); it catches up
    /// from a snapshot.
    AddCoordinator {
        /// The new member, `ID=HOST:PORT`.
        member: String,
        /// The running group (`host:port`, comma-separated).
        #[arg(long, env = "SWITCHYARD_COORDINATORS", value_delimiter = ',', required = true)]
        coordinators: Vec<String>,
        /// An admin certificate.
        #[command(flatten)]
        tls: TlsFlags,
    },
    /// Replace the cluster's tenants (API keys and limits) with a tenants file's: every router
    /// following the coordinators authenticates with them, against one budget per tenant.
    SetTenants {
        /// The tenants file (TOML, `[[tenant]]` entries; see the README's *Tenants*).
        file: std::path::PathBuf,
        /// The running group (`host:port`, comma-separated).
        #[arg(long, env = "SWITCHYARD_COORDINATORS", value_delimiter = ',', required = true)]
        coordinators: Vec<String>,
        /// An admin certificate.
        #[command(flatten)]
        tls: TlsFlags,
    },
    /// Remove a coordinator from the raft group.
    RemoveCoordinator {
        /// The member's raft id.
        id: u64,
        /// The running group (`host:port`, comma-separated).
        #[arg(long, env = "SWITCHYARD_COORDINATORS", value_delimiter = ',', required = true)]
        coordinators: Vec<String>,
        /// An admin certificate.
        #[command(flatten)]
        tls: TlsFlags,
    },
}

#[derive(Serialize, Default)]
struct Report {
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    router: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator: Option<CoordinatorView>,
}

#[derive(Serialize)]
struct CoordinatorView {
    /// The member that answered (the leader, when one is known), and its process id.
    answered_by: u64,
    pid: u32,
    leader: u64,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    members: Vec<Member>,
    active_epoch: Option<u64>,
    pending_epoch: Option<u64>,
    epochs: Vec<EpochView>,
    nodes: Vec<RegisteredNode>,
    /// max / mean of the measured node load.
    imbalance: f64,
}

#[derive(Serialize)]
struct Member {
    id: u64,
    address: String,
}

#[derive(Serialize)]
struct EpochView {
    number: u64,
    state: &'static str,
    reason: String,
    /// `[layer, expert, [node ids]]`.
    experts: Vec<(u32, u32, Vec<u64>)>,
}

#[derive(Serialize)]
struct RegisteredNode {
    id: u64,
    address: String,
    state: &'static str,
    memory_budget: u64,
    /// Replicas the active epoch gives it.
    experts: usize,
    /// Rows routed to it per second (as the leader measures it).
    rows_per_second: f64,
    /// Bytes of expert weights it holds, as stored (its last heartbeat).
    held_bytes: u64,
}

#[derive(Serialize)]
struct Status {
    model_type: String,
    epoch: u64,
    queued_requests: u32,
    running_requests: u32,
    nodes: Vec<Node>,
}

#[derive(Serialize)]
struct Node {
    address: String,
    state: String,
    pid: u32,
    /// `[layer, expert]` pairs.
    experts: Vec<[u32; 2]>,
    dispatches: u64,
    mean_round_trip_micros: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
}

/// A client of the router at `addr`.
pub async fn router_client(addr: &str) -> Result<RouterClient<Channel>> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let channel = Channel::from_shared(url.clone())
        .with_context(|| format!("invalid router address {addr}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the router at {addr}"))?;
    Ok(RouterClient::new(channel).max_decoding_message_size(64 << 20))
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Status { router, coordinators, json, api_key, tls } => {
            status(router, coordinators, json, api_key, &tls)
        }
        Command::Drain { node, coordinators, tls } => {
            let rt = crate::launch::runtime()?;
            let _in_runtime = rt.enter();
            let client = admin_client(&coordinators, &tls)?;
            let id = rt
                .block_on(client.drain(node.clone()))
                .map_err(|s| anyhow::anyhow!("cannot drain {node}: {}", s.message()))?;
            println!("draining expert node {id}: its experts move to other nodes in the next epoch");
            Ok(())
        }
        Command::AddCoordinator { member, coordinators, tls } => {
            let (id, address) = member
                .split_once('=')
                .and_then(|(id, a)| Some((id.parse::<u64>().ok().filter(|&id| id > 0)?, a.to_string())))
                .with_context(|| format!("{member:?} is not ID=HOST:PORT"))?;
            change_members(&coordinators, &tls, [(id, address)].into(), Vec::new())?;
            println!("coordinator {id} added");
            Ok(())
        }
        Command::SetTenants { file, coordinators, tls } => {
            let rt = crate::launch::runtime()?;
            let _in_runtime = rt.enter();
            let client = admin_client(&coordinators, &tls)?;
            let count = rt.block_on(set_tenants(&client, &file))?;
            println!("{count} tenants set: every router following the coordinators now serves them");
            Ok(())
        }
        Command::RemoveCoordinator { id, coordinators, tls } => {
            change_members(&coordinators, &tls, Default::default(), vec![id])?;
            println!("coordinator {id} removed");
            Ok(())
        }
    }
}

/// Gives the coordinators the tenants in `file`; returns how many.
pub async fn set_tenants(client: &switchyard_coordinator::client::Client, file: &std::path::Path) -> Result<usize> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let specs =
        switchyard_coordinator::tenants::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let tenants = specs.iter().map(switchyard_coordinator::convert::tenant).collect();
    client
        .set_tenants(tenants)
        .await
        .map_err(|s| anyhow::anyhow!("the coordinators did not take the tenants: {}", s.message()))?;
    Ok(specs.len())
}

/// A client of the coordinators at `addresses`, with the admin certificate `tls` names.
fn admin_client(addresses: &[String], tls: &TlsFlags) -> Result<switchyard_coordinator::client::Client> {
    let security = tls.load(Role::Admin).map_err(anyhow::Error::msg)?;
    switchyard_coordinator::client::Client::new(addresses, &security).map_err(anyhow::Error::msg)
}

fn change_members(
    coordinators: &[String],
    tls: &TlsFlags,
    add: std::collections::HashMap<u64, String>,
    remove: Vec<u64>,
) -> Result<()> {
    let rt = crate::launch::runtime()?;
    let _in_runtime = rt.enter();
    let client = admin_client(coordinators, tls)?;
    rt.block_on(client.change_members(add, remove))
        .map_err(|s| anyhow::anyhow!("the membership change failed: {}", s.message()))
}

fn status(
    router: Option<String>,
    coordinators: Vec<String>,
    json: bool,
    api_key: Option<String>,
    tls: &TlsFlags,
) -> Result<()> {
    let rt = crate::launch::runtime()?;
    let mut report = Report::default();
    if let Some(router) = router {
        let s = rt.block_on(async {
            let mut client = router_client(&router).await?;
            let mut request = tonic::Request::new(ClusterStatusRequest {});
            if let Some(key) = &api_key {
                let value = format!("Bearer {key}").parse().context("--api-key is not valid in a gRPC header")?;
                request.metadata_mut().insert("authorization", value);
            }
            client.cluster_status(request).await.map_err(crate::generate::status_error)
        })?;
        report.router = Some(router_status(s.into_inner()));
    }
    if !coordinators.is_empty() {
        let _in_runtime = rt.enter();
        let client = admin_client(&coordinators, tls)?;
        let s = rt.block_on(client.status()).map_err(|s| {
            anyhow::anyhow!("the coordinators ({}) did not answer: {}", coordinators.join(", "), s.message())
        })?;
        report.coordinator = Some(coordinator_view(s));
    }
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut stdout, &report)?;
        writeln!(stdout)?;
        return Ok(());
    }
    if let Some(out) = &report.router {
        print_router(&mut stdout, out)?;
    }
    if let Some(c) = &report.coordinator {
        print_coordinator(&mut stdout, c)?;
    }
    Ok(())
}

fn coordinator_view(s: switchyard_proto::v1::CoordinatorStatus) -> CoordinatorView {
    use switchyard_coordinator::convert::{epoch_state_name, node_state_name};
    let placement = s.placement.unwrap_or_default();
    let epoch_in = |name: &str| placement.epochs.iter().find(|e| epoch_state_name(e.state) == name).map(|e| e.number);
    let active = placement.epochs.iter().find(|e| epoch_state_name(e.state) == "active");
    CoordinatorView {
        answered_by: s.id,
        pid: s.pid,
        leader: s.leader_id,
        term: s.term,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        members: s.members.into_iter().map(|m| Member { id: m.id, address: m.address }).collect(),
        active_epoch: epoch_in("active"),
        pending_epoch: epoch_in("pending"),
        nodes: placement
            .nodes
            .iter()
            .map(|n| RegisteredNode {
                id: n.id,
                address: n.address.clone(),
                state: node_state_name(n.state),
                memory_budget: n.memory_budget,
                experts: active.map_or(0, |e| e.experts.iter().filter(|x| x.nodes.contains(&n.id)).count()),
                rows_per_second: s.load.iter().find(|l| l.node_id == n.id).map_or(0.0, |l| l.rows_per_second),
                held_bytes: s.load.iter().find(|l| l.node_id == n.id).map_or(0, |l| l.held_bytes),
            })
            .collect(),
        epochs: placement
            .epochs
            .iter()
            .map(|e| EpochView {
                number: e.number,
                state: epoch_state_name(e.state),
                reason: e.reason.clone(),
                experts: e.experts.iter().map(|x| (x.layer, x.expert, x.nodes.clone())).collect(),
            })
            .collect(),
        imbalance: s.imbalance,
    }
}

fn print_coordinator(out: &mut impl Write, c: &CoordinatorView) -> Result<()> {
    let members: Vec<String> = c
        .members
        .iter()
        .map(|m| format!("{}{}={}", m.id, if m.id == c.leader { "*" } else { "" }, m.address))
        .collect();
    writeln!(out, "coordinators {} (leader *), term {}, commit {}", members.join(" "), c.term, c.commit_index)?;
    for e in &c.epochs {
        writeln!(out, "epoch {} {}: {}", e.number, e.state, e.reason)?;
    }
    writeln!(out, "{:>4} {:<22} {:<10} {:>8} {:>12} {:>10}", "id", "node", "state", "experts", "held MB", "rows/s")?;
    for n in &c.nodes {
        let mb = n.held_bytes as f64 / 1e6;
        writeln!(
            out,
            "{:>4} {:<22} {:<10} {:>8} {:>12.2} {:>10.0}",
            n.id, n.address, n.state, n.experts, mb, n.rows_per_second
        )?;
    }
    writeln!(out, "load imbalance (max/mean) {:.2}", c.imbalance)?;
    Ok(())
}

fn router_status(s: switchyard_proto::v1::ClusterStatusResponse) -> Status {
    Status {
        model_type: s.model_type,
        epoch: s.epoch,
        queued_requests: s.queued_requests,
        running_requests: s.running_requests,
        nodes: s
            .nodes
            .into_iter()
            .map(|n| Node {
                address: n.address,
                state: n.state,
                pid: n.pid,
                experts: n.experts.iter().map(|x| [x.layer, x.expert]).collect(),
                dispatches: n.dispatches,
                mean_round_trip_micros: n.mean_round_trip_micros,
                last_error: n.last_error,
            })
            .collect(),
    }
}

fn print_router(stdout: &mut impl Write, out: &Status) -> Result<()> {
    writeln!(
        stdout,
        "model {}, placement epoch {}, {} running, {} queued",
        out.model_type, out.epoch, out.running_requests, out.queued_requests
    )?;
    writeln!(stdout, "{:<22} {:<12} {:>7} {:>10} {:>10}  experts", "node", "state", "pid", "dispatches", "rtt µs")?;
    for n in &out.nodes {
        writeln!(
            stdout,
            "{:<22} {:<12} {:>7} {:>10} {:>10}  {}",
            n.address,
            n.state,
            n.pid,
            n.dispatches,
            n.mean_round_trip_micros,
            n.experts.len()
        )?;
        if !n.last_error.is_empty() {
            writeln!(stdout, "  last error: {}", n.last_error)?;
        }
    }
    Ok(())
}
