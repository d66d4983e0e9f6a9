//! meshcast nodes for the multi-node benchmarks: the config shape of tests/common's
//! `NodeProc` (each node on a loopback IP of its own, the test cluster token; on loopback a
//! node takes it without TLS certificates), logging warnings only, killed by PID on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;

use super::{free_port, wait_port};

pub const TOKEN: &str = "meshcast-bench-cluster-token";

/// A loopback address of its own for the next node (127.20.0.x).
pub fn node_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 250 + 1;
    SocketAddr::from(([127, 20, 0, n as u8], free_port()))
}

pub struct Node {
    pub child: Child,
    pub name: String,
    pub quic: SocketAddr,
    pub rtmp: SocketAddr,
    pub http: SocketAddr,
}

/// What a node is.
pub enum Role<'a> {
    Standalone,
    /// An origin meshed with these other origins.
    Origin(&'a [SocketAddr]),
    /// An edge of these origins.
    Edge(&'a [SocketAddr]),
}

impl Node {
    /// Starts `bin` as `name` at `quic`'s IP with `rtmp_extra` added to its `[rtmp]`
    /// section; waits for its HTTP port.
    pub fn start(
        bin: &Path,
        work: &Path,
        name: &str,
        quic: SocketAddr,
        role: Role,
        rtmp_extra: &str,
    ) -> Node {
        let ip = quic.ip();
        let rtmp = SocketAddr::new(ip, free_port());
        let http = SocketAddr::new(ip, free_port());
        let webrtc = SocketAddr::new(ip, free_port());
        let list = |v: &[SocketAddr]| {
            v.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (role_name, backbone) = match role {
            Role::Standalone => ("standalone", "listen = \"off\"\n".to_string()),
            Role::Origin(peers) => (
                "origin",
                format!("listen = \"{quic}\"\npeers = [{}]\n", list(peers)),
            ),
            Role::Edge(origins) => (
                "edge",
                format!("origins = [{}]\nbind = \"{ip}\"\n", list(origins)),
            ),
        };
        let config = format!(
            "[node]\nid = \"{name}\"\nregion = \"r\"\nrole = \"{role_name}\"\n\n[rtmp]\nlisten = \"{rtmp}\"\n{rtmp_extra}\n\n[http]\nlisten = \"{http}\"\n\n[webrtc]\nlisten = \"{webrtc}\"\n\n[backbone]\ntoken = \"{TOKEN}\"\n{backbone}\n"
        );
        let child = super::start_meshcast(bin, &work.join(format!("{name}.toml")), &config);
        wait_port_at(http);
        Node {
            child,
            name: name.into(),
            quic,
            rtmp,
            http,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the node lists `n` backbone links (bounded: 15 s).
    pub fn wait_links(&self, n: usize) {
        let start = std::time::Instant::now();
        loop {
            let links = super::http::http_get(self.http, "/api/v1/links")
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|v| v["links"].as_array().map(|l| l.len()))
                .unwrap_or(0);
            if links >= n {
                return;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(15),
                "{}: {links} of {n} backbone links up",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_port_at(addr: SocketAddr) {
    if addr.ip().is_loopback() && addr.ip() == std::net::Ipv4Addr::LOCALHOST {
        return wait_port(addr.port());
    }
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "node did not start at {addr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
