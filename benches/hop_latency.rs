//! Added latency per hop, and the QUIC backbone's throughput per CPU-second.
//!
//! **Latency.** The bench publisher sends a synthetic H.264 stream (`common::synth`: real
//! SPS/PPS, filler slices of ~1.5 Mb/s at 30 frames/s, 2 s GOP) whose every frame ends in
//! its send time, read from a monotonic clock shared by the whole process. Viewers in the
//! same process read the stamp at the end of each frame's last packet (WHEP: the RTP packet
//! with the marker bit; RTMP: the video message) and note when it arrived. Paths:
//!
//! * standalone: publisher → node → viewer;
//! * mesh: publisher → origin A → origin B → edge of B, with a measuring viewer attached at
//!   each of the three nodes, so every frame gives its latency at A, at B and at the edge,
//!   and each hop's share is the per-frame difference (B − A, edge − B).
//!
//! Both for WHIP → WHEP (the project's str0m client on both ends) and RTMP → RTMP
//! (`rml_rtmp` through `meshcast::rtmp::client`, every node with `rtmp.merged_write_ms = 0`),
//! at low load (the measuring viewers only) and with `LOADS` extra plain viewers on the last
//! node of the path (the standalone node, or the edge), joined before the window.
//!
//! **Backbone throughput.** `STREAMS` (50) RTMP publishes of the synthetic stream at
//! `STREAM_KBPS` (4000) into origin A, one RTMP player per stream on origin B (which pulls
//! each over the QUIC backbone). Over the window: bits relayed (published payload) per
//! CPU-second of each node's process, and the same load on one standalone node as the
//! reference without a backbone (so the backbone's own share can be read off).
//!
//! Run: `cargo bench --bench hop_latency`. Environment: `SECONDS=20` (window), `LOADS=0,500`,
//! `PROTOS=webrtc,rtmp`, `PARTS=latency,backbone`, `STREAMS=50`, `STREAM_KBPS=4000`, `PERF=1`
//! (`perf record -g` of origins A and B over the backbone window, into the work directory).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cluster::{node_addr, Node, Role};
use common::publish::{current_thread, rtmp_publish, rtmp_stamps, whip_publisher};
use common::synth::{nanos_at, percentile, read_stamp, Stamp, Synth};
use common::{build_meshcast, cpu_seconds, window_from_env, PerfRecord};
use meshcast::rtmp::client::{PlayMode, Player};
use meshcast::webrtc::client::{self, Observer, PlayOptions};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn list(name: &str, default: &str) -> Vec<String> {
    env_or(name, default)
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn main() {
    let window = window_from_env(20);
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hop_latency");
    std::fs::create_dir_all(&work).unwrap();
    let bin = build_meshcast();
    let parts = list("PARTS", "latency,backbone");
    if parts.iter().any(|p| p == "latency") {
        latency(&bin, &work, window);
    }
    if parts.iter().any(|p| p == "backbone") {
        backbone(&bin, &work, window);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    WebRtc,
    Rtmp,
}

fn latency(bin: &Path, work: &Path, window: Duration) {
    let synth = Synth::load(work, 1500);
    println!(
        "# Latency: synthetic H.264 ~1.5 Mb/s, 30 frames/s, window {}s; ms from the publisher's stamp to the frame's last byte at the viewer",
        window.as_secs()
    );
    println!("| protocol | extra viewers | path | frames | p50 ms | p99 ms | p99.9 ms | max ms | keyframes: n, p50, max ms | p99 without keyframes |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for proto in list("PROTOS", "webrtc,rtmp") {
        let proto = match proto.as_str() {
            "webrtc" => Proto::WebRtc,
            "rtmp" => Proto::Rtmp,
            other => panic!("unknown protocol {other} (webrtc, rtmp)"),
        };
        for load in list("LOADS", "0,500") {
            let load: usize = load.parse().expect("LOADS");
            let name = match proto {
                Proto::WebRtc => "WHIP → WHEP",
                Proto::Rtmp => "RTMP → RTMP",
            };
            let row = |path: &str, l: Latencies| {
                let v = &l.all;
                let k = &l.keyframes;
                println!(
                    "| {name} | {load} | {path} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {}, {:.2}, {:.2} | {:.2} |",
                    v.len(),
                    percentile(v, 0.5),
                    percentile(v, 0.99),
                    percentile(v, 0.999),
                    v.last().copied().unwrap_or(f64::NAN),
                    k.len(),
                    percentile(k, 0.5),
                    k.last().copied().unwrap_or(f64::NAN),
                    percentile(&l.others, 0.99),
                );
            };
            // Standalone.
            let node = Node::start(
                bin,
                work,
                "standalone",
                node_addr(),
                Role::Standalone,
                "merged_write_ms = 0",
            );
            let r = measure(proto, &synth, &node, &[&node], load, window);
            row("publisher → node → viewer", r.latency(0));
            cpu_note(name, load, "standalone", &r);
            drop(node);
            // Two origins and an edge of the second.
            let (a_quic, b_quic) = (node_addr(), node_addr());
            let a = Node::start(
                bin,
                work,
                "origin-a",
                a_quic,
                Role::Origin(&[b_quic]),
                "merged_write_ms = 0",
            );
            let b = Node::start(
                bin,
                work,
                "origin-b",
                b_quic,
                Role::Origin(&[a_quic]),
                "merged_write_ms = 0",
            );
            let edge = Node::start(
                bin,
                work,
                "edge-b1",
                node_addr(),
                Role::Edge(&[b_quic]),
                "merged_write_ms = 0",
            );
            a.wait_links(2);
            b.wait_links(3);
            edge.wait_links(1);
            let r = measure(proto, &synth, &a, &[&a, &b, &edge], load, window);
            row("publisher → A → viewer", r.latency(0));
            row("publisher → A → B → viewer", r.latency(1));
            row("publisher → A → B → edge → viewer", r.latency(2));
            row("hop A → B (per frame, B − A)", r.hop(0, 1));
            row("hop B → edge (per frame, edge − B)", r.hop(1, 2));
            row("A → B → edge (per frame, edge − A)", r.hop(0, 2));
            cpu_note(name, load, "A + B + edge", &r);
        }
    }
}

/// A row saying how busy the machine was over the window (2 cores here).
fn cpu_note(name: &str, load: usize, nodes: &str, r: &Samples) {
    println!(
        "| {name} | {load} | CPU over the window, in cores: nodes ({nodes}) {:.2}, bench process (publisher, viewers) {:.2} | | | | | | | |",
        r.server_cpu, r.client_cpu
    );
}

/// Per measuring viewer: stamp → ms from the stamp to the frame's arrival; and the CPU
/// used over the window (in cores) by the nodes and by this process.
struct Samples {
    frames: Vec<HashMap<Stamp, f64>>,
    server_cpu: f64,
    client_cpu: f64,
}

/// Latencies (ms) of all frames, of the keyframes and of the other frames, each sorted.
struct Latencies {
    all: Vec<f64>,
    keyframes: Vec<f64>,
    others: Vec<f64>,
}

impl Latencies {
    fn from(pairs: impl Iterator<Item = (Stamp, f64)>) -> Latencies {
        let (mut all, mut keyframes, mut others) = (Vec::new(), Vec::new(), Vec::new());
        for (stamp, ms) in pairs {
            all.push(ms);
            if stamp.keyframe {
                keyframes.push(ms);
            } else {
                others.push(ms);
            }
        }
        for v in [&mut all, &mut keyframes, &mut others] {
            v.sort_by(f64::total_cmp);
        }
        Latencies {
            all,
            keyframes,
            others,
        }
    }
}

impl Samples {
    fn latency(&self, i: usize) -> Latencies {
        Latencies::from(self.frames[i].iter().map(|(s, t)| (*s, *t)))
    }

    fn hop(&self, from: usize, to: usize) -> Latencies {
        Latencies::from(
            self.frames[to]
                .iter()
                .filter_map(|(stamp, t)| self.frames[from].get(stamp).map(|f| (*stamp, t - f))),
        )
    }
}

/// Publishes to `ingest`, attaches a measuring viewer to each of `viewers` (and `load` plain
/// ones to the last), and keeps the samples of frames sent during the window.
fn measure(
    proto: Proto,
    synth: &Synth,
    ingest: &Node,
    viewers: &[&Node],
    load: usize,
    window: Duration,
) -> Samples {
    let joins = Duration::from_millis(200) * (load as u32).div_ceil(50);
    let settle = Duration::from_secs(3);
    let total = Duration::from_secs(2) + joins + settle + window + Duration::from_secs(1);
    let (rtmp_in, http_in) = (ingest.rtmp, ingest.http);
    let publisher = match proto {
        Proto::WebRtc => whip_publisher(http_in, "/whip/live/hop", synth.clone(), total),
        Proto::Rtmp => {
            let synth = synth.clone();
            std::thread::spawn(move || {
                current_thread()
                    .block_on(rtmp_publish(rtmp_in, "hop", &synth, total))
                    .map_err(|e| eprintln!("RTMP publisher: {e}"))
                    .is_ok()
            })
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    // Plain viewers, on a thread of their own, in waves of 50.
    let last = viewers.last().unwrap();
    let (plain_http, plain_rtmp) = (last.http, last.rtmp);
    let stay = joins + settle + window;
    let plain = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let mut tasks = Vec::new();
            for i in 0..load {
                tasks.push(tokio::spawn(async move {
                    match proto {
                        Proto::WebRtc => client::play(plain_http, "/whep/live/hop", stay)
                            .await
                            .is_ok_and(|s| s.connected),
                        Proto::Rtmp => {
                            match Player::connect(&plain_rtmp.to_string(), "live", "hop").await {
                                Ok(p) => p.receive(PlayMode::CountBytes, stay).await.is_ok(),
                                Err(_) => false,
                            }
                        }
                    }
                }));
                if i % 50 == 49 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let mut ok = 0;
            for t in tasks {
                ok += usize::from(t.await.unwrap_or(false));
            }
            ok
        })
    });
    std::thread::sleep(joins);
    // Measuring viewers, on another thread.
    let targets: Vec<(SocketAddr, SocketAddr)> = viewers.iter().map(|n| (n.http, n.rtmp)).collect();
    let measuring = settle + window;
    let measured = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let mut tasks = Vec::new();
            for (http, rtmp) in targets {
                let (tx, rx) = mpsc::channel::<(Stamp, Instant)>();
                tasks.push((
                    rx,
                    tokio::spawn(async move {
                        match proto {
                            Proto::WebRtc => {
                                let (ftx, frx) = mpsc::channel();
                                let observer = Observer {
                                    frame_ends: Some(ftx),
                                    ..Default::default()
                                };
                                let opts = PlayOptions {
                                    duration: measuring,
                                    via: None,
                                    packets: None,
                                };
                                let r =
                                    client::play_observed(http, "/whep/live/hop", &opts, &observer)
                                        .await;
                                drop(observer);
                                for f in frx.try_iter() {
                                    if let Some(s) = read_stamp(&f.tail) {
                                        let _ = tx.send((s, f.at));
                                    }
                                }
                                if let Err(e) = r {
                                    eprintln!("measuring WHEP viewer: {e}");
                                }
                            }
                            Proto::Rtmp => {
                                if let Err(e) = rtmp_stamps(rtmp, "hop", measuring, tx).await {
                                    eprintln!("measuring RTMP player: {e}");
                                }
                            }
                        }
                    }),
                ));
            }
            let mut out = Vec::new();
            for (rx, task) in tasks {
                let _ = task.await;
                out.push(rx.try_iter().collect::<Vec<_>>());
            }
            out
        })
    });
    std::thread::sleep(settle);
    let from = nanos_at(Instant::now());
    // CPU over the window: the nodes (each once) and this process (publisher and viewers).
    let mut pids: Vec<u32> = std::iter::once(ingest.pid())
        .chain(viewers.iter().map(|n| n.pid()))
        .collect();
    pids.dedup();
    let me = std::process::id();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let (server0, client0, t0) = (cpu(&pids), cpu_seconds(me), Instant::now());
    std::thread::sleep(window);
    let seconds = t0.elapsed().as_secs_f64();
    let server_cpu = (cpu(&pids) - server0) / seconds;
    let client_cpu = (cpu_seconds(me) - client0) / seconds;
    let raw = measured.join().unwrap();
    let connected = plain.join().unwrap();
    if connected < load {
        eprintln!("only {connected} of {load} plain viewers played");
    }
    if !publisher.join().unwrap_or(false) {
        eprintln!("the publisher failed");
    }
    Samples {
        server_cpu,
        client_cpu,
        frames: raw
            .into_iter()
            .map(|v| {
                v.into_iter()
                    .filter(|(stamp, _)| stamp.nanos >= from)
                    .map(|(stamp, at)| (stamp, (nanos_at(at) as f64 - stamp.nanos as f64) / 1e6))
                    .collect()
            })
            .collect(),
    }
}

/// `STREAMS` RTMP streams origin A → origin B over the backbone, then on one standalone
/// node for reference: Gbit relayed per CPU-second of each node.
fn backbone(bin: &Path, work: &Path, window: Duration) {
    let streams: usize = env_or("STREAMS", "50").parse().expect("STREAMS");
    let kbps: u32 = env_or("STREAM_KBPS", "4000").parse().expect("STREAM_KBPS");
    let synth = Synth::load(work, kbps);
    println!();
    println!(
        "# Backbone: {streams} streams of ~{kbps} kb/s published (RTMP) on origin A, one RTMP player each on origin B; window {}s",
        window.as_secs()
    );
    println!("| setup | node | CPU % | Gbit relayed | CPU s | Gbit per CPU-second | delivered |");
    println!("|---|---|---|---|---|---|---|");
    let (a_quic, b_quic) = (node_addr(), node_addr());
    let a = Node::start(bin, work, "origin-a", a_quic, Role::Origin(&[b_quic]), "");
    let b = Node::start(bin, work, "origin-b", b_quic, Role::Origin(&[a_quic]), "");
    a.wait_links(2);
    b.wait_links(2);
    let r = relay(
        &synth,
        streams,
        a.rtmp,
        b.rtmp,
        &[a.pid(), b.pid()],
        window,
        Some(work),
    );
    for (i, name) in [
        "origin A (RTMP in, QUIC out)",
        "origin B (QUIC in, RTMP out)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| A → B | {name} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.1}% |",
            r.cpu[i] / r.seconds * 100.0,
            r.gbit,
            r.cpu[i],
            r.gbit / r.cpu[i],
            r.delivered * 100.0
        );
    }
    drop((a, b));
    let s = Node::start(bin, work, "standalone", node_addr(), Role::Standalone, "");
    let r = relay(&synth, streams, s.rtmp, s.rtmp, &[s.pid()], window, None);
    println!(
        "| one node (reference) | standalone (RTMP in, RTMP out) | {:.0}% | {:.2} | {:.2} | {:.2} | {:.1}% |",
        r.cpu[0] / r.seconds * 100.0,
        r.gbit,
        r.cpu[0],
        r.gbit / r.cpu[0],
        r.delivered * 100.0
    );
}

struct Relayed {
    cpu: Vec<f64>,
    seconds: f64,
    gbit: f64,
    delivered: f64,
}

/// Publishes `streams` streams to `ingest`, plays each from `play`, measures the window.
fn relay(
    synth: &Synth,
    streams: usize,
    ingest: SocketAddr,
    play: SocketAddr,
    pids: &[u32],
    window: Duration,
    perf_dir: Option<&Path>,
) -> Relayed {
    let settle = Duration::from_secs(4);
    let total = Duration::from_secs(3) + settle + window + Duration::from_secs(2);
    let synth2 = synth.clone();
    let publishers = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let tasks: Vec<_> = (0..streams)
                .map(|i| {
                    let synth = synth2.clone();
                    tokio::spawn(async move {
                        rtmp_publish(ingest, &format!("s{i}"), &synth, total).await
                    })
                })
                .collect();
            let mut bytes = 0;
            for t in tasks {
                match t.await {
                    Ok(Ok(b)) => bytes += b,
                    other => eprintln!("publisher: {other:?}"),
                }
            }
            bytes
        })
    });
    std::thread::sleep(Duration::from_secs(3));
    let rt = current_thread();
    let (cpu, seconds, received) = rt.block_on(async {
        // Each player reads from its join on (a player that stopped reading would be cut
        // off as a slow viewer), through the settling time and the window.
        let mut tasks = Vec::new();
        for i in 0..streams {
            match Player::connect(&play.to_string(), "live", &format!("s{i}")).await {
                Ok(p) => tasks.push(tokio::spawn(
                    p.receive(PlayMode::CountBytes, settle + window),
                )),
                Err(e) => eprintln!("player s{i}: {e}"),
            }
        }
        tokio::time::sleep(settle).await;
        let cpu0: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        let t0 = Instant::now();
        // PERF=1: each node's profile over the window, into the work directory.
        let perf: Vec<PerfRecord> = match (std::env::var_os("PERF"), perf_dir) {
            (Some(_), Some(dir)) => pids
                .iter()
                .enumerate()
                .map(|(i, p)| PerfRecord::start(*p, &dir.join(format!("perf-backbone-{i}.data"))))
                .collect(),
            _ => Vec::new(),
        };
        tokio::time::sleep(window).await;
        drop(perf);
        let seconds = t0.elapsed().as_secs_f64();
        let cpu: Vec<f64> = pids
            .iter()
            .zip(cpu0)
            .map(|(p, c0)| cpu_seconds(*p) - c0)
            .collect();
        let mut received = 0u64;
        for t in tasks {
            if let Ok(Ok(s)) = t.await {
                received += s.bytes;
            }
        }
        (cpu, seconds, received)
    });
    let published = publishers.join().unwrap();
    // The published rate over the window (the publishers ran `total`).
    let rate = published as f64 / total.as_secs_f64();
    let bits = rate * seconds * 8.0;
    Relayed {
        cpu,
        seconds,
        gbit: bits / 1e9,
        // Players read through the settling time too.
        delivered: received as f64 / (rate * (settle + window).as_secs_f64()),
    }
}
