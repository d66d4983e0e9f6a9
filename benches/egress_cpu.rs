//! Egress CPU benchmark (not a test): what one pushed or recorded stream costs meshcast.
//!
//! A 720p30 H.264 ~4 Mb/s + AAC stream is published to a release build of meshcast; then
//! `EGRESS` (default 10) RTMP pushes into nginx-rtmp run for a window, then as many fMP4
//! recordings. The CPU meshcast spends above its publish-only baseline, divided by the
//! number of egresses, is the cost per stream. Side by side, the same number of
//! `ffmpeg -c copy` relays (what operators otherwise run per push: nginx `exec push`, SRS
//! `forward` via ffmpeg) do the same remux, and the ratio is printed.
//!
//! Opus → AAC, the only transcoding egress does implicitly, is measured in-process on the
//! same transcoder the node uses (`meshcast::transcode`), as CPU per second of audio.
//!
//! Run: `cargo bench --bench egress_cpu`. Environment: `EGRESS=10` `SECONDS=20`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{http_get, http_request};
use common::nginx::Nginx;
use common::{build_meshcast, cpu_seconds, encoded_source, free_port, wait_port, window_from_env};

const KBPS: u32 = 4000;

fn main() {
    let n: usize = std::env::var("EGRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let window = window_from_env(20);
    let work = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("egress_cpu");
    let _ = std::fs::remove_dir_all(work.join("rec"));
    std::fs::create_dir_all(&work).unwrap();
    let source = encoded_source(&work, "1280x720", KBPS);
    let bin = build_meshcast();
    let nginx = Nginx::start(&work.join("nginx"), free_port());

    let rtmp = free_port();
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = work.join("meshcast.toml");
    let mut node = common::start_meshcast(
        &bin,
        &config,
        &format!(
            "[node]\nid = \"bench\"\n[rtmp]\nlisten = \"127.0.0.1:{rtmp}\"\n[http]\nlisten = \"{http}\"\n[backbone]\nlisten = \"off\"\n[webrtc]\nlisten = \"off\"\n[recording]\nroot = \"rec\"\n"
        ),
    );
    wait_port(rtmp);
    let src_url = format!("rtmp://127.0.0.1:{rtmp}/live/src");
    let mut publisher = common::loop_publisher(&source, &src_url);
    std::thread::sleep(Duration::from_secs(4));

    println!(
        "# Egress: 720p30 H.264 ~{KBPS} kb/s + AAC, {n} egresses, window {}s, {} cores",
        window.as_secs(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let pid = node.id();
    let base = cpu_over(&[pid], window);
    println!(
        "baseline (publish only): meshcast {:.1}% of a core",
        base * 100.0
    );
    println!("| egress | meshcast % core / stream | ffmpeg -c copy % core / stream | meshcast / ffmpeg |");
    println!("|---|---|---|---|");

    // RTMP pushes into nginx-rtmp.
    let ids = start(http, n, |i| {
        format!(
            r#"{{"stream":"live/src","kind":"rtmp","url":"{}"}}"#,
            nginx.url(&format!("push{i}"))
        )
    });
    let push = (cpu_over(&[pid], window) - base) / n as f64;
    check_and_stop(http, &ids);
    let relays: Vec<Child> = (0..n)
        .map(|i| ffmpeg_copy(&src_url, &["-f", "flv", &nginx.url(&format!("relay{i}"))]))
        .collect();
    let ffmpeg_push = measure_children(relays, window);
    row("RTMP push (remux)", push, ffmpeg_push);

    // fMP4 recordings.
    let ids = start(http, n, |_| {
        r#"{"stream":"live/src","kind":"record"}"#.to_string()
    });
    let record = (cpu_over(&[pid], window) - base) / n as f64;
    check_and_stop(http, &ids);
    let rec_dir = work.join("rec-ffmpeg");
    std::fs::create_dir_all(&rec_dir).unwrap();
    let recorders: Vec<Child> = (0..n)
        .map(|i| {
            let out = rec_dir.join(format!("{i}.mp4"));
            ffmpeg_copy(
                &src_url,
                &[
                    "-movflags",
                    "frag_keyframe+empty_moov+default_base_moof",
                    "-y",
                    out.to_str().unwrap(),
                ],
            )
        })
        .collect();
    let ffmpeg_record = measure_children(recorders, window);
    row("fMP4 recording", record, ffmpeg_record);

    let _ = publisher.kill();
    let _ = publisher.wait();
    let _ = node.kill();
    let _ = node.wait();
    drop(nginx);

    let (per_audio_second, frames) = opus_to_aac_cost(&work);
    println!(
        "Opus -> AAC (48 kHz stereo, {frames} frames): {:.2}% of a core per stream",
        per_audio_second * 100.0
    );
}

fn row(what: &str, ours: f64, ffmpeg: f64) {
    println!(
        "| {what} | {:.2}% | {:.2}% | {:.2}x |",
        ours * 100.0,
        ffmpeg * 100.0,
        ours / ffmpeg
    );
}

/// Average cores used by `pids` over `window`.
fn cpu_over(pids: &[u32], window: Duration) -> f64 {
    let sum = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let before = sum();
    let t = Instant::now();
    std::thread::sleep(window);
    (sum() - before) / t.elapsed().as_secs_f64()
}

/// Starts `n` egresses through the API, waits until all are live.
fn start(http: SocketAddr, n: usize, body: impl Fn(usize) -> String) -> Vec<String> {
    let ids: Vec<String> = (0..n)
        .map(|i| {
            let (status, text) =
                http_request(http, "POST", "/api/v1/egress", Some(&body(i))).unwrap();
            assert_eq!(status, 201, "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    let t = Instant::now();
    while !ids.iter().all(|id| state(http, id)["state"] == "live") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "egresses did not go live"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    ids
}

fn state(http: SocketAddr, id: &str) -> serde_json::Value {
    let (_, text) = http_get(http, &format!("/api/v1/egress/{id}")).unwrap();
    serde_json::from_str(&text).unwrap_or_default()
}

/// Every egress stayed healthy (no reconnects, no drops); then stops them.
fn check_and_stop(http: SocketAddr, ids: &[String]) {
    for id in ids {
        let s = state(http, id);
        assert_eq!(s["state"], "live", "{s}");
        assert_eq!(s["reconnects"], 0, "{s}");
        assert_eq!(s["dropped_frames"], 0, "{s}");
        http_request(http, "DELETE", &format!("/api/v1/egress/{id}"), None).unwrap();
    }
}

fn ffmpeg_copy(input: &str, output: &[&str]) -> Child {
    Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-i",
            input,
            "-c",
            "copy",
        ])
        .args(output)
        .stdin(Stdio::null())
        .spawn()
        .expect("ffmpeg")
}

/// Average cores per process of `children` over the window (after a settling pause).
fn measure_children(mut children: Vec<Child>, window: Duration) -> f64 {
    std::thread::sleep(Duration::from_secs(4));
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let cores = cpu_over(&pids, window);
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    cores / pids.len() as f64
}

/// CPU seconds per second of audio for Opus → AAC with the node's transcoder.
fn opus_to_aac_cost(work: &Path) -> (f64, usize) {
    use ff::Rescale;
    use ffmpeg_next as ff;
    use meshcast::media::{AudioConfig, Codec, Frame, Timebase};
    use meshcast::transcode::AudioTranscoder;

    let path = work.join("speech.ogg");
    if !path.exists() {
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"])
            .args([
                "-i",
                "sine=frequency=300:sample_rate=48000,aformat=channel_layouts=stereo",
            ])
            .args([
                "-t",
                "30",
                "-c:a",
                "libopus",
                "-b:a",
                "64k",
                "-frame_duration",
                "20",
            ])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
    }
    ff::init().unwrap();
    let mut input = ff::format::input(&path).unwrap();
    let tb = input.stream(0).unwrap().time_base();
    let frames: Vec<Frame> = input
        .packets()
        .filter_map(|(_, p)| {
            let pts = p.pts()?.rescale(tb, (1, 48_000));
            Some(Frame {
                codec: Codec::Opus,
                dts: pts,
                pts,
                timebase: Timebase(48_000),
                keyframe: true,
                payload: bytes::Bytes::copy_from_slice(p.data()?),
            })
        })
        .collect();
    let config = AudioConfig {
        codec: Codec::Opus,
        specific: bytes::Bytes::new(),
        sample_rate: 48_000,
        channels: 2,
    };
    let audio_seconds = frames.len() as f64 * 0.020;
    let mut t = AudioTranscoder::new(&config, Codec::Aac).unwrap();
    let started = cpu_time();
    let mut out = 0;
    for f in &frames {
        out += t.push(f).unwrap().len();
    }
    assert!(
        out > frames.len() / 2,
        "{out} AAC frames from {} Opus frames",
        frames.len()
    );
    ((cpu_time() - started) / audio_seconds, frames.len())
}

/// This process's CPU seconds so far.
fn cpu_time() -> f64 {
    cpu_seconds(std::process::id())
}
