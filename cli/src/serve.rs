//! `switchyard expert-node`, `switchyard router` and `switchyard coordinator`: bind, load,
//! print `ready: ...`, serve until Ctrl-C or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::launch::{runtime, shutdown_signal};
use crate::progress::Progress;

#[derive(clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    config: switchyard_expert_node::Config,
    /// Address to serve ExpertService on (port 0: any free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[derive(clap::Args)]
pub struct RouterArgs {
    #[command(flatten)]
    config: switchyard_router::Config,
    /// Address to serve the gRPC API on (port 0: any free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to serve the OpenAI-compatible HTTP API on (none: gRPC only).
    #[arg(long, env = "SWITCHYARD_HTTP")]
    http: Option<SocketAddr>,
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    config: switchyard_coordinator::Config,
    /// Address to serve the Coordinator service on (raft traffic, nodes, routers).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// `host:port` of a role's probe listener (or a router's HTTP port).
    address: String,
    /// The path to ask.
    #[arg(long, default_value = "/ready")]
    path: String,
}

/// `switchyard probe`: asks a role's `/ready` (or `--path`) and fails unless it answers 200
/// (for health checks in images that hold nothing but the binary).
pub fn probe(args: ProbeArgs) -> Result<()> {
    use std::io::{Read, Write as _};
    let address = std::net::ToSocketAddrs::to_socket_addrs(&args.address)
        .with_context(|| format!("cannot resolve {}", args.address))?
        .next()
        .with_context(|| format!("{} resolves to nothing", args.address))?;
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("cannot connect to {}", args.address))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", args.path, args.address)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split(' ').nth(1) == Some("200") {
        println!("{}", body.trim());
        Ok(())
    } else {
        anyhow::bail!("{} {}: {status}: {}", args.address, args.path, body.trim())
    }
}

fn announce(what: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready: {what}")?;
    out.flush()?;
    Ok(())
}

pub fn expert_node(args: NodeArgs) -> Result<()> {
    let model = args.config.model.clone();
    let progress = Progress::new("loading");
    let node = switchyard_expert_node::ExpertNode::load(args.config, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("expert node cannot load {}", model.display()))?;
    progress.finish();
    runtime()?.block_on(async {
        let listener =
            TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
        announce(&format!("expert-node {}", listener.local_addr()?))?;
        node.serve(listener, shutdown_signal()).await?;
        Ok(())
    })
}

pub fn router(args: RouterArgs) -> Result<()> {
    runtime()?.block_on(async {
        let grpc = TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
        let http = match args.http {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?),
            None => None,
        };
        let progress = Progress::new("loading");
        let bar = progress.clone();
        let router = switchyard_router::Router::start(args.config, Box::new(move |d, t| bar.update(d, t))).await?;
        progress.finish();
        let mut ready = format!("grpc {}", grpc.local_addr()?);
        if let Some(h) = &http {
            ready += &format!(" http {}", h.local_addr()?);
            tracing::info!(model = router.model_name(), "OpenAI API on http://{}/v1", h.local_addr()?);
        }
        announce(&ready)?;
        router.serve(grpc, http, shutdown_signal()).await?;
        Ok(())
    })
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    runtime()?.block_on(async {
        let listener =
            TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
        let address = listener.local_addr()?.to_string();
        let coordinator = switchyard_coordinator::Coordinator::start(&args.config, &address)
            .with_context(|| format!("coordinator {} cannot start", args.config.id))?;
        announce(&format!("coordinator {address}"))?;
        coordinator.serve(listener, shutdown_signal()).await?;
        Ok(())
    })
}
