//! Sockets that every listener needs the same way. Imports nothing of ours.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Connections a listener holds before they are accepted. mio (under tokio's `bind`) asks
/// for std's 128: a burst of clients (200 participants joining a room at once, each opening
/// its event channel and then a WHEP POST) overflowed it, and every dropped SYN cost its
/// client a one-second retransmission. The kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with a backlog for bursts ([`LISTEN_BACKLOG`]).
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
