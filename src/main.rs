//! The `anp-proxy` binary: `gateway`, `receiver`, or the config's `mode`.

use std::path::PathBuf;
use std::process::ExitCode;

use anp_proxy::config::{Config, Mode};
use clap::{Parser, Subcommand};

#[cfg(not(feature = "count-allocs"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A measurement build (`--features count-allocs`): mimalloc, every call
/// counted; SIGUSR2 prints the counts (src/alloc_count.rs).
#[cfg(feature = "count-allocs")]
#[global_allocator]
static GLOBAL: anp_proxy::alloc_count::Counting = anp_proxy::alloc_count::Counting;

#[derive(Parser)]
#[command(
    name = "anp-proxy",
    version,
    about = "Public HTTP addresses for private services, through ANPX tunnels"
)]
struct Cli {
    /// The config file (TOML); relative paths in it resolve from its
    /// directory.
    #[arg(long, short, default_value = "config.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the public gateway.
    Gateway {
        /// Join ports another process already listens on (SO_REUSEPORT):
        /// the successor in a zero-downtime restart, before the old
        /// gateway is sent SIGTERM. Without it, a start on a port in use
        /// is refused, naming the process that holds it.
        #[arg(long)]
        takeover: bool,
    },
    /// Run the private receiver.
    Receiver,
    /// Validate the config file and exit: its keys and values, and what a
    /// start would load from disk for either side (certificates, keys, DID
    /// documents and private keys; keys matching their certificates) and
    /// the URL schemes. Touches no network.
    Check {
        /// Check only what this side loads (a host that runs one side
        /// need not hold the other side's files); both when omitted.
        #[arg(value_enum)]
        side: Option<Side>,
        /// Print the effective configuration (every default filled in) as
        /// TOML, secrets masked.
        #[arg(long)]
        print: bool,
    },
    /// DID-WBA identities.
    Did {
        #[command(subcommand)]
        cmd: DidCmd,
    },
    /// The route registry (`[gateway.database]`): which identity serves
    /// which path prefix. Running gateways pick changes up within
    /// `poll_interval`.
    Routes {
        #[command(subcommand)]
        cmd: RoutesCmd,
    },
}

/// `anp-proxy check [gateway|receiver]`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    Gateway,
    Receiver,
}

#[derive(Subcommand)]
enum RoutesCmd {
    /// Register PATH for DID (a did:wba DID, or a token identity's name).
    /// A PATH ending in /ad.json serves its parent prefix.
    Add { did: String, path: String },
    /// Remove PATH (or the rows of DID serving the same prefix).
    Remove { did: String, path: String },
    /// Print every row as `did<TAB>path`.
    List,
}

fn routes_command(cfg: &Config, cmd: RoutesCmd) -> ExitCode {
    use anp_proxy::registry::{Added, Registry};
    let mut reg = match Registry::open(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("anp-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = match cmd {
        RoutesCmd::Add { did, path } => {
            // A prefix the config gives to another identity would be
            // ignored by the gateway: refuse it here, naming the owner.
            let fixed = anp_proxy::gateway::build_routes(cfg);
            match fixed.owner(&path) {
                Some(owner) if **owner != *did => {
                    eprintln!("anp-proxy: path `{path}` is already owned by `{owner}` (in the config file)");
                    return ExitCode::FAILURE;
                }
                _ => {}
            }
            reg.add(&did, &path).map(|a| match a {
                Added::New => eprintln!("anp-proxy: added {did} {path}"),
                Added::Already => eprintln!("anp-proxy: {did} already has {path}"),
            })
        }
        RoutesCmd::Remove { did, path } => match reg.remove(&did, &path) {
            Ok(0) => {
                eprintln!("anp-proxy: no route {path} for {did}");
                return ExitCode::FAILURE;
            }
            Ok(n) => {
                eprintln!("anp-proxy: removed {n} route(s) of {did}");
                Ok(())
            }
            Err(e) => Err(e),
        },
        RoutesCmd::List => reg.list_all().map(|rows| {
            for (did, path) in rows {
                println!("{did}\t{path}");
            }
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anp-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum DidCmd {
    /// Create a key and DID document: writes DIR/did.json and
    /// DIR/key-1_private.pem (PKCS#8 PEM), as the ANP SDKs load them.
    New {
        /// The DID, e.g. did:wba:example.com:agents:alice
        did: String,
        /// Directory to write into (created if missing; files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// An Ed25519 Multikey (anp 1.x) instead of secp256k1 (agent-connect).
        #[arg(long)]
        ed25519: bool,
        /// Append anp's key-bound segment (`e1_…` / `k1_…`) to the DID.
        #[arg(long)]
        key_bound: bool,
    },
}

fn did_command(cmd: DidCmd) -> ExitCode {
    use anp_proxy::auth::didwba::create::{create, KeyKind};
    match cmd {
        DidCmd::New {
            did,
            out,
            ed25519,
            key_bound,
        } => {
            let kind = if ed25519 {
                KeyKind::Ed25519
            } else {
                KeyKind::Secp256k1
            };
            match create(&did, &out, kind, key_bound) {
                Ok(c) => {
                    println!("{}", c.did);
                    eprintln!(
                        "anp-proxy: wrote {} and {}",
                        c.document.display(),
                        c.private_key.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("anp-proxy: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// `anp-proxy check`: the same preflight a start runs
/// (`anp_proxy::preflight`), for `side`, or for both sides since one file
/// may serve either; then `FILE: ok`, or with `--print` the effective
/// configuration.
fn check_command(
    cfg: &Config,
    path: &std::path::Path,
    side: Option<Side>,
    print: bool,
) -> ExitCode {
    let mut results = Vec::new();
    if side != Some(Side::Receiver) {
        results.push(anp_proxy::preflight::gateway(cfg).map(|p| p.warnings));
    }
    if side != Some(Side::Gateway) {
        results.push(anp_proxy::preflight::receiver(cfg).map(|p| p.warnings));
    }
    let mut failed = false;
    for result in results {
        match result {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("anp-proxy: warning: {w}");
                }
            }
            Err(e) => {
                eprintln!("anp-proxy: {}: {e}", path.display());
                failed = true;
            }
        }
    }
    if failed {
        return ExitCode::from(2);
    }
    if print {
        println!(
            "# {}: ok. The effective configuration: every default filled in,\n# secrets shown as {}.\n",
            path.display(),
            anp_proxy::config::MASK
        );
        print!("{}", cfg.effective_toml());
    } else {
        println!("{}: ok", path.display());
    }
    ExitCode::SUCCESS
}

/// Says once why the process stops. With the log in a file, the error
/// goes there and to stderr (the terminal or the service manager); with
/// the log on stderr, one line there: the log's own (JSON) line when the
/// log is JSON, else the plain `anp-proxy: …` line.
fn report_fatal(log: &anp_proxy::logging::LogGuard, json: bool, e: &anyhow::Error) {
    if log.to_file() || json {
        tracing::error!("{e:#}");
    }
    if log.to_file() || !json {
        eprintln!("anp-proxy: {e:#}");
    }
}

/// Exit status after a panic: EX_SOFTWARE (sysexits.h).
const PANIC_EXIT: i32 = 70;

/// A panic anywhere ends the whole process with [`PANIC_EXIT`], never a
/// half-alive one whose other cores keep a tunnel or a port while the dead
/// core's share is lost (docs/ARCHITECTURE.md, "When a worker panics").
/// The default hook prints the message and location first.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        tracing::error!(thread = name, "panic: {info}");
        eprintln!("anp-proxy: thread {name} panicked; exiting with status {PANIC_EXIT} so a supervisor restarts the process");
        std::process::exit(PANIC_EXIT);
    }));
}

fn main() -> ExitCode {
    exit_on_panic();
    #[cfg(feature = "count-allocs")]
    if let Err(e) = anp_proxy::alloc_count::report_on_sigusr2() {
        eprintln!("anp-proxy: cannot start the allocation-count reporter: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    if let Some(Cmd::Did { cmd }) = cli.cmd {
        return did_command(cmd);
    }
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("anp-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let mut opts = anp_proxy::gateway::RunOptions::default();
    let mode = match cli.cmd {
        Some(Cmd::Gateway { takeover }) => {
            opts.takeover = takeover;
            Mode::Gateway
        }
        Some(Cmd::Receiver) => Mode::Receiver,
        Some(Cmd::Check { side, print }) => return check_command(&cfg, &cli.config, side, print),
        Some(Cmd::Routes { cmd }) => return routes_command(&cfg, cmd),
        Some(Cmd::Did { .. }) => unreachable!("handled before loading the config"),
        None => cfg.mode,
    };
    let log = anp_proxy::logging::init(&cfg.logging, &cfg.base_dir, cfg.debug);
    let json = cfg.logging.format.eq_ignore_ascii_case("json");
    let res = match mode {
        Mode::Gateway => anp_proxy::gateway::run(cfg, &cli.config, opts),
        Mode::Receiver => anp_proxy::receiver::run(cfg),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_fatal(&log, json, &e);
            ExitCode::FAILURE
        }
    }
}
