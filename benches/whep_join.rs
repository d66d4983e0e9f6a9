//! WHEP join storms: how long a joining viewer waits, what the joins cost the server, and
//! whether viewers already watching notice.
//!
//! A standalone node carries one live stream (the synthetic H.264 of `common::synth`, ~1.5
//! Mb/s at 30 frames/s, 2 s GOP, published over WHIP by the project's str0m client) and
//! `EXISTING` (200) viewers already watching (the project's str0m WHEP client, on a thread of
//! their own). Then a storm of N viewers join at once (the same client, on a runtime of
//! `JOINER_THREADS` (2) threads). For each joiner: the time from its WHEP POST to the first
//! RTP packet of a keyframe (an SPS or IDR) it receives. Over the storm (from its start to
//! the last joiner's first keyframe), from /proc: the server's CPU-seconds and this
//! process's (the client side: joiners, the existing viewers, the publisher), so that it is
//! clear which side the time is spent on. Also the server's CPU beyond its steady fan-out
//! (the fan-out rate measured before the storm, subtracted), and the longest wait between
//! two video packets that any existing viewer saw from the storm's start until the joiners
//! stop. A fresh node per storm, so the viewers of one storm do not weigh on the next.
//!
//! Run: `cargo bench --bench whep_join`. Environment: `STORMS=50,200,1000`, `EXISTING=200`,
//! `SECONDS=8` (how long joiners stay; a joiner without a keyframe by then failed; the
//! watchers' gaps are read over at least this long, so `STORMS=0` gives their gaps with no
//! storm),
//! `JOINER_THREADS=2`, `PERF=1` (records the server with `perf record -g` during each storm
//! into the bench's work directory).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{node_addr, Node, Role};
use common::publish::{current_thread, whip_publisher};
use common::synth::{percentile, Synth};
use common::{build_meshcast, cpu_seconds, window_from_env, PerfRecord};
use meshcast::webrtc::client::{self, Observer, PlayOptions};

const PATH: &str = "/whep/live/join";
/// The existing viewers' thread's nice value.
const WATCHER_NICE: i32 = -15;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn main() {
    let storms: Vec<usize> = env_or("STORMS", "50,200,1000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let existing: usize = env_or("EXISTING", "200").parse().expect("EXISTING");
    let threads: usize = env_or("JOINER_THREADS", "2")
        .parse()
        .expect("JOINER_THREADS");
    let stay = window_from_env(8);
    let perf = std::env::var_os("PERF").is_some();
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("whep_join");
    std::fs::create_dir_all(&work).unwrap();
    let bin = build_meshcast();
    let synth = Synth::load(&work, 1500);
    per_session_costs();
    println!(
        "# WHEP join storms: synthetic H.264 ~1.5 Mb/s 30 fps, 2 s GOP; {existing} viewers already watching; joiners on {threads} client thread(s); POST → first keyframe packet"
    );
    println!("| joiners | joined | p50 ms | p99 ms | max ms | answer p50 / p99 ms | DTLS done p50 / p99 ms | storm s | server CPU s | joins per server core-s | server CPU beyond fan-out s | joins per core-s (beyond fan-out) | client CPU s | existing viewers' longest gap ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &storms {
        let r = storm(&bin, &work, &synth, existing, n, threads, stay, perf);
        println!(
            "| {n} | {} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
            r.joined,
            percentile(&r.join_ms, 0.5),
            percentile(&r.join_ms, 0.99),
            r.join_ms.last().copied().unwrap_or(f64::NAN),
            percentile(&r.answer_ms, 0.5),
            percentile(&r.answer_ms, 0.99),
            percentile(&r.connected_ms, 0.5),
            percentile(&r.connected_ms, 0.99),
            r.storm_s,
            r.server_cpu,
            r.joined as f64 / r.server_cpu.max(1e-9),
            r.server_extra_cpu,
            r.joined as f64 / r.server_extra_cpu.max(1e-9),
            r.client_cpu,
            r.max_gap_ms
        );
    }
}

/// What the server does per joining viewer before any packet, measured in this process:
/// answering an offer (`meshcast::webrtc::answer_offer`: SDP parse, a new `Rtc`), against
/// what generating a DTLS certificate would add if it were done per session (it is done once
/// per node: `WebRtc::start`).
fn per_session_costs() {
    let offer = client::recvonly_offer("127.0.0.1:5000".parse().unwrap()).expect("offer");
    let cert = meshcast::webrtc::dtls_certificate().expect("certificate");
    let candidates = ["127.0.0.1:6000".parse().unwrap()];
    let rounds = 500;
    let t = Instant::now();
    for _ in 0..rounds {
        let answered = meshcast::webrtc::answer_offer(
            &offer,
            meshcast::webrtc::PeerKind::Viewer,
            &cert,
            &candidates,
            false,
        );
        assert!(answered.is_ok());
    }
    let answer_us = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let t = Instant::now();
    for _ in 0..50 {
        assert!(meshcast::webrtc::dtls_certificate().is_some());
    }
    let cert_us = t.elapsed().as_secs_f64() * 1e6 / 50.0;
    println!("# Per session, in-process: answer_offer {answer_us:.0} µs; a DTLS certificate would cost {cert_us:.0} µs more (generated once per node instead)");
}

struct StormResult {
    joined: usize,
    /// Sorted: POST → first keyframe packet, → answer, → DTLS done.
    join_ms: Vec<f64>,
    answer_ms: Vec<f64>,
    connected_ms: Vec<f64>,
    storm_s: f64,
    server_cpu: f64,
    server_extra_cpu: f64,
    client_cpu: f64,
    max_gap_ms: f64,
}

#[allow(clippy::too_many_arguments)]
fn storm(
    bin: &Path,
    work: &Path,
    synth: &Synth,
    existing: usize,
    n: usize,
    threads: usize,
    stay: Duration,
    perf: bool,
) -> StormResult {
    let node = Node::start(bin, work, "join", node_addr(), Role::Standalone, "");
    let http = node.http;
    let pid = node.pid();
    let joins = Duration::from_millis(200) * (existing as u32).div_ceil(50);
    let settle = Duration::from_secs(3);
    let baseline = Duration::from_secs(2);
    let watching = joins + settle + baseline + stay + Duration::from_secs(1);
    let publisher = whip_publisher(
        http,
        "/whip/live/join",
        synth.clone(),
        Duration::from_secs(2) + watching + Duration::from_secs(1),
    );
    std::thread::sleep(Duration::from_secs(2));
    let gap = Arc::new(AtomicU64::new(0));
    let observer = Observer {
        max_video_gap_us: Some(gap.clone()),
        ..Default::default()
    };
    let watchers = std::thread::spawn(move || {
        // Ahead of the joiners and the server in the scheduler (the bench runs as root), so
        // that the gaps these viewers see are the server's, not this process's.
        // SAFETY: setpriority on this thread's own id; no memory is passed.
        unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                WATCHER_NICE,
            );
        }
        current_thread().block_on(async move {
            let opts = PlayOptions {
                duration: watching,
                via: None,
                packets: None,
            };
            let mut tasks = Vec::new();
            for i in 0..existing {
                let (opts, observer) = (opts.clone(), observer.clone());
                tasks.push(tokio::spawn(async move {
                    client::play_observed(http, PATH, &opts, &observer)
                        .await
                        .is_ok_and(|s| s.connected)
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
    std::thread::sleep(joins + settle);
    // The steady fan-out's CPU rate, before the storm.
    let (b0, bt) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(baseline);
    let fanout_rate = (cpu_seconds(pid) - b0) / bt.elapsed().as_secs_f64();

    let sampler = Sampler::start(pid);
    let recorder = perf.then(|| PerfRecord::start(pid, &work.join(format!("perf-join-{n}.data"))));
    gap.store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    let stats = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let opts = PlayOptions {
                duration: stay,
                via: None,
                packets: None,
            };
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let opts = opts.clone();
                    tokio::spawn(async move { client::play_with(http, PATH, &opts).await })
                })
                .collect();
            let mut stats = Vec::new();
            for t in tasks {
                match t.await {
                    Ok(Ok(s)) => stats.push(s),
                    Ok(Err(e)) => eprintln!("joiner: {e}"),
                    Err(e) => eprintln!("joiner task: {e}"),
                }
            }
            stats
        });
    // The watchers' gaps are read over at least `stay` (a storm of 0 is the control).
    std::thread::sleep(stay.saturating_sub(t0.elapsed()));
    let max_gap_ms = gap.load(Ordering::Relaxed) as f64 / 1000.0;
    let samples = sampler.stop();
    drop(recorder);
    let watched = watchers.join().unwrap();
    if watched < existing {
        eprintln!("only {watched} of {existing} existing viewers played");
    }
    let _ = publisher.join();
    drop(node);

    let sorted_ms = |f: &dyn Fn(&client::WhepStats) -> Option<Duration>| {
        let mut v: Vec<f64> = stats
            .iter()
            .filter_map(f)
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let join_ms = sorted_ms(&|s| s.first_keyframe);
    let answer_ms = sorted_ms(&|s| s.answered);
    let connected_ms = sorted_ms(&|s| s.connected_after);
    let end = stats
        .iter()
        .filter_map(|s| s.first_keyframe_at)
        .max()
        .unwrap_or(t0);
    let (server_cpu, client_cpu) = samples.between(t0, end);
    let storm_s = end.duration_since(t0).as_secs_f64();
    StormResult {
        joined: join_ms.len(),
        join_ms,
        answer_ms,
        connected_ms,
        storm_s,
        server_cpu,
        server_extra_cpu: (server_cpu - fanout_rate * storm_s).max(0.0),
        client_cpu,
        max_gap_ms,
    }
}

/// CPU-seconds of the server and of this process, read every 10 ms on a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, f64, f64)>>,
}

struct Samples(Vec<(Instant, f64, f64)>);

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let me = std::process::id();
        let thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            // Bounded: at most 10 minutes of samples.
            for _ in 0..60_000 {
                v.push((Instant::now(), cpu_seconds(pid), cpu_seconds(me)));
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            v
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        Samples(self.thread.join().unwrap())
    }
}

impl Samples {
    /// (server, client) CPU-seconds between the samples nearest `from` and `to`.
    fn between(&self, from: Instant, to: Instant) -> (f64, f64) {
        let at = |t: Instant| {
            self.0
                .iter()
                .min_by_key(|s| if s.0 > t { s.0 - t } else { t - s.0 })
                .copied()
                .unwrap_or((t, 0.0, 0.0))
        };
        let (a, b) = (at(from), at(to));
        (b.1 - a.1, b.2 - a.2)
    }
}
