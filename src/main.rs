//! The `anp-proxy` binary: `gateway`, `receiver`, or the config's `mode`.

use std::path::PathBuf;
use std::process::ExitCode;

use anp_proxy::config::{Config, Mode};
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "anp-proxy",
    version,
    about = "Public HTTP addresses for private services, through ANPX tunnels"
)]
struct Cli {
    /// Config file (used when no subcommand is given).
    #[arg(long, short, default_value = "config.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the public gateway.
    Gateway,
    /// Run the private receiver.
    Receiver,
    /// Validate the config file and exit.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("anp-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let mode = match cli.cmd {
        Some(Cmd::Gateway) => Mode::Gateway,
        Some(Cmd::Receiver) => Mode::Receiver,
        Some(Cmd::Check) => {
            println!("{}: ok", cli.config.display());
            return ExitCode::SUCCESS;
        }
        None => cfg.mode,
    };
    let _log = anp_proxy::logging::init(&cfg.logging, &cfg.base_dir, cfg.debug);
    let res = match mode {
        Mode::Gateway => anp_proxy::gateway::run(cfg),
        Mode::Receiver => anp_proxy::receiver::run(cfg),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("anp-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
