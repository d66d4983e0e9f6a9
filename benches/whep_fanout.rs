//! WHEP fan-out benchmark: meshcast and Janus side by side, fed the same RTP.
//!
//! One `ffmpeg` feeder sends a pre-encoded 720p30 H.264 (~1.5 Mb/s, no B-frames, 2 s GOP,
//! 1100-byte payloads) + Opus 64 kb/s stream as RTP, packet for packet the same to each
//! server: straight into Janus's streaming plugin mountpoint, and for meshcast into a WHIP
//! session (`meshcast::webrtc::client::publish_rtp` relays each packet unchanged on its own
//! thread). Then N viewers from the project's str0m client (`meshcast::webrtc::client`:
//! recvonly audio + video, ICE/DTLS/SRTP, counts RTP) join in waves of 50, all on one thread
//! of this process, so they compete with the server for the machine's two cores. After the
//! joins, a window is measured: RTP packets the viewers received, server CPU (user + system
//! from /proc) per packet and packets per server core-second, RSS per viewer over the
//! server's publisher-only RSS. The servers run one after the other, each alone.
//!
//! Janus (Debian `janus` 1.1) runs with the streaming plugin and the HTTP transport only,
//! ICE-lite, no trickle; its viewers use its HTTP API (one session, a handle per viewer,
//! offer from Janus, answer from the viewer). Janus never gathers candidates on a loopback
//! interface, so the benchmark re-runs itself in a private network namespace
//! (`unshare -n`, root) with a veth end on 127.0.0.2 (docs/janus-benchmark-notes.md).
//!
//! Run: `cargo bench --bench whep_fanout`. Environment: `VIEWERS=100,500,1000`,
//! `SECONDS=15`, `ROUNDS=1` (runs per server and count; the median is printed),
//! `SERVERS=meshcast,janus`, `JANUS_EVENT_LOOPS=0,2` (Janus is run once per value; 0:
//! Janus's default, a thread per viewer; N: N shared GLib loops), `CLIENT_THREADS=1` (the
//! viewers' threads: one thread decrypting every packet is the limit from ~500 viewers).
//!
//! For meshcast a second table gives the server's own count of RTP packets sent in the
//! window (`meshcast_packets_out_total{proto="webrtc"}`): where the viewers' threads cannot
//! keep up, packets the server sent are dropped at the viewers' sockets, and its CPU per
//! packet *sent* is what the server itself costs.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::janus::{self, Janus};
use common::{
    build_meshcast, cpu_seconds, free_port, rss_kb, viewers_from_env, wait_port, window_from_env,
};
use meshcast::webrtc::client::{self, PlayOptions};

const IN_NAMESPACE: &str = "MESHCAST_BENCH_NETNS";

fn main() {
    if std::env::var_os(IN_NAMESPACE).is_none() {
        // Re-run in a private network namespace, with room for a socket per viewer.
        let status = Command::new("unshare")
            .args([
                "-n",
                "--",
                "sh",
                "-c",
                "ulimit -n \"$(ulimit -Hn)\" && exec \"$0\" \"$@\"",
            ])
            .arg(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env(IN_NAMESPACE, "1")
            .status()
            .expect("unshare (util-linux; needs root)");
        std::process::exit(status.code().unwrap_or(1));
    }
    janus::set_up_namespace();
    let viewers = viewers_from_env("100,500,1000");
    let window = window_from_env(15);
    let rounds: usize = env_or("ROUNDS", "1").parse().expect("ROUNDS");
    // Servers to run: meshcast, and Janus once per event-loop setting.
    let mut servers = Vec::new();
    for s in env_or("SERVERS", "meshcast,janus")
        .split(',')
        .map(str::trim)
    {
        match s {
            "meshcast" => servers.push(Server::Meshcast),
            "janus" => {
                for loops in env_or("JANUS_EVENT_LOOPS", "0,2").split(',') {
                    servers.push(Server::Janus(
                        loops.trim().parse().expect("JANUS_EVENT_LOOPS"),
                    ));
                }
            }
            other => panic!("unknown server {other} (meshcast, janus)"),
        }
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("whep_fanout");
    std::fs::create_dir_all(&work).unwrap();
    let source = make_source(&work);
    let bin = build_meshcast();
    println!(
        "# WHEP fan-out: 720p30 H.264 ~1.5 Mb/s + Opus 64 kb/s as RTP, window {}s, {rounds} round(s), medians",
        window.as_secs()
    );
    let client_threads: usize = env_or("CLIENT_THREADS", "1")
        .parse()
        .expect("CLIENT_THREADS");
    if client_threads > 1 {
        println!("# viewers on {client_threads} threads");
    }
    println!("| server | viewers | connected | packets/s delivered | payload kb/s per viewer | server CPU % | µs per packet | packets per core-second | RSS KB / viewer |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for &n in &viewers {
        // Rounds alternate the servers, so slow drift on the machine touches them alike.
        let mut runs: Vec<Vec<RunResult>> = servers.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, server) in servers.iter().enumerate() {
                runs[i].push(match *server {
                    Server::Meshcast => {
                        run_meshcast(&bin, &work, &source, n, window, client_threads)
                    }
                    Server::Janus(loops) => {
                        run_janus(&work, &source, n, window, loops, client_threads)
                    }
                });
            }
        }
        for (server, runs) in servers.iter().zip(runs) {
            let r = RunResult::median(runs);
            println!(
                "| {} | {n} | {} | {:.0} | {:.0} | {:.0}% | {:.1} | {:.0} | {:.1} |",
                server.name(),
                r.connected,
                r.packets_per_s,
                r.kbps_per_viewer,
                r.cpu_percent,
                r.us_per_packet,
                r.packets_per_core_s,
                r.rss_kb_per_viewer
            );
            medians.push((*server, n, r));
        }
    }
    let sent: Vec<_> = medians
        .iter()
        .filter_map(|(_, n, r)| r.sent.map(|s| (n, r, s)))
        .collect();
    if !sent.is_empty() {
        println!();
        println!("| server | viewers | packets/s sent (server's count) | delivered / sent | µs per packet sent | packets sent per core-second |");
        println!("|---|---|---|---|---|---|");
        for (n, r, s) in sent {
            println!(
                "| meshcast | {n} | {:.0} | {:.2} | {:.1} | {:.0} |",
                s.packets_per_s,
                r.packets_per_s / s.packets_per_s.max(1e-9),
                s.us_per_packet,
                s.packets_per_core_s
            );
        }
    }
    let janus: Vec<Server> = servers
        .iter()
        .copied()
        .filter(|s| matches!(s, Server::Janus(_)))
        .collect();
    if !servers.contains(&Server::Meshcast) || janus.is_empty() {
        return;
    }
    let find = |s: Server, n: usize| {
        medians
            .iter()
            .find(|r| r.0 == s && r.1 == n)
            .map(|r| &r.2)
            .unwrap()
    };
    println!();
    println!("| viewers | vs | packets per core-second, meshcast / Janus | RSS per viewer, meshcast / Janus |");
    println!("|---|---|---|---|");
    for &n in &viewers {
        let m = find(Server::Meshcast, n);
        for &j in &janus {
            let r = find(j, n);
            println!(
                "| {n} | {} | {:.2} | {:.2} |",
                j.name(),
                m.packets_per_core_s / r.packets_per_core_s.max(1e-9),
                m.rss_kb_per_viewer / r.rss_kb_per_viewer.max(1e-9)
            );
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Meshcast,
    /// Janus with this many event loops (0: a thread per viewer, Janus's default).
    Janus(usize),
}

impl Server {
    fn name(self) -> String {
        match self {
            Server::Meshcast => "meshcast".into(),
            Server::Janus(0) => "Janus (thread per viewer)".into(),
            Server::Janus(n) => format!("Janus ({n} event loops)"),
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

#[derive(Clone, Copy)]
struct RunResult {
    connected: usize,
    packets_per_s: f64,
    cpu_percent: f64,
    us_per_packet: f64,
    packets_per_core_s: f64,
    rss_kb_per_viewer: f64,
    /// Payload kb/s per connected viewer over its whole stay.
    kbps_per_viewer: f64,
    /// The same per packet the server counts as sent, where it counts them.
    sent: Option<Sent>,
}

#[derive(Clone, Copy)]
struct Sent {
    packets_per_s: f64,
    us_per_packet: f64,
    packets_per_core_s: f64,
}

impl RunResult {
    /// The run with the median packets per core-second.
    fn median(mut runs: Vec<RunResult>) -> RunResult {
        runs.sort_by(|a, b| a.packets_per_core_s.total_cmp(&b.packets_per_core_s));
        runs[runs.len() / 2]
    }
}

fn run_meshcast(
    bin: &Path,
    work: &Path,
    source: &Path,
    n: usize,
    window: Duration,
    client_threads: usize,
) -> RunResult {
    let http = free_port();
    let udp = free_port();
    let config = work.join("meshcast.toml");
    let server = Proc(common::start_meshcast(
        bin,
        &config,
        &format!(
            "[node]\nid = \"bench\"\n[rtmp]\nlisten = \"127.0.0.1:{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[webrtc]\nlisten = \"127.0.0.1:{udp}\"\n[backbone]\nlisten = \"off\"\n",
            free_port()
        ),
    ));
    wait_port(http);
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http));
    let video = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let audio = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (vport, aport) = (
        video.local_addr().unwrap().port(),
        audio.local_addr().unwrap().port(),
    );
    let stay = stay(n, window);
    let publisher = common::publish::whip_relay(
        http_addr,
        "/whip/live/bench",
        video,
        audio,
        stay + Duration::from_secs(5),
    );
    let feeder = feeder(source, vport, aport);
    let sent = move || webrtc_packets_sent(http_addr);
    let r = measure(
        &runtime(client_threads),
        server.0.id(),
        n,
        window,
        Some(&sent),
        |opts| {
            tokio::spawn(async move {
                client::play_with(http_addr, "/whep/live/bench", &opts)
                    .await
                    .ok()
            })
        },
    );
    drop(feeder);
    drop(server);
    match publisher.join() {
        Ok(Ok(p)) if p.connected && p.video_packets > 0 => {}
        other => eprintln!("WHIP publisher: {other:?}"),
    }
    r
}

fn run_janus(
    work: &Path,
    source: &Path,
    n: usize,
    window: Duration,
    event_loops: usize,
    client_threads: usize,
) -> RunResult {
    let server = Janus::start(work, event_loops);
    let feeder = feeder(source, janus::VIDEO_PORT, janus::AUDIO_PORT);
    let rt = runtime(client_threads);
    let session = Arc::new(rt.block_on(janus::Session::create(server.http)));
    let s = session.clone();
    let r = measure(&rt, server.pid(), n, window, None, move |opts| {
        let session = s.clone();
        tokio::spawn(async move {
            let (handle, offer) = session.watch().await?;
            let (answer, viewer) = client::answer(&offer, janus::viewer_ip()).await.ok()?;
            session.start(handle, &answer).await;
            viewer.run(&opts).await.ok()
        })
    });
    if let Some(s) = Arc::into_inner(session) {
        rt.block_on(s.destroy());
    }
    drop(feeder);
    drop(server);
    r
}

/// How long each of `n` viewers stays: the joins, two seconds to settle, the window.
fn stay(n: usize, window: Duration) -> Duration {
    Duration::from_millis(200) * (n as u32).div_ceil(50) + Duration::from_secs(3) + window
}

/// meshcast's count of WebRTC RTP packets sent, from its metrics.
fn webrtc_packets_sent(http: SocketAddr) -> u64 {
    let body = common::http::http_get(http, "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix("meshcast_packets_out_total{proto=\"webrtc\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Joins `n` viewers (`spawn` starts one) in waves of 50 and measures the window; `sent`
/// reads the server's own count of packets sent, if it has one.
fn measure<F>(
    rt: &tokio::runtime::Runtime,
    pid: u32,
    n: usize,
    window: Duration,
    sent: Option<&(dyn Fn() -> u64 + Sync)>,
    spawn: F,
) -> RunResult
where
    F: Fn(PlayOptions) -> tokio::task::JoinHandle<Option<client::WhepStats>>,
{
    // Settle: the feeder running, the server holding the stream.
    std::thread::sleep(Duration::from_secs(3));
    let rss0 = rss_kb(pid);
    let packets = Arc::new(AtomicU64::new(0));
    let opts = PlayOptions {
        duration: stay(n, window),
        via: None,
        packets: Some(packets.clone()),
    };
    let (stats, cpu, window_packets, elapsed, rss1, sent_packets) = rt.block_on(async {
        let mut tasks = Vec::new();
        for wave in 0..n.div_ceil(50) {
            for _ in 0..50.min(n - wave * 50) {
                tasks.push(spawn(opts.clone()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sent0 = sent.map(|f| f());
        let (cpu0, p0) = (cpu_seconds(pid), packets.load(Ordering::Relaxed));
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let cpu = cpu_seconds(pid) - cpu0;
        let window_packets = packets.load(Ordering::Relaxed) - p0;
        let sent_packets = sent.zip(sent0).map(|(f, s0)| f().saturating_sub(s0) as f64);
        let elapsed = t0.elapsed();
        let rss1 = rss_kb(pid);
        let mut stats = Vec::new();
        for t in tasks {
            if let Ok(Some(s)) = t.await {
                stats.push(s);
            }
        }
        (
            stats,
            cpu,
            window_packets as f64,
            elapsed,
            rss1,
            sent_packets,
        )
    });
    RunResult {
        connected: stats.iter().filter(|s| s.connected).count(),
        packets_per_s: window_packets / elapsed.as_secs_f64(),
        cpu_percent: cpu / elapsed.as_secs_f64() * 100.0,
        us_per_packet: cpu * 1e6 / window_packets.max(1.0),
        packets_per_core_s: window_packets / cpu.max(1e-9),
        rss_kb_per_viewer: rss1.saturating_sub(rss0) as f64 / n as f64,
        sent: sent_packets.map(|p| Sent {
            packets_per_s: p / elapsed.as_secs_f64(),
            us_per_packet: cpu * 1e6 / p.max(1.0),
            packets_per_core_s: p / cpu.max(1e-9),
        }),
        kbps_per_viewer: stats.iter().map(|s| s.bytes).sum::<u64>() as f64 * 8.0
            / 1000.0
            / stay(n, window).as_secs_f64()
            / stats.iter().filter(|s| s.connected).count().max(1) as f64,
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The viewers' runtime: one thread, or `threads` workers.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    if threads <= 1 {
        return current_thread();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// Sends `source` as RTP in real time, looping, without re-encoding: H.264 (PT 96, 1100-byte
/// payloads like meshcast's own packetizer) to `video`, Opus (PT 111) to `audio`.
fn feeder(source: &Path, video: u16, audio: u16) -> Proc {
    let ip = IpAddr::from([127, 0, 0, 1]);
    let child = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin"])
        .args(["-re", "-stream_loop", "-1", "-i"])
        .arg(source)
        .args([
            "-map",
            "0:v",
            "-c",
            "copy",
            "-f",
            "rtp",
            "-payload_type",
            "96",
        ])
        .args(["-ssrc", "1111", "-pkt_size", "1112"])
        .arg(format!("rtp://{ip}:{video}"))
        .args([
            "-map",
            "0:a",
            "-c",
            "copy",
            "-f",
            "rtp",
            "-payload_type",
            "111",
        ])
        .args(["-ssrc", "2222"])
        .arg(format!("rtp://{ip}:{audio}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("ffmpeg");
    Proc(child)
}

/// A child process killed (by its PID) when dropped, even when the benchmark panics.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 30 s of 720p30 H.264 (constrained baseline, no B-frames, SPS/PPS before every IDR, no
/// access unit delimiters or SEI, which Janus would relay as packets of their own and
/// meshcast drops) + Opus in MPEG-TS, encoded once per work directory.
fn make_source(work: &Path) -> PathBuf {
    let path = work.join("source-720p-opus-noaud.ts");
    if path.exists() {
        return path;
    }
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", "30", "-c:v", "libx264", "-profile:v", "baseline"])
        .args(["-preset", "veryfast", "-bf", "0", "-g", "60"])
        .args(["-b:v", "1500k", "-maxrate", "1500k", "-bufsize", "1500k"])
        .args(["-bsf:v", "filter_units=remove_types=6|9"])
        .args(["-c:a", "libopus", "-b:a", "64k", "-ac", "2", "-f", "mpegts"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}
