//! WHEP fan-out benchmark (meshcast side): one 720p30 H.264 (no B-frames) + AAC RTMP
//! publish, N WHEP viewers from the project's str0m-based client
//! (`meshcast::webrtc::client`), on one machine. Reports the SRTP packets the viewers
//! received per second, server CPU per packet (µs) and packets per server core-second, and
//! RSS per viewer. The side-by-side run against Janus is not built yet.
//!
//! Run: `cargo bench --bench whep_fanout`. Environment: `VIEWERS=100,500,1000`,
//! `SECONDS=15`.
//!
//! The viewers run in this process on one thread, so they compete with the server for the
//! machine's two cores: at high N the server cannot get more than about one core.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    build_meshcast, cpu_seconds, free_port, rss_kb, viewers_from_env, wait_port, window_from_env,
};
use std::time::{Duration, Instant};

fn main() {
    let viewers = viewers_from_env("100,500,1000");
    let window = window_from_env(15);
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("whep_fanout");
    std::fs::create_dir_all(&work).unwrap();
    let source = make_source(&work);
    let bin = build_meshcast();
    println!(
        "# WHEP fan-out: 720p30 H.264 ~1.5 Mb/s + audio (AAC bridged to Opus), window {}s",
        window.as_secs()
    );
    println!("| viewers | connected | packets/s delivered | server CPU % | µs per packet | packets per core-second | RSS KB / viewer |");
    println!("|---|---|---|---|---|---|---|");
    for n in viewers {
        let r = run(&bin, &work, &source, n, window);
        println!(
            "| {n} | {} | {:.0} | {:.0}% | {:.1} | {:.0} | {:.1} |",
            r.connected,
            r.packets_per_s,
            r.cpu_percent,
            r.us_per_packet,
            r.packets_per_core_s,
            r.rss_kb_per_viewer
        );
    }
}

struct RunResult {
    connected: usize,
    packets_per_s: f64,
    cpu_percent: f64,
    us_per_packet: f64,
    packets_per_core_s: f64,
    rss_kb_per_viewer: f64,
}

fn run(bin: &Path, work: &Path, source: &Path, n: usize, window: Duration) -> RunResult {
    let rtmp = free_port();
    let http = free_port();
    let udp = free_port();
    let config = work.join("meshcast.toml");
    let mut server = common::start_meshcast(
        bin,
        &config,
        &format!(
            "[node]\nid = \"bench\"\n[rtmp]\nlisten = \"127.0.0.1:{rtmp}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[webrtc]\nlisten = \"127.0.0.1:{udp}\"\n[backbone]\nlisten = \"off\"\n"
        ),
    );
    let pid = server.id();
    wait_port(http);
    let mut publisher =
        common::loop_publisher(source, &format!("rtmp://127.0.0.1:{rtmp}/live/bench"));
    std::thread::sleep(Duration::from_secs(3));
    let rss0 = rss_kb(pid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    // Join in waves of 50; every viewer stays for the joins plus the window.
    let join_time = Duration::from_millis(200) * (n as u32).div_ceil(50);
    let (stats, cpu, elapsed, rss1) = rt.block_on(async {
        let mut tasks = Vec::new();
        for wave in 0..n.div_ceil(50) {
            for _ in 0..50.min(n - wave * 50) {
                let stay = join_time + window + Duration::from_secs(2);
                tasks.push(tokio::spawn(meshcast::webrtc::client::play(
                    http_addr,
                    "/whep/live/bench",
                    stay,
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let cpu = cpu_seconds(pid) - cpu0;
        let elapsed = t0.elapsed();
        let rss1 = rss_kb(pid);
        let mut stats = Vec::new();
        for t in tasks {
            if let Ok(Ok(s)) = t.await {
                stats.push(s);
            }
        }
        (stats, cpu, elapsed, rss1)
    });
    let _ = publisher.kill();
    let _ = publisher.wait();
    let _ = server.kill();
    let _ = server.wait();
    // Packets per second over each viewer's whole stay, summed: a steady-state estimate.
    let stay = (join_time + window + Duration::from_secs(2)).as_secs_f64();
    let packets: u64 = stats
        .iter()
        .map(|s| s.video_packets + s.audio_packets)
        .sum();
    let packets_per_s = packets as f64 / stay;
    let window_packets = packets_per_s * elapsed.as_secs_f64();
    RunResult {
        connected: stats.iter().filter(|s| s.connected).count(),
        packets_per_s,
        cpu_percent: cpu / elapsed.as_secs_f64() * 100.0,
        us_per_packet: cpu * 1e6 / window_packets.max(1.0),
        packets_per_core_s: window_packets / cpu.max(1e-9),
        rss_kb_per_viewer: rss1.saturating_sub(rss0) as f64 / n as f64,
    }
}

fn make_source(work: &Path) -> PathBuf {
    let path = work.join("source-720p-nobf.flv");
    if path.exists() {
        return path;
    }
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args([
            "-t", "30", "-c:v", "libx264", "-preset", "veryfast", "-bf", "0", "-g", "60",
        ])
        .args(["-b:v", "1500k", "-maxrate", "1500k", "-bufsize", "1500k"])
        .args(["-c:a", "aac", "-b:a", "96k", "-f", "flv"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}
