//! `switchyard cluster status`: what a router knows of its expert nodes.

use std::io::Write;

use anyhow::{Context, Result};
use serde::Serialize;
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
    /// List the expert nodes with their address, state and the (layer, expert) pairs they hold.
    Status {
        /// The router's gRPC address (`host:port`).
        #[arg(long, env = "SWITCHYARD_ROUTER")]
        router: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
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
    let Command::Status { router, json } = args.command;
    let status = crate::launch::runtime()?.block_on(async {
        let mut client = router_client(&router).await?;
        client.cluster_status(ClusterStatusRequest {}).await.map_err(crate::generate::status_error)
    })?;
    let s = status.into_inner();
    let out = Status {
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
    };
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut stdout, &out)?;
        writeln!(stdout)?;
        return Ok(());
    }
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
