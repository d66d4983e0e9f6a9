//! Helpers shared by the benchmark harnesses: build the release binary, pick ports, wait
//! for a server, read a process's CPU time and RSS from /proc.

#![allow(dead_code)]

#[path = "../../tests/common/nginx.rs"]
pub mod nginx;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Builds `meshcast` in release mode and returns its path.
pub fn build_meshcast() -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "meshcast"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success());
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("release/meshcast")
}

/// A loopback port free for both TCP and UDP right now.
pub fn free_port() -> u16 {
    loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (user, system) CPU seconds of a process.
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses); USER_HZ is 100 on Linux.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (field(11), field(12))
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let (u, s) = cpu_split(pid);
    u + s
}

pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `VIEWERS` (comma-separated counts) or the default list.
pub fn viewers_from_env(default: &str) -> Vec<usize> {
    std::env::var("VIEWERS")
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// `SECONDS` (the measurement window) or the default.
pub fn window_from_env(default_secs: u64) -> Duration {
    Duration::from_secs(
        std::env::var("SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_secs),
    )
}
