//! Room join storms: how long a participant waits from joining a room to the first frame
//! of another participant, with many joining at once.
//!
//! A standalone node. In each room a host is present (its event channel open) and
//! publishes the synthetic H.264 of `common::synth` (`KBPS`, default 500 kb/s, 2 s GOP) over
//! WHIP with the project's str0m client. Then N participants join at once, each with the
//! project's clients (tokio-tungstenite for the event channel, the str0m WHEP client for
//! media), on a runtime of `JOINER_THREADS` (2) threads:
//!
//! 1. opens its event channel and waits for the `welcome` (which lists the host's track):
//!    the room's own signalling, all server-side;
//! 2. plays the host's track over WHEP: POST → answer (server-side), then ICE and DTLS,
//!    then the first RTP packet of a keyframe (the first frame it can decode).
//!
//! Reported per storm: the welcome, the WHEP answer, their sum (the server-side join), and
//! the whole join (channel opened → first keyframe packet), p50/p99/max; and the server's
//! CPU over the storm. Two shapes: everyone in one room, and rooms of `ROOM_SIZE` (5): one
//! host and four joiners each.
//!
//! Run: `cargo bench --bench room_join`. Environment: `STORMS=10,50,200`, `ROOM_SIZE=5`,
//! `KBPS=500`, `JOINER_THREADS=2`, `SECONDS=6` (how long joiners stay), `PERF=1` (records the
//! server with `perf record -g` during each storm, into the bench's work directory).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{node_addr, Node, Role};
use common::publish::whip_publisher;
use common::synth::{percentile, Synth};
use common::{build_meshcast, cpu_seconds, window_from_env, PerfRecord};
use futures_util::StreamExt;
use meshcast::webrtc::client::{self, PlayOptions};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn main() {
    let storms: Vec<usize> = env_or("STORMS", "10,50,200")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let room_size: usize = env_or("ROOM_SIZE", "5").parse().expect("ROOM_SIZE");
    let kbps: u32 = env_or("KBPS", "500").parse().expect("KBPS");
    let threads: usize = env_or("JOINER_THREADS", "2")
        .parse()
        .expect("JOINER_THREADS");
    let stay = window_from_env(6);
    let work = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("room_join");
    std::fs::create_dir_all(&work).unwrap();
    let bin = build_meshcast();
    let synth = Synth::load(&work, kbps);
    println!("# Room join storms: one standalone node; hosts publish synthetic H.264 at {kbps} kb/s over WHIP; joiners on {threads} client thread(s); channel opened → welcome → WHEP POST → first keyframe packet");
    println!("| rooms | joiners | joined | welcome p50 / p99 ms | WHEP answer p50 / p99 ms | server-side (welcome + answer) p50 / p99 ms | first frame p50 / p99 / max ms | storm s | server CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &storms {
        for rooms in [1, n.div_ceil(room_size.saturating_sub(1).max(1))] {
            let r = storm(&bin, &work, &synth, rooms, n, threads, stay);
            println!(
                "| {rooms} | {n} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.2} | {:.2} |",
                r.first_frame_ms.len(),
                percentile(&r.welcome_ms, 0.5),
                percentile(&r.welcome_ms, 0.99),
                percentile(&r.answer_ms, 0.5),
                percentile(&r.answer_ms, 0.99),
                percentile(&r.server_ms, 0.5),
                percentile(&r.server_ms, 0.99),
                percentile(&r.first_frame_ms, 0.5),
                percentile(&r.first_frame_ms, 0.99),
                r.first_frame_ms.last().copied().unwrap_or(f64::NAN),
                r.storm_s,
                r.server_cpu,
            );
            if rooms == 1 && n <= room_size {
                break;
            }
        }
    }
}

struct StormResult {
    welcome_ms: Vec<f64>,
    answer_ms: Vec<f64>,
    server_ms: Vec<f64>,
    first_frame_ms: Vec<f64>,
    storm_s: f64,
    server_cpu: f64,
}

/// One participant's join: (welcome, WHEP answer, first keyframe), from opening its channel.
struct Joined {
    welcome: Duration,
    answer: Duration,
    first_frame: Duration,
}

/// `POST /api/v1/rooms` on loopback (the admin API with auth off): the room's id.
fn create_room(http: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).unwrap();
    let body = r#"{"max_participants": 1000}"#;
    write!(
        s,
        "POST /api/v1/rooms HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).expect("room JSON");
    v["id"].as_str().expect("room id").to_string()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `identity`'s event channel in `room` and reads until its `welcome`.
async fn open_channel(
    http: SocketAddr,
    room: &str,
    identity: &str,
) -> Option<(Ws, serde_json::Value)> {
    let url = format!("ws://{http}/api/v1/rooms/{room}/events?identity={identity}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
    while let Some(Ok(m)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).ok()?;
            if v["type"] == "welcome" {
                return Some((ws, v));
            }
        }
    }
    None
}

/// Keeps a channel read (answering pings) until `until`.
fn hold(mut ws: Ws, until: Instant) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout_at(until.into(), async { while ws.next().await.is_some() {} })
            .await;
    });
}

fn storm(
    bin: &Path,
    work: &Path,
    synth: &Synth,
    rooms: usize,
    n: usize,
    threads: usize,
    stay: Duration,
) -> StormResult {
    // (The extra text closes `[rtmp]` and opens `[rooms]`: one room may hold every joiner.)
    let rooms_section = "\n[rooms]\nmax_participants = 1000\n";
    let node = Node::start(
        bin,
        work,
        "rooms",
        node_addr(),
        Role::Standalone,
        rooms_section,
    );
    let http = node.http;
    let pid = node.pid();
    let ids: Vec<String> = (0..rooms).map(|_| create_room(http)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(4) + stay + Duration::from_secs(3);
    // The hosts: present, and publishing.
    let mut publishers = Vec::new();
    for id in &ids {
        let (ws, _) = rt
            .block_on(open_channel(http, id, "host"))
            .expect("host joins");
        rt.block_on(async { hold(ws, end) });
        publishers.push(whip_publisher(
            http,
            &format!("/whip/room/{id}.host"),
            synth.clone(),
            end.saturating_duration_since(Instant::now()),
        ));
    }
    std::thread::sleep(Duration::from_secs(3));
    let recorder = std::env::var_os("PERF")
        .is_some()
        .then(|| PerfRecord::start(pid, &work.join(format!("perf-rooms-{rooms}-{n}.data"))));
    let cpu0 = cpu_seconds(pid);
    let joined: Vec<Joined> = rt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let room = ids[i % ids.len()].clone();
                tokio::spawn(async move {
                    let start = Instant::now();
                    let (ws, welcome) = open_channel(http, &room, &format!("p{i}")).await?;
                    let welcome_at = start.elapsed();
                    hold(ws, Instant::now() + stay + Duration::from_secs(1));
                    let host = welcome["participants"]
                        .as_array()?
                        .iter()
                        .find(|p| p["track"].is_object())?;
                    let path = format!("/whep/{}", host["track"]["stream"].as_str()?);
                    let opts = PlayOptions {
                        duration: stay,
                        via: None,
                        packets: None,
                    };
                    let s = client::play_with(http, &path, &opts).await.ok()?;
                    Some(Joined {
                        welcome: welcome_at,
                        answer: s.answered?,
                        first_frame: welcome_at + s.first_keyframe?,
                    })
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(Some(j)) = t.await {
                out.push(j);
            }
        }
        out
    });
    let server_cpu = cpu_seconds(pid) - cpu0;
    drop(recorder);
    let storm_s = joined
        .iter()
        .map(|j| j.first_frame)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    for p in publishers {
        let _ = p.join();
    }
    drop(node);
    let sorted = |f: &dyn Fn(&Joined) -> Duration| {
        let mut v: Vec<f64> = joined.iter().map(|j| f(j).as_secs_f64() * 1000.0).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    StormResult {
        welcome_ms: sorted(&|j| j.welcome),
        answer_ms: sorted(&|j| j.answer),
        server_ms: sorted(&|j| j.welcome + j.answer),
        first_frame_ms: sorted(&|j| j.first_frame),
        storm_s,
        server_cpu,
    }
}
