//! RTMP fan-out benchmark: one 1080p H.264 + AAC publish, N RTMP players, run side by side
//! against meshcast (standalone) and nginx-rtmp on this machine. Reports, for each server and
//! N, the server's CPU seconds per viewer-minute, its RSS per viewer, and what fraction of the
//! published bytes the players received; then meshcast/nginx ratios.
//!
//! Run: `cargo bench --bench rtmp_fanout` (release build). Environment:
//! `VIEWERS=100,500,1000` `SECONDS=20` (measurement window per run) `SERVERS=meshcast,nginx`
//! `MERGED_WRITE_MS=200` (meshcast's `rtmp.merged_write_ms`).
//!
//! The publisher is `ffmpeg -re -stream_loop -1 -c copy` of a file encoded once, so it costs
//! almost nothing; the players are `meshcast::rtmp::client::Player`s on a single-threaded
//! runtime in this process that only count bytes (and send acknowledgements).

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{build_meshcast, free_port, viewers_from_env, wait_port, window_from_env};
use meshcast::rtmp::client::{PlayMode, Player};

const BITRATE_KBPS: u32 = 2500;

fn main() {
    let viewers = viewers_from_env("100,500,1000");
    let window = window_from_env(20);
    let servers: Vec<String> = std::env::var("SERVERS")
        .unwrap_or_else(|_| "meshcast,nginx".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rtmp_fanout");
    std::fs::create_dir_all(&work).unwrap();
    let source = common::encoded_source(&work, "1920x1080", BITRATE_KBPS);
    let meshcast_bin = build_meshcast();

    println!(
        "# RTMP fan-out: 1080p30 H.264 ~{BITRATE_KBPS} kb/s + AAC, window {}s, {} cores",
        window.as_secs(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| server | viewers | CPU s / viewer-min | RSS KB / viewer | delivered | server CPU % | user share |");
    println!("|---|---|---|---|---|---|---|");
    let mut results: Vec<(String, usize, RunResult)> = Vec::new();
    for &n in &viewers {
        for server in &servers {
            let mut srv = match server.as_str() {
                "meshcast" => Server::meshcast(&meshcast_bin, &work),
                "nginx" => Server::nginx(&work),
                other => panic!("unknown server {other}"),
            };
            let r = run(&mut srv, &source, n, window);
            println!(
                "| {server} | {n} | {:.4} | {:.1} | {:.1}% | {:.0}% | {:.0}% |",
                r.cpu_per_viewer_minute,
                r.rss_kb_per_viewer,
                r.delivered * 100.0,
                r.cpu_percent,
                r.user_share * 100.0
            );
            results.push((server.clone(), n, r));
            drop(srv);
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    println!();
    println!("| viewers | CPU ratio meshcast/nginx | RSS/viewer ratio meshcast/nginx |");
    println!("|---|---|---|");
    for &n in &viewers {
        let get = |s: &str| {
            results
                .iter()
                .find(|(srv, v, _)| srv == s && *v == n)
                .map(|x| &x.2)
        };
        if let (Some(m), Some(g)) = (get("meshcast"), get("nginx")) {
            println!(
                "| {n} | {:.2} | {:.2} |",
                m.cpu_per_viewer_minute / g.cpu_per_viewer_minute,
                m.rss_kb_per_viewer / g.rss_kb_per_viewer
            );
        }
    }
}

struct RunResult {
    /// Fraction of the server's CPU time spent in user space.
    user_share: f64,
    cpu_per_viewer_minute: f64,
    rss_kb_per_viewer: f64,
    delivered: f64,
    cpu_percent: f64,
}

fn run(server: &mut Server, source: &Path, viewers: usize, window: Duration) -> RunResult {
    let url = format!("rtmp://127.0.0.1:{}/live/bench", server.port);
    let mut publisher = common::loop_publisher(source, &url);
    std::thread::sleep(Duration::from_secs(3));
    let rss_idle = server.rss_kb();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = format!("127.0.0.1:{}", server.port);
    let (bytes, elapsed, cpu, rss_loaded) = rt.block_on(async {
        // Connect in waves so both servers see the same join pattern.
        let mut players = Vec::with_capacity(viewers);
        for chunk in (0..viewers).collect::<Vec<_>>().chunks(50) {
            let mut joins = Vec::new();
            for _ in chunk {
                let addr = addr.clone();
                joins.push(tokio::spawn(async move {
                    Player::connect(&addr, "live", "bench").await
                }));
            }
            for j in joins {
                match j.await.unwrap() {
                    Ok(p) => players.push(p),
                    Err(e) => eprintln!("player failed to start: {e}"),
                }
            }
        }
        // Let the joins settle (GOP bursts), then measure a steady window.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu0 = server.cpu_split();
        let t0 = Instant::now();
        let tasks: Vec<_> = players
            .into_iter()
            .map(|p| tokio::spawn(p.receive(PlayMode::CountBytes, window)))
            .collect();
        tokio::time::sleep(window / 2).await;
        let rss_loaded = server.rss_kb();
        let mut bytes = 0u64;
        for t in tasks {
            if let Ok(Ok(s)) = t.await {
                bytes += s.bytes;
            }
        }
        let elapsed = t0.elapsed();
        let cpu1 = server.cpu_split();
        (
            bytes,
            elapsed,
            (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1),
            rss_loaded,
        )
    });
    let _ = publisher.kill();
    let _ = publisher.wait();
    let minutes = elapsed.as_secs_f64() / 60.0;
    // The source is 30 s long: its size gives the real published byte rate.
    let source_rate = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0) as f64 / 30.0;
    let expected = viewers as f64 * elapsed.as_secs_f64() * source_rate;
    let (user, sys) = cpu;
    let cpu = user + sys;
    RunResult {
        user_share: if cpu > 0.0 { user / cpu } else { 0.0 },
        cpu_per_viewer_minute: cpu / (viewers as f64 * minutes),
        rss_kb_per_viewer: rss_loaded.saturating_sub(rss_idle) as f64 / viewers as f64,
        delivered: bytes as f64 / expected,
        cpu_percent: cpu / elapsed.as_secs_f64() * 100.0,
    }
}

/// Encodes the publish source once: 30 s of 1080p30 at a constrained bitrate, 2 s GOP.
struct Server {
    children: Vec<Child>,
    port: u16,
    nginx: Option<common::nginx::Nginx>,
}

impl Server {
    fn meshcast(bin: &Path, work: &Path) -> Server {
        let port = free_port();
        let http = free_port();
        let config = work.join("meshcast.toml");
        let mw: u64 = std::env::var("MERGED_WRITE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        let child = common::start_meshcast(
            bin,
            &config,
            &format!(
                "[node]\nid = \"bench\"\n[rtmp]\nlisten = \"127.0.0.1:{port}\"\nmerged_write_ms = {mw}\n[http]\nlisten = \"127.0.0.1:{http}\"\n[backbone]\nlisten = \"off\"\n[webrtc]\nlisten = \"off\"\n[limits]\nmax_rtmp_connections = 5000\n"
            ),
        );
        wait_port(port);
        Server {
            children: vec![child],
            port,
            nginx: None,
        }
    }

    fn nginx(work: &Path) -> Server {
        let nginx = common::nginx::Nginx::start(&work.join("nginx"), free_port());
        Server {
            children: vec![],
            port: nginx.port,
            nginx: Some(nginx),
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.children
            .iter()
            .chain(self.nginx.as_ref().map(|n| &n.child))
            .map(|c| c.id())
            .collect()
    }

    /// (user, system) CPU seconds of the server processes.
    fn cpu_split(&self) -> (f64, f64) {
        self.pids()
            .iter()
            .map(|pid| common::cpu_split(*pid))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    fn rss_kb(&self) -> u64 {
        self.pids().iter().map(|pid| common::rss_kb(*pid)).sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
