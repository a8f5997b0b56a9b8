//! `switchyard`: one binary with a subcommand per role. `main` parses flags, sets up
//! tracing and hands over to the subcommand's module.
//!
//! # Layout
//! - [`generate`]: `switchyard generate`, the single-process reference run.
//! - [`bench`]: `switchyard bench`, engine throughput against the memory-bandwidth floor.
//! - [`progress`]: progress bars for long work (loading, benchmarks).

mod bench;
mod generate;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Serve Mixture-of-Experts models from a cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from a prompt with the whole model in this process (the reference engine).
    Generate(generate::Args),
    /// Measure engine throughput against the memory-bandwidth floor.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
