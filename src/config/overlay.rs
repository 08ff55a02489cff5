//! Where each configuration value comes from: the defaults, the file,
//! the environment and the command line, in that order of precedence
//! (a flag beats a variable, a variable beats the file, the file beats a
//! default), as frp and cloudflared users expect.
//!
//! - **Environment:** `ANP_PROXY_<TABLE>__<KEY>`, tables and keys joined
//!   by a double underscore (upper case, as variables are written; lower
//!   case works after the prefix): `ANP_PROXY_RECEIVER__TOKEN`,
//!   `ANP_PROXY_GATEWAY__TLS__CERT_FILE`; the two top-level keys are
//!   `ANP_PROXY_MODE` and `ANP_PROXY_DEBUG`. A variable under a table's
//!   prefix that names no key is refused, naming the variable; other
//!   `ANP_PROXY_*` names (`ANP_PROXY_BIN`, a test's fault injection) are
//!   not configuration and are left alone.
//! - **Flags:** `--set table.key=value` (repeatable) and the direct flags
//!   `main.rs` maps to keys (`--token`, `--gateway-url`, …).
//!
//! A value is read by the type of its key: a string key takes the text as
//! it is; a number, boolean or duration is TOML (`8089`, `true`, `2.5`); a
//! list takes a TOML array or comma-separated words; a list of tables
//! (`gateway.auth.tokens`) or a whole table takes a TOML inline value. Each
//! value is then checked alone by the same deserializer as the file, so a
//! bad one is refused naming its key and its variable or flag; the merged
//! configuration is validated like a file, and a refusal names the source
//! of the key it is about. A relative path given by variable or flag is
//! taken from the current directory (the file's own paths stay relative to
//! the file).
//!
//! Never: reading the environment anywhere but [`Overrides::from_env`]'s
//! caller (so tests pass their own variables), or printing a value (a
//! token may be one; `Debug` shows keys and sources only).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use toml::{Table, Value};

use super::{unknown_key_message, Config, ConfigError};

/// The prefix of every configuration variable.
pub const ENV_PREFIX: &str = "ANP_PROXY_";

/// The tables a variable may name (`ANP_PROXY_<TABLE>__…`).
const ENV_TABLES: [&str; 3] = ["LOGGING", "GATEWAY", "RECEIVER"];

/// The top-level keys, each a variable of its own.
const ENV_TOP_KEYS: [&str; 2] = ["MODE", "DEBUG"];

/// Keys whose value is a file or directory path: a relative one given by
/// variable or flag is made absolute from the current directory.
const PATH_LEAVES: [&str; 7] = [
    "cert_file",
    "key_file",
    "ca_file",
    "did_document",
    "private_key",
    "did_documents_dir",
    "log_dir",
];

/// Where one value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    /// The variable's name.
    Env(String),
    /// The flag as typed: `--token`, `--set receiver.token`.
    Flag(String),
}

impl Source {
    /// What a refusal says it found invalid: "config file x.toml",
    /// "environment variable ANP_PROXY_GATEWAY__PORT", "flag --port".
    pub fn describe(&self) -> String {
        match self {
            Source::Default => "configuration (defaults; no config file)".into(),
            Source::File(p) => format!("config file {}", p.display()),
            Source::Env(v) => format!("environment variable {v}"),
            Source::Flag(f) => format!("flag {f}"),
        }
    }

    /// The note `check --print` writes after a value; None for a default.
    fn note(&self) -> Option<String> {
        match self {
            Source::Default => None,
            Source::File(_) => Some("file".into()),
            Source::Env(v) => Some(format!("env {v}")),
            Source::Flag(f) => Some(format!("flag {f}")),
        }
    }
}

/// One value set outside the file.
#[derive(Clone)]
pub struct Override {
    /// Dotted key: `receiver.token`, `gateway.tls.cert_file`.
    pub key: String,
    raw: String,
    pub source: Source,
}

impl fmt::Debug for Override {
    // The value may be a secret: key and source only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.key, self.source.describe())
    }
}

/// Values set by environment and flags, lowest precedence first.
#[derive(Debug, Clone, Default)]
pub struct Overrides(Vec<Override>);

/// Why a variable or a `--set` could not even be read as a key and value.
fn refuse(source: &Source, message: String) -> ConfigError {
    ConfigError::Override {
        origin: source.describe(),
        message,
    }
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The configuration variables among `vars` (the process environment,
    /// or a test's), in name order so the result does not depend on the
    /// environment's order.
    pub fn from_env<I, K, V>(vars: I) -> Result<Overrides, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        let mut found = Vec::new();
        for (name, value) in vars {
            let Some(name) = name.as_ref().to_str() else {
                continue; // not ours: ours are ASCII
            };
            let Some(key) = env_key(name)? else {
                continue;
            };
            let source = Source::Env(name.to_owned());
            let Some(value) = value.as_ref().to_str() else {
                return Err(refuse(&source, "its value is not UTF-8".into()));
            };
            found.push(Override {
                key,
                raw: value.to_owned(),
                source,
            });
        }
        found.sort_by_key(|o| o.source.describe());
        Ok(Overrides(found))
    }

    /// A `--set KEY=VALUE` argument.
    pub fn push_set(&mut self, arg: &str) -> Result<(), ConfigError> {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(refuse(
                &Source::Flag(format!("--set {arg}")),
                "expected KEY=VALUE, for example `--set gateway.port=8080`".into(),
            ));
        };
        let key = key.trim();
        let source = Source::Flag(format!("--set {key}"));
        if key.is_empty() || key.split('.').any(|p| p.is_empty() || p.contains(' ')) {
            return Err(refuse(
                &source,
                format!("`{key}` is not a dotted key like `receiver.token`"),
            ));
        }
        self.push(key, value, source);
        Ok(())
    }

    /// A value from a flag of its own (`--token` for `receiver.token`).
    pub fn push_flag(&mut self, key: &str, value: &str, flag: &str) {
        self.push(key, value, Source::Flag(flag.to_owned()));
    }

    /// `other`'s values after (so above) this one's.
    pub fn extend(&mut self, other: Overrides) {
        self.0.extend(other.0);
    }

    fn push(&mut self, key: &str, value: &str, source: Source) {
        self.0.push(Override {
            key: key.to_owned(),
            raw: value.to_owned(),
            source,
        });
    }
}

/// The dotted key a variable sets; None when `name` is not a configuration
/// variable; an error when it is under a table's prefix but malformed.
fn env_key(name: &str) -> Result<Option<String>, ConfigError> {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(None);
    };
    let upper = rest.to_ascii_uppercase();
    if ENV_TOP_KEYS.contains(&upper.as_str()) {
        return Ok(Some(upper.to_ascii_lowercase()));
    }
    let Some(table) = ENV_TABLES
        .iter()
        .find(|t| upper.starts_with(*t) && upper[t.len()..].starts_with('_'))
    else {
        return Ok(None);
    };
    let source = Source::Env(name.to_owned());
    let after = &rest[table.len()..];
    let Some(path) = after.strip_prefix("__") else {
        return Err(refuse(
            &source,
            format!(
                "a table and its key are joined by a double underscore: \
                 {ENV_PREFIX}{table}_{after}"
            ),
        ));
    };
    let parts: Vec<&str> = path.split("__").collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(refuse(
            &source,
            format!("`{path}` is not a key (KEY, or TABLE__KEY for a table inside {table})"),
        ));
    }
    let mut key = table.to_ascii_lowercase();
    for p in parts {
        key.push('.');
        key.push_str(&p.to_ascii_lowercase());
    }
    Ok(Some(key))
}

/// Where the configuration in force came from: the file (if any), the
/// keys it wrote, and the overrides, kept so that a reload applies the
/// same overrides to the re-read file and `check --print` can say where
/// each value came from.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub file: Option<PathBuf>,
    file_keys: BTreeSet<String>,
    overrides: Overrides,
}

impl Origin {
    /// Where the value of dotted `key` came from: the last override of it
    /// or of a table holding it, else the file if it wrote it (or a table
    /// holding it), else the default.
    pub fn source_of(&self, key: &str) -> Source {
        let covers = |k: &str| key == k || key.strip_prefix(k).is_some_and(|r| r.starts_with('.'));
        if let Some(o) = self.overrides.0.iter().rev().find(|o| covers(&o.key)) {
            return o.source.clone();
        }
        match &self.file {
            Some(f) if self.file_keys.iter().any(|k| covers(k)) => Source::File(f.clone()),
            _ => Source::Default,
        }
    }

    /// What a refusal of `key`'s value names: its override, else the file
    /// (also for a default the file left: the file is where to fix it).
    fn describe(&self, key: &str) -> String {
        match (self.source_of(key), &self.file) {
            (Source::Default, Some(f)) => Source::File(f.clone()).describe(),
            (s, _) => s.describe(),
        }
    }

    /// How `check` names the configuration: the file, or that there is
    /// none.
    pub fn label(&self) -> String {
        match &self.file {
            Some(f) => f.display().to_string(),
            None => "(no config file)".into(),
        }
    }

    /// `printed` (the effective TOML) with the source of each value that
    /// is not a default noted after it: `port = 9000  # env ANP_PROXY_…`.
    pub fn annotate(&self, printed: &str) -> String {
        let mut out = String::with_capacity(printed.len() * 2);
        let mut table = String::new();
        for line in printed.lines() {
            let t = line.trim();
            let key = if let Some(h) = t.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
                table = h.trim().to_owned();
                Some(table.clone())
            } else if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                table = h.trim().to_owned();
                None
            } else {
                t.split_once(" = ").map(|(k, _)| {
                    let k = k.trim().trim_matches('"');
                    if table.is_empty() {
                        k.to_owned()
                    } else {
                        format!("{table}.{k}")
                    }
                })
            };
            out.push_str(line);
            if let Some(note) = key.and_then(|k| self.source_of(&k).note()) {
                out.push_str("  # ");
                out.push_str(&note);
            }
            out.push('\n');
        }
        out
    }
}

impl Config {
    /// The configuration from `file` (None: defaults only) with
    /// `overrides` on top, validated; relative paths of the file resolve
    /// from its directory, and without a file from the current one.
    pub fn load_with(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let mut cfg = Self::build(text.as_deref().zip(file), overrides)?;
        cfg.base_dir = file
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(cfg)
    }

    /// The same file and overrides read again (SIGHUP): a file edited
    /// since is picked up, the environment and flags of the start stay.
    pub fn reload(&self) -> Result<Config, ConfigError> {
        Self::load_with(self.origin.file.as_deref(), self.origin.overrides.clone())
    }

    /// File text (if any) and overrides to a validated configuration.
    pub(super) fn build(
        file: Option<(&str, &Path)>,
        overrides: Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = Table::new();
        let mut cfg = Config::default();
        if let Some((text, path)) = file {
            // The file alone first: its errors keep toml's caret layout
            // and name the file.
            cfg = Self::from_text(text, path)?;
            table = text.parse::<Table>().map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
        let mut file_keys = BTreeSet::new();
        leaf_keys(&table, "", &mut file_keys);
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        if !overrides.is_empty() {
            let schema = match Value::try_from(Config::default()) {
                Ok(Value::Table(t)) => t,
                _ => Table::new(),
            };
            for o in &overrides.0 {
                let value = typed(schema_at(&schema, &o.key), &o.key, &o.raw, &cwd);
                let invalid = |message: String| ConfigError::Invalid {
                    origin: o.source.describe(),
                    key: o.key.clone(),
                    message,
                };
                // Alone first, so a refusal is about this key and source.
                let mut alone = Table::new();
                set(&mut alone, &o.key, value.clone()).map_err(invalid)?;
                deserialize(alone).map_err(invalid)?;
                set(&mut table, &o.key, value).map_err(invalid)?;
            }
            cfg = deserialize(table.clone()).map_err(|message| ConfigError::Override {
                origin: "configuration (file and overrides together)".into(),
                message,
            })?;
        }
        if cfg.gateway.database.backend.is_none() && super::has_mysql_keys(&table) {
            cfg.gateway.database.backend = Some(super::DbBackend::Mysql);
        }
        cfg.origin = Origin {
            file: file.map(|(_, p)| p.to_owned()),
            file_keys,
            overrides,
        };
        cfg.validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                origin: cfg.origin.describe(key),
                key: key.to_owned(),
                message,
            })?;
        Ok(cfg)
    }
}

/// A table through the same deserializer as a file (`deny_unknown_fields`,
/// strict durations), an unknown key's message made as helpful as a
/// file's.
fn deserialize(table: Table) -> Result<Config, String> {
    Config::deserialize(Value::Table(table)).map_err(|e| {
        let m = e.message().trim_end().to_owned();
        unknown_key_message(&m).unwrap_or(m)
    })
}

/// The default's value at dotted `key`, telling the key's type; None for
/// a key absent from the defaults (an optional one, or no key at all).
fn schema_at<'a>(schema: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut v = schema.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// `raw` as the value of `key` (see the module's comment).
fn typed(schema: Option<&Value>, key: &str, raw: &str, cwd: &Path) -> Value {
    match schema {
        Some(Value::String(_)) => {
            let leaf = key.rsplit('.').next().unwrap_or(key);
            let is_path = PATH_LEAVES.contains(&leaf) || key == "gateway.database.path";
            if is_path && !raw.is_empty() && Path::new(raw).is_relative() {
                Value::String(cwd.join(raw).display().to_string())
            } else {
                Value::String(raw.to_owned())
            }
        }
        Some(Value::Array(_)) if !raw.trim_start().starts_with('[') => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|w| !w.is_empty())
                .map(|w| Value::String(w.to_owned()))
                .collect(),
        ),
        _ => inline(raw).unwrap_or_else(|| Value::String(raw.to_owned())),
    }
}

/// `raw` as a TOML value (`8089`, `true`, `[1, 2]`, `{ a = 1 }`); None
/// when it is not one (a bare word: taken as a string).
fn inline(raw: &str) -> Option<Value> {
    let mut t = format!("v = {raw}").parse::<Table>().ok()?;
    (t.len() == 1).then(|| t.remove("v")).flatten()
}

/// Sets dotted `key` in `table` to `v`, creating tables on the way.
/// `verify_mode` and its synonym `tls_verify_mode` replace each other.
fn set(table: &mut Table, key: &str, v: Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let (leaf, tables) = parts.split_last().expect("split yields one part");
    let mut t = table;
    for (i, p) in tables.iter().enumerate() {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is not a table; set it whole", parts[..=i].join(".")))?;
    }
    let synonym = match *leaf {
        "verify_mode" => Some("tls_verify_mode"),
        "tls_verify_mode" => Some("verify_mode"),
        _ => None,
    };
    if let Some(other) = synonym {
        t.remove(other);
    }
    t.insert(leaf.to_string(), v);
    Ok(())
}

/// Every key with a value that is not a table, dotted, into `out` (a list
/// of tables counts as one value).
fn leaf_keys(table: &Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Table(t) => leaf_keys(t, &key, out),
            _ => {
                out.insert(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Overrides, ConfigError> {
        Overrides::from_env(vars.iter().copied())
    }

    fn build(text: &str, o: Overrides) -> Result<Config, String> {
        Config::build(Some((text, Path::new("x.toml"))), o).map_err(|e| e.to_string())
    }

    #[test]
    fn variables_map_to_dotted_keys_and_others_are_left_alone() {
        let o = env(&[
            ("ANP_PROXY_GATEWAY__PORT", "9000"),
            ("ANP_PROXY_receiver__token", "t"),
            ("ANP_PROXY_GATEWAY__TLS__CERT_FILE", "/c.pem"),
            ("ANP_PROXY_MODE", "receiver"),
            ("ANP_PROXY_BIN", "/x"),
            ("ANP_PROXY_FAULT_PANIC_PATH", "/p"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        let keys: Vec<&str> = o.0.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "gateway.port",
                "gateway.tls.cert_file",
                "mode",
                "receiver.token"
            ]
        );
        for (name, needle) in [
            ("ANP_PROXY_GATEWAY_PORT", "ANP_PROXY_GATEWAY__PORT"),
            ("ANP_PROXY_RECEIVER__", "is not a key"),
            ("ANP_PROXY_GATEWAY__TLS____X", "is not a key"),
        ] {
            let e = env(&[(name, "1")]).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
        }
    }

    #[test]
    fn precedence_is_flag_then_env_then_file_then_default() {
        let text = "[gateway]\nport = 1000\nhost = '0.0.0.0'\n";
        let mut o = env(&[
            ("ANP_PROXY_GATEWAY__PORT", "2000"),
            ("ANP_PROXY_GATEWAY__WORKERS", "3"),
        ])
        .unwrap();
        let mut flags = Overrides::default();
        flags.push_flag("gateway.port", "3000", "--port");
        o.extend(flags);
        let c = build(text, o).unwrap();
        assert_eq!(c.gateway.port, 3000);
        assert_eq!(c.gateway.workers, 3);
        assert_eq!(c.gateway.host, "0.0.0.0");
        assert_eq!(c.gateway.timeout.get(), 30.0);
        let src = |k| c.origin.source_of(k);
        assert_eq!(src("gateway.port"), Source::Flag("--port".into()));
        assert_eq!(
            src("gateway.workers"),
            Source::Env("ANP_PROXY_GATEWAY__WORKERS".into())
        );
        assert_eq!(src("gateway.host"), Source::File("x.toml".into()));
        assert_eq!(src("gateway.timeout"), Source::Default);
    }

    #[test]
    fn values_take_their_keys_type() {
        let mut o = Overrides::default();
        for set in [
            "receiver.token=12345678",
            "gateway.trust_forwarded=true",
            "gateway.timeout=2.5",
            "gateway.duplicate_tunnels=refuse",
            "gateway.auth.service_domains=a.example, b.example",
            "gateway.tunnel_port=8443",
            "gateway.auth.tokens=[{name='a', token='secret-a-1', paths=['/a']}]",
            "gateway.tls.tls_verify_mode=optional",
        ] {
            o.push_set(set).unwrap();
        }
        o.push_set("gateway.tls.verify_mode=none").unwrap();
        let c = build(
            "[gateway.tls]\ntls_verify_mode = 'required'\nca_file='c'\n",
            o,
        )
        .unwrap();
        assert_eq!(c.receiver.token, "12345678");
        assert!(c.gateway.trust_forwarded);
        assert_eq!(c.gateway.timeout.get(), 2.5);
        assert_eq!(
            c.gateway.duplicate_tunnels,
            super::super::DuplicateTunnels::Refuse
        );
        assert_eq!(c.gateway.auth.service_domains, ["a.example", "b.example"]);
        assert_eq!(c.gateway.tunnel_port, Some(8443));
        assert_eq!(c.gateway.auth.tokens[0].paths, ["/a"]);
        assert_eq!(c.gateway.tls.verify_mode, super::super::VerifyMode::None);
        // The token never prints.
        assert!(!format!("{c:?}").contains("secret-a-1"));
    }

    #[test]
    fn a_bad_value_is_refused_naming_its_key_and_source() {
        for (name, value, needles) in [
            (
                "ANP_PROXY_GATEWAY__PORT",
                "eighty",
                &["gateway.port", "u16"][..],
            ),
            ("ANP_PROXY_GATEWAY__PORT", "70000", &["gateway.port"]),
            ("ANP_PROXY_GATEWAY__TIMEOUT", "inf", &["gateway.timeout"]),
            (
                "ANP_PROXY_GATEWAY__TIMEOUT",
                "0",
                &["gateway.timeout", "> 0"],
            ),
            ("ANP_PROXY_GATEWAY__PROT", "1", &["did you mean `port`?"]),
            (
                "ANP_PROXY_RECEIVER__CHUNK_SIZE",
                "10",
                &["receiver.chunk_size"],
            ),
        ] {
            let o = env(&[(name, value)]).unwrap();
            let e = build("", o).unwrap_err();
            assert!(e.contains(&format!("environment variable {name}")), "{e}");
            for n in needles {
                assert!(e.contains(n), "{name}={value}: {e}");
            }
            assert!(!e.contains("x.toml"), "{e}");
        }
        // A file's own bad value still names the file.
        let e = build("[gateway]\ntimeout = 0\n", Overrides::default()).unwrap_err();
        assert!(
            e.contains("config file x.toml") && e.contains("gateway.timeout"),
            "{e}"
        );
        let mut o = Overrides::default();
        assert!(o
            .push_set("gateway.port")
            .unwrap_err()
            .to_string()
            .contains("KEY=VALUE"));
        assert!(o.push_set("gateway..port=1").is_err());
    }

    #[test]
    fn override_paths_are_from_the_current_directory() {
        let mut o = Overrides::default();
        o.push_set("receiver.ca_file=ca.pem").unwrap();
        o.push_set("receiver.upstream=http://127.0.0.1:1").unwrap();
        let c = build("[receiver]\ncert_file='c.pem'\nkey_file='k.pem'\n", o).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(Path::new(&c.receiver.ca_file), cwd.join("ca.pem"));
        assert_eq!(c.receiver.cert_file, "c.pem");
        assert_eq!(c.receiver.upstream, "http://127.0.0.1:1");
    }

    #[test]
    fn print_notes_where_each_value_came_from() {
        let mut o = env(&[("ANP_PROXY_RECEIVER__TOKEN", "rx-secret-9")]).unwrap();
        o.push_set("gateway.port=9000").unwrap();
        let c = build(
            "[gateway]\nworkers = 2\n[[gateway.auth.tokens]]\nname='a'\ntoken='tok-secret-1'\n",
            o,
        )
        .unwrap();
        let out = c.effective_toml();
        for secret in ["rx-secret-9", "tok-secret-1"] {
            assert!(!out.contains(secret), "{out}");
        }
        for line in [
            "port = 9000  # flag --set gateway.port",
            "workers = 2  # file",
            "token = \"<redacted>\"  # env ANP_PROXY_RECEIVER__TOKEN",
            "[[gateway.auth.tokens]]  # file",
            "timeout = 30.0\n",
        ] {
            assert!(out.contains(line), "{line:?} in\n{out}");
        }
        // Still a configuration that loads.
        Config::parse(&out, Path::new("printed.toml")).expect(&out);
    }

    #[test]
    fn no_file_defaults_and_overrides_only() {
        let o = env(&[
            ("ANP_PROXY_RECEIVER__GATEWAY_URL", "ws://gw.example:80/ws"),
            ("ANP_PROXY_RECEIVER__TOKEN", "tok"),
        ])
        .unwrap();
        let c = Config::load_with(None, o).unwrap();
        assert_eq!(c.receiver.gateway_url, "ws://gw.example:80/ws");
        assert_eq!(c.base_dir, Path::new("."));
        assert_eq!(c.origin.label(), "(no config file)");
        let o = env(&[("ANP_PROXY_GATEWAY__TLS__ENABLED", "true")]).unwrap();
        let e = Config::load_with(None, o).unwrap_err().to_string();
        // The missing key is a default: no file to blame.
        assert!(
            e.contains("no config file") && e.contains("gateway.tls.cert_file"),
            "{e}"
        );
        // Reload keeps the overrides.
        let o = env(&[("ANP_PROXY_GATEWAY__PORT", "9001")]).unwrap();
        let c = Config::load_with(None, o).unwrap();
        assert_eq!(c.reload().unwrap().gateway.port, 9001);
    }
}
