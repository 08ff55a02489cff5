//! Listening sockets: one per worker on the same address with
//! `SO_REUSEPORT` (socket2), so the kernel spreads connections over cores
//! without a shared accept queue.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

pub fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {host}")))
}

/// A non-blocking listener with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// `n` listeners on one address; when `addr` has port 0 the first bind
/// picks the port and the others share it.
pub fn bind_workers(addr: SocketAddr, n: usize) -> io::Result<(SocketAddr, Vec<TcpListener>)> {
    let first = bind_reuseport(addr)?;
    let actual = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bind_reuseport(actual)?);
    }
    Ok((actual, all))
}
