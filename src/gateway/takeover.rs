//! A takeover must be intended. Our listeners use `SO_REUSEPORT`, so a
//! second gateway started by mistake on a port another one holds would
//! join it and the kernel would split the traffic between the two. A plain
//! start therefore probes each fixed port first (`net::port_held`) and
//! refuses when something listens there, naming the process if it can
//! find it (`/proc/net/tcp{,6}` for the listening socket's inode, then
//! `/proc/*/fd` for a descriptor of that socket: best effort, another
//! user's processes are not visible). `anp-proxy gateway --takeover` (what
//! `./manage.sh restart` runs) skips the probe and joins.
//!
//! Never binds a socket that listens; never signals the holder.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Config;

/// Why a plain start refuses a port.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(
        "{addr} ({key}) is already in use by {holders}: a second gateway would share the port \
         (SO_REUSEPORT) and silently split its traffic. To replace the running gateway use \
         `./manage.sh restart`, or start the new one with `anp-proxy gateway --takeover` and \
         then SIGTERM the old one"
    )]
    Held {
        key: &'static str,
        addr: SocketAddr,
        holders: Holders,
    },
    #[error("cannot check whether {addr} ({key}) is free: {source}")]
    Probe {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The processes found listening on a port (possibly none visible).
#[derive(Debug, Default)]
pub struct Holders(pub Vec<Holder>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub name: Option<String>,
}

impl fmt::Display for Holders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("another process (its pid is not visible to this user)");
        }
        for (i, h) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "pid {}", h.pid)?;
            if let Some(name) = &h.name {
                write!(f, " ({name})")?;
            }
        }
        Ok(())
    }
}

/// Refuses to start when another process listens on one of the fixed
/// ports of `cfg` (the public port, `tunnel_port`, the admin port). Port 0
/// (any free port) is not probed.
pub fn refuse_held_ports(cfg: &Config) -> Result<(), TakeoverError> {
    let g = &cfg.gateway;
    let mut ports = vec![("gateway.port", g.host.as_str(), g.port)];
    if let Some(p) = g.tunnel_port {
        ports.push(("gateway.tunnel_port", g.host.as_str(), p));
    }
    if g.admin_enabled {
        ports.push(("gateway.admin_port", g.admin_host.as_str(), g.admin_port));
    }
    for (key, host, port) in ports {
        if port == 0 {
            continue;
        }
        // A name that does not resolve fails the start itself, with its key.
        let Ok(addr) = crate::net::resolve(host, port) else {
            continue;
        };
        match crate::net::port_held(addr) {
            Ok(false) => {}
            Ok(true) => {
                return Err(TakeoverError::Held {
                    key,
                    addr,
                    holders: Holders(find_holders(addr)),
                })
            }
            Err(source) => return Err(TakeoverError::Probe { key, addr, source }),
        }
    }
    Ok(())
}

/// The processes with a descriptor of a socket listening on `addr`
/// (ourselves excluded), from `/proc`. Best effort: empty when nothing is
/// visible.
pub fn find_holders(addr: SocketAddr) -> Vec<Holder> {
    let mut inodes = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(table) = std::fs::read_to_string(file) {
            inodes.extend(listening_inodes(&table, v6, addr));
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue; // gone, or another user's
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|target| socket_inode(target.to_str()?))
                .is_some_and(|ino| inodes.contains(&ino))
        });
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm"))
                .ok()
                .map(|s| s.trim_end().to_string());
            found.push(Holder { pid, name });
        }
    }
    found.sort_by_key(|h| h.pid);
    found
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// TCP state `LISTEN` in `/proc/net/tcp` (include/net/tcp_states.h).
const TCP_LISTEN: &str = "0A";

/// Inodes of the sockets in a `/proc/net/tcp` (`v6 = false`) or
/// `/proc/net/tcp6` table that listen on an address overlapping `addr`
/// (the same port, and the same address or a wildcard on either side).
pub fn listening_inodes(table: &str, v6: bool, addr: SocketAddr) -> Vec<u64> {
    table
        .lines()
        .skip(1) // the header
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != TCP_LISTEN {
                return None;
            }
            let (ip, port) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = if v6 { parse_ipv6(ip)? } else { parse_ipv4(ip)? };
            (port == addr.port() && overlaps(ip, addr.ip()))
                .then(|| f[9].parse().ok())
                .flatten()
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address with `%08X` of its
/// in-memory (network order) value read as a native integer.
fn word(hex: &str) -> Option<[u8; 4]> {
    Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
}

fn parse_ipv4(hex: &str) -> Option<IpAddr> {
    if hex.len() != 8 {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(word(hex)?)))
}

fn parse_ipv6(hex: &str) -> Option<IpAddr> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut b = [0u8; 16];
    for i in 0..4 {
        b[i * 4..i * 4 + 4].copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
    }
    Some(IpAddr::V6(Ipv6Addr::from(b)))
}

/// Whether a listener on `a` and a bind to `b` (same port) collide.
fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (a, b) = (plain(a), plain(b));
    a == b || a.is_unspecified() || b.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address as the kernel prints it (native-order words).
    fn hex_words(bytes: &[u8]) -> String {
        bytes
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes(w.try_into().unwrap())))
            .collect()
    }

    fn line(ip: IpAddr, port: u16, state: &str, inode: u64) -> String {
        let hex = match ip {
            IpAddr::V4(v4) => hex_words(&v4.octets()),
            IpAddr::V6(v6) => hex_words(&v6.octets()),
        };
        format!(
            "   0: {hex}:{port:04X} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0000000000000000 100 0 0 10 0"
        )
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";

    #[test]
    fn finds_the_listener_on_the_port_and_nothing_else() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        let table = [
            HEADER.to_string(),
            line(lo, 8089, "0A", 11),
            line(lo, 8089, "01", 12),    // an established connection
            line(lo, 8090, "0A", 13),    // another port
            line(any, 8089, "0A", 14),   // the wildcard overlaps
            line(other, 8089, "0A", 15), // another address does not
        ]
        .join("\n");
        let addr: SocketAddr = "127.0.0.1:8089".parse().unwrap();
        assert_eq!(listening_inodes(&table, false, addr), vec![11, 14]);
    }

    #[test]
    fn reads_ipv6_tables_with_mapped_and_wildcard_addresses() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let table = [
            HEADER.to_string(),
            line(mapped, 443, "0A", 21),
            line(any6, 443, "0A", 22),
            line(lo6, 443, "0A", 23),
        ]
        .join("\n");
        let v4: SocketAddr = "127.0.0.1:443".parse().unwrap();
        assert_eq!(listening_inodes(&table, true, v4), vec![21, 22]);
        let v6: SocketAddr = "[::1]:443".parse().unwrap();
        assert_eq!(listening_inodes(&table, true, v6), vec![22, 23]);
    }

    #[test]
    fn socket_links_and_messages() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        let e = TakeoverError::Held {
            key: "gateway.port",
            addr: "127.0.0.1:8089".parse().unwrap(),
            holders: Holders(vec![Holder {
                pid: 77,
                name: Some("anp-proxy".into()),
            }]),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("pid 77 (anp-proxy)")
                && msg.contains("gateway.port")
                && msg.contains("--takeover")
                && msg.contains("./manage.sh restart"),
            "{msg}"
        );
        assert!(Holders::default().to_string().contains("not visible"));
    }

    #[test]
    fn our_own_listener_is_in_proc_net_tcp() {
        // find_holders skips our own pid (the e2e tests check it names
        // another process); the table lookup is what we can check here.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert!(
            !listening_inodes(&table, false, addr).is_empty(),
            "our listener on {addr} must be in /proc/net/tcp"
        );
    }
}
