//! The `anp-proxy` binary: `gateway`, `receiver`, or the config's `mode`;
//! `check`, and the tools that make what a config names (`did new`,
//! `cert new`, `token new`, `routes`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anp_proxy::config::{Config, ConfigError, Mode, Overrides};
use clap::{Parser, Subcommand};

#[cfg(not(any(feature = "count-allocs", feature = "system-alloc")))]
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
#[command(after_help = "\
Every config key can also be set by an environment variable,
ANP_PROXY_<TABLE>__<KEY> (ANP_PROXY_RECEIVER__TOKEN, ANP_PROXY_GATEWAY__TLS__CERT_FILE),
or by --set TABLE.KEY=VALUE. A flag beats a variable, a variable beats the file,
the file beats the default. `anp-proxy check --print` shows where each value came from.")]
struct Cli {
    /// The config file (TOML); relative paths in it resolve from its
    /// directory. Default: ./config.toml when it exists, else none (the
    /// defaults, environment variables and flags).
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Set a config key, above the file and the environment: `--set
    /// gateway.port=8080`, `--set receiver.upstream=http://127.0.0.1:3000`
    /// (repeatable; lists and tables as TOML values).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// Without `--config`, this file when it exists.
const DEFAULT_CONFIG: &str = "config.toml";

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
        /// `gateway.host`: the address to listen on.
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        /// `gateway.port`: the public port.
        #[arg(long, value_name = "PORT")]
        port: Option<String>,
    },
    /// Run the private receiver. With no config file, these flags (or the
    /// ANP_PROXY_RECEIVER__* variables) are all it needs: `anp-proxy
    /// receiver --gateway-url wss://gw.example/ws --token … --upstream
    /// http://127.0.0.1:8000`.
    Receiver {
        /// `receiver.gateway_url`: the gateway's tunnel URL, ws:// or wss://.
        #[arg(long, value_name = "URL")]
        gateway_url: Option<String>,
        /// `receiver.token` (visible to other local users in the process
        /// list: ANP_PROXY_RECEIVER__TOKEN is the safer way).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// `receiver.upstream`: the local app, http://host:port.
        #[arg(long, value_name = "URL")]
        upstream: Option<String>,
        /// `receiver.ca_file`: the CA the gateway's certificate must chain
        /// to (`wss://`), e.g. the ca.crt of `anp-proxy cert new`.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<String>,
    },
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
    /// TLS certificates for a gateway (and receivers' client certificates).
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Tunnel tokens (`[[gateway.auth.tokens]]`).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
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

#[derive(Subcommand)]
enum CertCmd {
    /// A private CA and a certificate it signed for NAMEs (host names and
    /// IP addresses the gateway is reached by): writes OUT/ca.crt,
    /// OUT/ca.key, OUT/FILE.crt and OUT/FILE.key (keys mode 0600; never
    /// overwrites) and prints the config lines that use them. Receivers
    /// trust the gateway with `ca_file = OUT/ca.crt`.
    New {
        /// e.g. gw.example.com 203.0.113.7 localhost 127.0.0.1
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "tls", value_name = "DIR")]
        out: PathBuf,
        /// File name of the certificate and key, without extension
        /// (default: gateway, or receiver with --client).
        #[arg(long, value_name = "FILE")]
        file: Option<String>,
        /// Days the certificate is valid, 1 to 36500 (the CA: ten times
        /// as long).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// A receiver's client certificate (mTLS on a tunnel port with
        /// `verify_mode = "required"`) instead of a gateway's.
        #[arg(long)]
        client: bool,
    },
}

/// A TOML string literal (quoted, escaped) for printed config lines.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn cert_command(cmd: CertCmd) -> ExitCode {
    let CertCmd::New {
        names,
        out,
        file,
        days,
        client,
    } = cmd;
    let default_file = if client { "receiver" } else { "gateway" };
    let req = anp_proxy::cert::CertRequest {
        names: names.clone(),
        out,
        file_name: file.unwrap_or_else(|| default_file.to_owned()),
        days,
        client,
    };
    let c = match anp_proxy::cert::create(&req) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("anp-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "anp-proxy: wrote {}, {} (private), {} and {} (private)",
        c.ca_cert.display(),
        c.ca_key.display(),
        c.cert.display(),
        c.key.display()
    );
    let p = |p: &Path| toml_str(&p.display().to_string());
    println!(
        "# Paths are as written here: relative ones resolve from the config file's directory."
    );
    if client {
        println!(
            "\n# The receiver's config:\n[receiver]\ncert_file = {}\nkey_file = {}\n\n\
             # The gateway's tunnel port asks for it:\n[gateway.tunnel_tls]\nca_file = {}\nverify_mode = \"required\"",
            p(&c.cert),
            p(&c.key),
            p(&c.ca_cert)
        );
    } else {
        println!(
            "\n# The gateway's config:\n[gateway.tls]\nenabled = true\ncert_file = {}\nkey_file = {}\n\n\
             # Each receiver's config (or: anp-proxy receiver --ca-file {}):\n[receiver]\n\
             gateway_url = {}\nca_file = {}",
            p(&c.cert),
            p(&c.key),
            c.ca_cert.display(),
            toml_str(&format!("wss://{}:8089/ws", url_host(&names[0]))),
            p(&c.ca_cert)
        );
    }
    ExitCode::SUCCESS
}

/// A name as a URL's host: an IPv6 address in brackets.
fn url_host(name: &str) -> String {
    match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => format!("[{name}]"),
        _ => name.to_owned(),
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// A new random token (256 bits) for identity NAME: printed alone on
    /// stdout (`TOKEN=$(anp-proxy token new alice)`), with the gateway's
    /// `[[gateway.auth.tokens]]` entry and the receiver's setting on
    /// stderr. Nothing is written: add the entry to the gateway's config.
    New {
        /// The identity's name (what routes and logs call it).
        name: String,
        /// A path prefix the identity serves (repeatable), e.g. /alice.
        #[arg(long = "path", value_name = "PREFIX")]
        paths: Vec<String>,
    },
}

fn token_command(cmd: TokenCmd) -> ExitCode {
    let TokenCmd::New { name, paths } = cmd;
    if name.trim().is_empty() {
        eprintln!("anp-proxy: the identity's name must not be empty");
        return ExitCode::from(2);
    }
    if let Some(why) = paths
        .iter()
        .find_map(|p| anp_proxy::registry::routes::check_route(p).err())
    {
        eprintln!("anp-proxy: --path {why}");
        return ExitCode::from(2);
    }
    let token = anp_proxy::auth::token::generate();
    let paths: Vec<String> = paths.iter().map(|p| toml_str(p)).collect();
    eprintln!(
        "anp-proxy: a new token for `{name}`. In the gateway's config:\n\n\
         [[gateway.auth.tokens]]\nname = {}\ntoken = {}\npaths = [{}]\n\n\
         For the receiver: ANP_PROXY_RECEIVER__TOKEN={token} (or --token, or `token` in [receiver]).",
        toml_str(&name),
        toml_str(&token),
        paths.join(", ")
    );
    println!("{token}");
    ExitCode::SUCCESS
}

/// `anp-proxy check`: the same preflight a start runs
/// (`anp_proxy::preflight`), for `side`, or for both sides since one file
/// may serve either; then `FILE: ok`, or with `--print` the effective
/// configuration.
fn check_command(cfg: &Config, side: Option<Side>, print: bool) -> ExitCode {
    let label = cfg.origin.label();
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
                eprintln!("anp-proxy: {label}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        return ExitCode::from(2);
    }
    if print {
        println!(
            "# {label}: ok. The effective configuration: every default filled in,\n\
             # secrets shown as {}; a value that is not the default says where it\n\
             # came from (file, env VARIABLE, flag --FLAG).\n",
            anp_proxy::config::MASK
        );
        print!("{}", cfg.effective_toml());
    } else {
        println!("{label}: ok");
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

/// The configuration in force: the file (`--config`, else ./config.toml
/// when present, else none), the environment's ANP_PROXY_* variables,
/// `--set`, then the subcommand's own flags (`direct`).
fn load_config(cli: &Cli, direct: Overrides) -> Result<Config, ConfigError> {
    let file = match &cli.config {
        Some(p) => Some(p.clone()),
        None => Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| PathBuf::from(DEFAULT_CONFIG)),
    };
    let mut overrides = Overrides::from_env(std::env::vars_os())?;
    for s in &cli.set {
        overrides.push_set(s)?;
    }
    overrides.extend(direct);
    Config::load_with(file.as_deref(), overrides)
}

/// The subcommand's own flags as the keys they set.
fn direct_flags(cmd: &Option<Cmd>) -> Overrides {
    let mut o = Overrides::default();
    let mut put = |key: &str, v: &Option<String>, flag: &str| {
        if let Some(v) = v {
            o.push_flag(key, v, flag);
        }
    };
    match cmd {
        Some(Cmd::Gateway { host, port, .. }) => {
            put("gateway.host", host, "--host");
            put("gateway.port", port, "--port");
        }
        Some(Cmd::Receiver {
            gateway_url,
            token,
            upstream,
            ca_file,
        }) => {
            put("receiver.gateway_url", gateway_url, "--gateway-url");
            put("receiver.token", token, "--token");
            put("receiver.upstream", upstream, "--upstream");
            put("receiver.ca_file", ca_file, "--ca-file");
        }
        _ => {}
    }
    o
}

/// Raises the open-file limit to the hard one, and says when the
/// configuration can use more descriptors than even that allows: the
/// gateway one per client connection (`max_connections`) and admin
/// connection, the receiver one per app connection (`max_concurrent`);
/// 256 more for tunnels, listeners, logs and the registry.
fn raise_open_files(cfg: &anp_proxy::config::Config, mode: Mode) {
    let (need, what) = match mode {
        Mode::Gateway => (
            cfg.gateway.max_connections + cfg.gateway.admin_max_connections + 256,
            "gateway.max_connections",
        ),
        Mode::Receiver => (cfg.receiver.max_concurrent + 256, "receiver.max_concurrent"),
    };
    if let Err(e) = anp_proxy::runtime::raise_open_files(need as u64, what) {
        tracing::warn!(error = %e, "cannot read the open-file limit");
    }
}

fn main() -> ExitCode {
    exit_on_panic();
    #[cfg(feature = "count-allocs")]
    if let Err(e) = anp_proxy::alloc_count::report_on_sigusr2() {
        eprintln!("anp-proxy: cannot start the allocation-count reporter: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Did { cmd }) => return did_command(cmd),
        Some(Cmd::Cert { cmd }) => return cert_command(cmd),
        Some(Cmd::Token { cmd }) => return token_command(cmd),
        _ => {}
    }
    let cfg = match load_config(&cli, direct_flags(&cli.cmd)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("anp-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let mut opts = anp_proxy::gateway::RunOptions::default();
    let mode = match cli.cmd {
        Some(Cmd::Gateway { takeover, .. }) => {
            opts.takeover = takeover;
            Mode::Gateway
        }
        Some(Cmd::Receiver { .. }) => Mode::Receiver,
        Some(Cmd::Check { side, print }) => return check_command(&cfg, side, print),
        Some(Cmd::Routes { cmd }) => return routes_command(&cfg, cmd),
        Some(Cmd::Did { .. } | Cmd::Cert { .. } | Cmd::Token { .. }) => {
            unreachable!("handled before loading the config")
        }
        None => cfg.mode,
    };
    let log = anp_proxy::logging::init(&cfg.logging, &cfg.base_dir, cfg.debug);
    if cfg.origin.file.is_none() {
        tracing::info!("no config file: defaults, environment variables and flags");
    }
    raise_open_files(&cfg, mode);
    let json = cfg.logging.format.eq_ignore_ascii_case("json");
    let label = PathBuf::from(cfg.origin.label());
    let res = match mode {
        Mode::Gateway => anp_proxy::gateway::run(cfg, &label, opts),
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
