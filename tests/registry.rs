//! The route registry on both backends: one set of tests, run against an
//! embedded SQLite file and against a real MariaDB server that
//! `tests/db/setup_mariadb.sh` installs (Debian package) and starts.
//! Without it the MySQL tests fail; `ANP_SKIP_MYSQL=1` skips them on
//! purpose. The end-to-end tests run the real binary: gateway, receiver and
//! `anp-proxy routes …`, and watch a change reach a connected tunnel; two
//! gateways on one database refuse a DID proof replayed from one to the
//! other (the shared nonce cache, `did_nonces`).

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anp_proxy::config::Config;
use anp_proxy::registry::{Added, Registry, RegistryError};

use common::procs::{self, Gateway, Receiver};
use common::{client, wait_until, App};

// ---------------------------------------------------------------- backends

/// The MariaDB server's facts (`key=value` lines from the setup script).
fn mariadb() -> Option<&'static HashMap<String, String>> {
    static FACTS: OnceLock<Result<HashMap<String, String>, String>> = OnceLock::new();
    if std::env::var("ANP_SKIP_MYSQL").is_ok_and(|v| v == "1") {
        eprintln!("ANP_SKIP_MYSQL=1: MySQL test skipped");
        return None;
    }
    let facts = FACTS.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/db/setup_mariadb.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let facts: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        eprintln!("MariaDB {} on port {}", facts["version"], facts["port"]);
        Ok(facts)
    });
    match facts {
        Ok(f) => Some(f),
        Err(e) => panic!(
            "MySQL tests need a MariaDB server and could not get one \
             (set ANP_SKIP_MYSQL=1 to skip them on purpose):\n{e}"
        ),
    }
}

/// A `[gateway.database]` section for a fresh, empty database of its own.
fn mysql_section(name: &str) -> Option<String> {
    use ::mysql::prelude::Queryable;
    let f = mariadb()?;
    let db = format!("anp_t_{name}");
    let url = format!(
        "mysql://{}:{}@{}:{}",
        f["user"], f["password"], f["host"], f["port"]
    );
    let mut conn = ::mysql::Conn::new(::mysql::Opts::from_url(&url).unwrap()).expect("connect");
    conn.query_drop(format!("DROP DATABASE IF EXISTS {db}"))
        .unwrap();
    conn.query_drop(format!("CREATE DATABASE {db} CHARACTER SET utf8mb4"))
        .unwrap();
    // MySQL keys without `backend`, as the Python reference writes them.
    Some(format!(
        "[gateway.database]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\npassword = \"{}\"\ndatabase = \"{db}\"\ncharset = \"utf8mb4\"\nconnect_timeout = 5\nmin_connections = 1\nmax_connections = 4\n",
        f["host"], f["port"], f["user"], f["password"]
    ))
}

fn sqlite_section() -> Option<String> {
    Some("[gateway.database]\nbackend = \"sqlite\"\npath = \"db/routes.db\"\n".into())
}

/// A config file in its own directory (the SQLite file goes there too).
struct Setup {
    dir: tempfile::TempDir,
    cfg_path: PathBuf,
}

impl Setup {
    fn new(text: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("gateway.toml");
        std::fs::write(&cfg_path, text).unwrap();
        Setup { dir, cfg_path }
    }

    fn config(&self) -> Config {
        Config::load(&self.cfg_path).unwrap()
    }

    fn registry(&self) -> Registry {
        Registry::open(&self.config()).unwrap()
    }

    /// `anp-proxy routes ARGS --config` this setup's file.
    fn routes(&self, args: &[&str]) -> Output {
        let mut all = vec![OsStr::new("routes")];
        all.extend(args.iter().map(OsStr::new));
        all.extend([OsStr::new("--config"), self.cfg_path.as_os_str()]);
        procs::run(all)
    }
}

// ------------------------------------------------- registry tests, written once

fn add_list_remove(s: &Setup) {
    let mut r = s.registry();
    assert!(r.list_all().unwrap().is_empty());
    let alice = "did:wba:a.example:agents:alice";
    let bob = "did:wba:b.example:agents:bob";
    assert_eq!(r.add(alice, "/agents/alice").unwrap(), Added::New);
    assert_eq!(r.add(bob, "/agents/bob/").unwrap(), Added::New);
    assert_eq!(r.add(alice, "/tools/alice").unwrap(), Added::New);
    assert_eq!(
        r.list_all().unwrap(),
        [
            (alice.to_owned(), "/agents/alice".to_owned()),
            (alice.to_owned(), "/tools/alice".to_owned()),
            (bob.to_owned(), "/agents/bob/".to_owned()),
        ]
    );
    assert_eq!(
        r.routes_of(alice).unwrap(),
        ["/agents/alice", "/tools/alice"]
    );
    assert_eq!(
        r.routes_of("did:wba:nobody.example").unwrap(),
        Vec::<String>::new()
    );
    // Another identity cannot remove a row it does not own.
    assert_eq!(r.remove(bob, "/agents/alice").unwrap(), 0);
    assert_eq!(r.remove(alice, "/agents/alice").unwrap(), 1);
    assert_eq!(r.remove(alice, "/agents/alice").unwrap(), 0);
    assert_eq!(r.routes_of(alice).unwrap(), ["/tools/alice"]);
    // A second handle (another process in real life) sees the same rows.
    let mut again = s.registry();
    assert_eq!(again.list_all().unwrap().len(), 2);
    // Case matters on both backends.
    assert_eq!(r.add(alice, "/Agents/Bob").unwrap(), Added::New);
}

fn duplicate_is_refused_with_owner(s: &Setup) {
    let mut r = s.registry();
    let alice = "did:wba:a.example:alice";
    let bob = "did:wba:b.example:bob";
    assert_eq!(r.add(alice, "/a").unwrap(), Added::New);
    assert_eq!(r.add(alice, "/a").unwrap(), Added::Already);
    for p in ["/a", "/a/", "/a/ad.json"] {
        match r.add(bob, p) {
            Err(RegistryError::Owned { owner, .. }) => assert_eq!(owner, alice, "{p}"),
            other => panic!("{p}: {other:?}"),
        }
    }
    let err = r.add(bob, "/a").unwrap_err();
    assert!(err.is_refusal());
    assert!(err.to_string().contains(alice), "{err}");
    assert!(matches!(
        r.add(bob, "relative/path"),
        Err(RegistryError::BadRoute(_))
    ));
    assert!(matches!(
        r.add(bob, &format!("/{}", "x".repeat(255))),
        Err(RegistryError::TooLong { what: "path" })
    ));
    assert!(matches!(
        r.add("", "/b"),
        Err(RegistryError::TooLong { what: "did" })
    ));
    assert_eq!(r.list_all().unwrap().len(), 1);
}

fn ad_json_serves_parent(s: &Setup) {
    let mut r = s.registry();
    let alice = "did:wba:a.example:agents:alice";
    r.add(alice, "/agents/alice/ad.json").unwrap();
    let cfg = s.config();
    let t = anp_proxy::registry::reload::route_table(&cfg, &r.list_all().unwrap());
    let owner = |p: &str| t.lookup(p).map(|x| x.identity.to_string());
    assert_eq!(owner("/agents/alice/ad.json").as_deref(), Some(alice));
    assert_eq!(owner("/agents/alice/tools/x").as_deref(), Some(alice));
    assert_eq!(owner("/agents/alicex"), None);
    // Removing by the parent prefix removes the ad.json row.
    assert_eq!(r.remove(alice, "/agents/alice/").unwrap(), 1);
    assert!(r.list_all().unwrap().is_empty());
}

fn unicode_path_round_trips(s: &Setup) {
    let mut r = s.registry();
    let did = "did:wba:例え.example:agents:café";
    let paths = ["/agents/café/ad.json", "/智能体/😀", "/ü/ß"];
    for p in paths {
        assert_eq!(r.add(did, p).unwrap(), Added::New, "{p}");
    }
    let mut want: Vec<(String, String)> = paths
        .iter()
        .map(|p| (did.to_owned(), p.to_string()))
        .collect();
    want.sort();
    let mut got = s.registry().list_all().unwrap();
    got.sort();
    assert_eq!(got, want);
    // 255 characters fit even when each takes 4 bytes.
    let long = format!("/{}", "😀".repeat(254));
    assert_eq!(r.add(did, &long).unwrap(), Added::New);
    assert!(r.routes_of(did).unwrap().contains(&long));
    assert_eq!(r.remove(did, "/智能体/😀").unwrap(), 1);
}

fn routes_cli(s: &Setup) {
    let run = |args: &[&str]| {
        let out = s.routes(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let alice = "did:wba:a.example:alice";
    assert!(run(&["add", alice, "/alice/ad.json"]).0);
    assert!(run(&["add", "demo-token", "/t"]).0);
    let (ok, _, err) = run(&["add", "did:wba:b.example:bob", "/alice"]);
    assert!(!ok && err.contains(alice), "{err}");
    let (ok, _, err) = run(&["add", alice, "alice2"]);
    assert!(!ok && err.contains("neither a path"), "{err}");
    // A host route: its host in lowercase, one spelling.
    assert!(run(&["add", alice, "Alice.Example/agents/"]).0);
    let (ok, _, err) = run(&["add", "did:wba:b.example:bob", "alice.example/agents"]);
    assert!(!ok && err.contains(alice), "{err}");
    // A prefix the config gives to a token identity.
    let (ok, _, err) = run(&["add", alice, "/fixed/"]);
    assert!(!ok && err.contains("`fixed-owner`"), "{err}");
    let (ok, out, _) = run(&["list"]);
    assert!(ok);
    assert_eq!(
        out,
        format!("demo-token\t/t\n{alice}\t/alice/ad.json\n{alice}\talice.example/agents/\n")
    );
    assert!(run(&["remove", alice, "ALICE.example/agents"]).0);
    assert!(run(&["remove", alice, "/alice/ad.json"]).0);
    assert!(!run(&["remove", alice, "/alice/ad.json"]).0);
    assert_eq!(run(&["list"]).1, "demo-token\t/t\n");
}

/// Every test's config: one token identity with a path in the file, one
/// (`live`) whose routes all come from the registry; port 0, two cores.
const FIXED: &str = "[logging]\nlevel = \"warn\"\n[gateway]\nport = 0\nworkers = 2\n[[gateway.auth.tokens]]\nname = \"fixed-owner\"\ntoken = \"fixed-owner-token\"\npaths = [\"/fixed\"]\n[[gateway.auth.tokens]]\nname = \"live\"\ntoken = \"live-token-123\"\n";

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    let s = super::Setup::new(&format!(
                        "{}{}",
                        super::FIXED,
                        super::sqlite_section().unwrap()
                    ));
                    super::$name(&s);
                }
            )*
        }
        mod mariadb {
            $(
                #[test]
                fn $name() {
                    let Some(db) = super::mysql_section(stringify!($name)) else { return };
                    let s = super::Setup::new(&format!("{}{}", super::FIXED, db));
                    super::$name(&s);
                }
            )*
        }
    };
}

/// Every write is logged with the version bumped in the same transaction;
/// a write that changes nothing logs nothing.
fn changes_are_logged_with_the_version(s: &Setup) {
    let mut r = s.registry();
    let v0 = r.version().unwrap();
    assert_eq!(r.last_seq().unwrap(), 0);
    let alice = "did:wba:a.example:alice";
    r.add(alice, "/a").unwrap();
    r.add(alice, "/b/ad.json").unwrap();
    assert_eq!(r.add(alice, "/a").unwrap(), Added::Already);
    assert!(r.add("did:wba:b.example:bob", "/a/").is_err());
    assert_eq!(r.remove(alice, "/b/").unwrap(), 1);
    assert_eq!(r.remove(alice, "/nothing").unwrap(), 0);
    let v = r.version().unwrap();
    assert_eq!(v.version, v0.version + 3, "three writes changed a row");
    let log: Vec<(String, bool)> = r
        .changes_since(0)
        .unwrap()
        .into_iter()
        .map(|c| (c.proxy_path, c.added))
        .collect();
    assert_eq!(
        log,
        [
            ("/a".to_owned(), true),
            ("/b/ad.json".to_owned(), true),
            ("/b/ad.json".to_owned(), false)
        ]
    );
    let last = r.last_seq().unwrap();
    assert!(r.changes_since(last).unwrap().is_empty());
    // Another handle (the gateway's poller, in real life) sees the same.
    assert_eq!(s.registry().version().unwrap(), v);
}

/// The DID-WBA nonce cache a fleet shares (`did_nonces`): a nonce spent
/// through one handle (one gateway) is a replay through another until it
/// expires; expired rows are replaced and pruned.
fn nonces_are_shared_by_every_handle(s: &Setup) {
    use anp_proxy::registry::nonce_key;
    let (mut a, mut b) = (s.registry(), s.registry());
    let k = nonce_key("did:wba:a.example:alice", "0123456789abcdef");
    assert!(a.spend_nonce(&k, 1_000, 500).unwrap(), "first spend");
    assert!(
        !b.spend_nonce(&k, 1_000, 600).unwrap(),
        "replayed to another"
    );
    assert!(
        !a.spend_nonce(&k, 1_000, 600).unwrap(),
        "replayed to the same"
    );
    let other = nonce_key("did:wba:b.example:bob", "0123456789abcdef");
    assert!(
        b.spend_nonce(&other, 2_000, 600).unwrap(),
        "nonces are per DID"
    );
    assert!(
        b.spend_nonce(&k, 3_000, 1_000).unwrap(),
        "expired: spent anew"
    );
    assert_eq!(a.prune_nonces(2_000).unwrap(), 1, "bob's row expired");
    assert!(
        !a.spend_nonce(&k, 3_000, 2_000).unwrap(),
        "the live row kept"
    );
}

/// Two gateway processes on one database: a DID-WBA upgrade proof that
/// one accepted (101) is a replay at the other (401 `nonce_replayed`), the
/// route coming from the registry itself (`anp-proxy routes add`).
fn did_replay_is_refused_across_gateways(s: &Setup) {
    use anp_proxy::auth::didwba::{self, DidSigner};
    let did = "did:wba:agents.test:shared:nonces";
    let key_dir = s.dir.path().join("k");
    let out = procs::run(["did", "new", did, "--out", key_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "did new: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published = s.dir.path().join("docs/agents.test/shared/nonces");
    std::fs::create_dir_all(&published).unwrap();
    std::fs::copy(key_dir.join("did.json"), published.join("did.json")).unwrap();
    let text = std::fs::read_to_string(&s.cfg_path).unwrap().replacen(
        "[gateway]\n",
        "[gateway]\nauth.did_documents_dir = \"docs\"\n",
        1,
    );
    std::fs::write(&s.cfg_path, text).unwrap();
    assert!(s.routes(&["add", did, "/nonces"]).status.success());
    let a = Gateway::start_file(&s.cfg_path);
    let b = Gateway::start_file(&s.cfg_path);
    let signer = DidSigner::load(
        &key_dir.join("did.json"),
        &key_dir.join("key-1_private.pem"),
    )
    .unwrap();
    let header = signer.didwba_header(
        "127.0.0.1",
        &didwba::sign::fresh_nonce(),
        &didwba::time::format_utc(didwba::time::now_unix()),
    );
    let upgrade = |gw: SocketAddr| {
        let mut req = Vec::new();
        anp_proxy::ws::handshake::write_client_request(
            &mut req,
            &gw.to_string(),
            "/ws",
            "dGhlIHNhbXBsZSBub25jZQ==",
            &[("Authorization", header.as_str())],
        );
        let r = client::send_raw(gw, &req);
        (r.status, r.body_text())
    };
    assert_eq!(
        upgrade(a.addr).0,
        101,
        "the first gateway accepts the proof"
    );
    let (status, body) = upgrade(b.addr);
    assert_eq!(status, 401, "the second refuses its replay: {body}");
    assert!(body.contains("nonce_replayed"), "{body}");
}

/// `n` rows `did:wba:bulk.example:aI → /bulk/aI/`, written straight into
/// the table in one transaction (through `Registry::add` they would take
/// minutes), as a tool that bypasses the change log would.
fn bulk_insert(s: &Setup, n: usize) {
    let cfg = s.config();
    let db = &cfg.gateway.database;
    drop(s.registry()); // creates the tables
    let row = |i: usize| (format!("did:wba:bulk.example:a{i}"), format!("/bulk/a{i}/"));
    match db.backend() {
        anp_proxy::config::DbBackend::Sqlite => {
            let mut conn = rusqlite::Connection::open(cfg.database_path()).unwrap();
            let tx = conn.transaction().unwrap();
            {
                let mut st = tx
                    .prepare("INSERT INTO did_proxy_path (did, proxy_path) VALUES (?1, ?2)")
                    .unwrap();
                for i in 0..n {
                    st.execute(row(i)).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        anp_proxy::config::DbBackend::Mysql => {
            use ::mysql::prelude::Queryable;
            let url = format!(
                "mysql://{}:{}@{}:{}/{}",
                db.user, db.password, db.host, db.port, db.database
            );
            let mut conn = ::mysql::Conn::new(::mysql::Opts::from_url(&url).unwrap()).unwrap();
            for start in (0..n).step_by(1000) {
                let values: Vec<String> = (start..n.min(start + 1000))
                    .map(|i| {
                        let (d, p) = row(i);
                        format!("('{d}','{p}')")
                    })
                    .collect();
                conn.query_drop(format!(
                    "INSERT INTO did_proxy_path (did, proxy_path) VALUES {}",
                    values.join(",")
                ))
                .unwrap();
            }
        }
    }
}

/// One counter from the admin listener's `/metrics`.
fn metric(admin: SocketAddr, name: &str) -> u64 {
    let r = client::request(admin, "GET", "/metrics", &[("Connection", "close")], b"");
    assert_eq!(r.status, 200);
    let text = r.body_text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{name}` in /metrics:\n{text}"))
}

/// 100,000 rows, unchanged: the poller reads the version row, never the
/// table again (its rows-read counter stays at the start's full read); a
/// change made with the CLI then costs one change row, and reaches the
/// gateway within 5 s like in the tests above (a poll, then a new table of
/// 100,000 routes built in memory and copied by each core: O(rows) work,
/// slow in a debug build on a loaded machine); so does a removal.
fn large_unchanged_table_is_not_reread(s: &Setup) {
    const ROWS: u64 = 100_000;
    bulk_insert(s, ROWS as usize);
    let mut text = std::fs::read_to_string(&s.cfg_path).unwrap();
    text = text.replacen("[gateway]\n", "[gateway]\nadmin_port = 0\n", 1);
    text.push_str("poll_interval = 0.5\n");
    std::fs::write(&s.cfg_path, text).unwrap();
    let (gateway, admin) = common::procs::Gateway::start_file_with_admin(&s.cfg_path);
    let gw = gateway.addr;
    let polls = |read: &str| {
        metric(
            admin,
            &format!("anp_proxy_registry_polls_total{{read=\"{read}\"}}"),
        )
    };
    let rows_read = || metric(admin, "anp_proxy_registry_rows_read_total");
    wait_until(
        "five polls that found the version unchanged",
        Duration::from_secs(20),
        || polls("version") >= 5,
    );
    assert_eq!(rows_read(), ROWS, "only the start's read touched the table");
    assert_eq!(polls("full"), 1);
    assert_eq!(polls("changes"), 0);

    let app = app();
    assert!(s.routes(&["add", "live", "/late"]).status.success());
    let _rx = live_receiver(s, gw, &app, "");
    let took = until_status(gw, "/late/x", 200);
    assert!(took <= Duration::from_secs(5), "add took {took:?}");
    // One logged change read (the tunnel's read-on-miss or a poll).
    assert_eq!(rows_read(), ROWS + 1);
    // A bulk row is served by nobody (no tunnel) but is routed: 503, not 404.
    assert_eq!(get(gw, "/bulk/a99999/x").0, 503);

    assert!(s.routes(&["remove", "live", "/late"]).status.success());
    let took = until_status(gw, "/late/x", 404);
    assert!(took <= Duration::from_secs(5), "remove took {took:?}");
    assert_eq!(rows_read(), ROWS + 2);
    assert_eq!(polls("full"), 1, "no full read after the start");
}

on_both_backends!(
    changes_are_logged_with_the_version,
    nonces_are_shared_by_every_handle,
    did_replay_is_refused_across_gateways,
    large_unchanged_table_is_not_reread,
    add_list_remove,
    duplicate_is_refused_with_owner,
    ad_json_serves_parent,
    unicode_path_round_trips,
    routes_cli,
    live_change_reaches_connected_tunnel,
    new_tunnel_sees_a_change_at_once,
);

/// A database file made by the previous version (the table alone, rows in
/// it) opens, keeps its rows, gains the change log, and takes changes.
#[test]
fn sqlite_file_of_the_previous_version_upgrades_in_place() {
    let s = Setup::new(&format!("{FIXED}{}", sqlite_section().unwrap()));
    let path = s.config().database_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        // The previous version's schema, verbatim.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS did_proxy_path (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                did VARCHAR(255) NOT NULL,
                proxy_path VARCHAR(255) NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
                updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
                UNIQUE(proxy_path)
            );
            CREATE INDEX IF NOT EXISTS idx_did_proxy_path_did ON did_proxy_path(did);
            INSERT INTO did_proxy_path (did, proxy_path) VALUES ('live', '/old');",
        )
        .unwrap();
    }
    let mut r = s.registry();
    assert_eq!(
        r.list_all().unwrap(),
        [("live".to_owned(), "/old".to_owned())]
    );
    assert_eq!(r.version().unwrap().version, 0);
    assert_eq!(r.add("live", "/new").unwrap(), Added::New);
    assert_eq!(r.version().unwrap().version, 1);
    assert_eq!(r.changes_since(0).unwrap().len(), 1);
    // And a gateway serves the old row.
    let gateway = Gateway::start_file(&s.cfg_path);
    let app = app();
    let _rx = live_receiver(&s, gateway.addr, &app, "");
    assert_eq!(get(gateway.addr, "/old/x"), (200, "app:/old/x".to_owned()));
    assert_eq!(get(gateway.addr, "/new/x"), (200, "app:/new/x".to_owned()));
}

#[test]
fn sqlite_file_is_created_relative_to_the_config() {
    let s = Setup::new("[gateway.database]\npath = \"nested/dir/r.db\"\n");
    s.registry().add("did:wba:a.example", "/a").unwrap();
    assert!(s.dir.path().join("nested/dir/r.db").is_file());
}

// ------------------------------------------------------------ end to end

/// The test app, answering every request `200 app:<target>`.
fn app() -> App {
    App::saying(|r| format!("app:{}", r.target_text()).into_bytes())
}

/// A receiver for the `live` identity, its config file beside the
/// gateway's; `extra` goes into `[receiver]`. Waits for its tunnel.
fn live_receiver(s: &Setup, gw: SocketAddr, app: &App, extra: &str) -> Receiver {
    let rcfg = s.dir.path().join("receiver.toml");
    std::fs::write(
        &rcfg,
        format!(
            "mode = \"receiver\"\n[logging]\nlevel = \"warn\"\n[receiver]\ngateway_url = \"ws://{gw}/ws\"\nupstream = \"http://{}\"\ntoken = \"live-token-123\"\n{extra}",
            app.addr
        ),
    )
    .unwrap();
    let mut rx = Receiver::start_file(&rcfg);
    rx.wait_connected(1);
    rx
}

/// One GET through the gateway: (status, body). Waits on the response.
fn get(gw: SocketAddr, path: &str) -> (u16, String) {
    let headers = [("Host", "gw.test"), ("Connection", "close")];
    let r = client::request(gw, "GET", path, &headers, b"");
    (r.status, r.body_text())
}

/// Requests `path` until its status is `want` on 8 requests in a row
/// (new connections, spread over the cores by `SO_REUSEPORT`: each core
/// installs a new table on its own); how long until the first of them.
/// Fails after 10 s (hang guard; the promise is 5 s).
fn until_status(gw: SocketAddr, path: &str, want: u16) -> Duration {
    let t0 = Instant::now();
    let mut first_ok: Option<Duration> = None;
    let mut in_a_row = 0;
    wait_until(
        &format!("{path} to answer {want} on 8 requests in a row"),
        Duration::from_secs(10),
        || {
            if get(gw, path).0 == want {
                first_ok.get_or_insert(t0.elapsed());
                in_a_row += 1;
            } else {
                (first_ok, in_a_row) = (None, 0);
            }
            in_a_row == 8
        },
    );
    first_ok.unwrap()
}

fn live_change_reaches_connected_tunnel(s: &Setup) {
    // The token identity has no path in the config: all its routes come
    // from the registry, under the token's name.
    let routes = |args: &[&str]| {
        let out = s.routes(args);
        assert!(
            out.status.success(),
            "routes {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    routes(&["add", "live", "/first"]);
    let gateway = Gateway::start_file(&s.cfg_path);
    let gw = gateway.addr;
    let app = app();
    let _rx = live_receiver(s, gw, &app, "reconnect_max_delay = 1\n");
    // A new tunnel got the registry's route at once.
    let (status, body) = get(gw, "/first/x");
    assert_eq!((status, body.as_str()), (200, "app:/first/x"));
    assert_eq!(get(gw, "/live/x").0, 404);

    routes(&["add", "live", "/live/ad.json"]);
    let took = until_status(gw, "/live/x", 200);
    assert!(took <= Duration::from_secs(5), "add took {took:?}");
    // Every core installs the table on its own; each must within 5 s.
    let took = until_status(gw, "/live/ad.json", 200);
    assert!(took <= Duration::from_secs(5), "add took {took:?}");
    assert_eq!(get(gw, "/live/tools").1, "app:/live/tools");

    routes(&["remove", "live", "/live/ad.json"]);
    let took = until_status(gw, "/live/x", 404);
    assert!(took <= Duration::from_secs(5), "remove took {took:?}");

    // Every route gone: the tunnel stays connected but serves nothing.
    routes(&["remove", "live", "/first"]);
    until_status(gw, "/first/x", 404);
    routes(&["add", "live", "/first"]);
    let took = until_status(gw, "/first/x", 200);
    assert!(took <= Duration::from_secs(5), "re-add took {took:?}");
}

fn new_tunnel_sees_a_change_at_once(s: &Setup) {
    // A poll every 60 s: only the gateway's read-on-miss can let the
    // tunnel in within the test's time.
    let mut text = std::fs::read_to_string(&s.cfg_path).unwrap();
    text.push_str("poll_interval = 60\n");
    std::fs::write(&s.cfg_path, text).unwrap();
    let gateway = Gateway::start_file(&s.cfg_path);
    let gw = gateway.addr;
    assert!(s.routes(&["add", "live", "/late"]).status.success());
    let t0 = Instant::now();
    let app = app();
    let _rx = live_receiver(s, gw, &app, "");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "tunnel took {took:?}");
    // The other core follows through its inbox, within 5 s.
    let took = until_status(gw, "/late/x", 200);
    assert!(took <= Duration::from_secs(5), "route took {took:?}");
}
