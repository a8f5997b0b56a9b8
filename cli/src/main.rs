//! `switchyard`: one binary with a subcommand per role. `main` parses flags, sets up
//! tracing and hands over to the subcommand's module.
//!
//! # Layout
//! - [`generate`]: `switchyard generate`, the single-process reference run or a router's client.
//! - [`serve`]: `switchyard expert-node`, `router` and `coordinator`, the cluster's roles.
//! - [`up`]: `switchyard up`, a whole cluster on this machine as child processes.
//! - [`cluster`]: `switchyard cluster status` and `drain`: the router's and the coordinators' views.
//! - [`certs`]: `switchyard tls`: the cluster's CA and the roles' certificates.
//! - [`bench`]: `switchyard bench`, throughput against the memory-bandwidth floor and the
//!   single process.
//! - [`bench_cluster`]: `switchyard bench cluster`, failover and balancing under load.
//! - [`bench_mla`]: the latent KV cache and absorbed against expanded decode (DeepSeek).
//! - [`bench_planner`]: `switchyard bench planner`, the placement planner at datacenter size.
//! - [`bench_serve`]: `switchyard bench serve`, concurrent clients against the OpenAI API.
//! - [`launch`]: child processes, signals and the async runtime.
//! - [`telemetry`]: logs, and span export over OTLP.
//! - [`progress`]: progress bars for long work (loading, benchmarks).

mod bench;
mod bench_cluster;
#[cfg(feature = "cuda")]
mod bench_gpu;
mod bench_mla;
mod bench_planner;
mod bench_serve;
mod certs;
mod cluster;
mod generate;
mod launch;
mod progress;
mod serve;
mod telemetry;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Serve Mixture-of-Experts models from a cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Export spans to this OpenTelemetry collector (OTLP/HTTP, e.g. http://127.0.0.1:4318).
    #[arg(long, global = true, env = "SWITCHYARD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from a prompt with the whole model in this process (the reference engine).
    Generate(generate::Args),
    /// Serve the experts placed on this node to routers (gRPC ExpertService).
    ExpertNode(serve::NodeArgs),
    /// Serve generation over gRPC, running the dense model here and the experts on expert nodes.
    Router(serve::RouterArgs),
    /// Run a member of the coordinator group (raft): placement, membership, failure handling.
    Coordinator(serve::CoordinatorArgs),
    /// Start a router and expert nodes on this machine and keep them running until Ctrl-C.
    Up(up::Args),
    /// Inspect a running cluster.
    Cluster(cluster::Args),
    /// Make the cluster's CA and the roles' certificates (mutual TLS between the roles).
    Tls(certs::Args),
    /// Ask a role's readiness probe; exits 0 only on 200 (for container health checks).
    Probe(serve::ProbeArgs),
    /// Measure engine throughput against the memory-bandwidth floor.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let service = match &cli.command {
        Command::Generate(_) => "switchyard-generate",
        Command::ExpertNode(_) => "switchyard-expert-node",
        Command::Router(_) => "switchyard-router",
        Command::Coordinator(_) => "switchyard-coordinator",
        Command::Up(_) => "switchyard-up",
        Command::Cluster(_) => "switchyard-cluster",
        Command::Tls(_) => "switchyard-tls",
        Command::Probe(_) => "switchyard-probe",
        Command::Bench(_) => "switchyard-bench",
    };
    let telemetry = match telemetry::init(service, cli.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let otlp = cli.otlp_endpoint.clone();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::ExpertNode(args) => serve::expert_node(args),
        Command::Router(args) => serve::router(args),
        Command::Coordinator(args) => serve::coordinator(args),
        Command::Up(args) => up::run(args, otlp),
        Command::Cluster(args) => cluster::run(args),
        Command::Tls(args) => certs::run(args),
        Command::Probe(args) => serve::probe(args),
        Command::Bench(args) => bench::run(args),
    };
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
