//! WebRTC rendition CPU benchmark (not a test): what re-encoding a B-frame stream for
//! browsers costs, against the `ffmpeg` CLI doing the same transcode.
//!
//! Two 720p30 H.264 ~2.5 Mb/s + AAC streams are published to a release build of meshcast in
//! real time: one as x264 `veryfast` makes it (High profile, 3 B-frames: what OBS's defaults
//! produce), one the same without B-frames. Node CPU is measured over a window three times:
//! publish only; with one WHEP viewer (the project's str0m client) of the B-frame-free
//! stream, which is sent as it is; and with one WHEP viewer of the B-frame stream, which gets
//! the stream's WebRTC rendition (decoded, re-encoded without B-frames, AAC → Opus). The
//! rendition's cost is the last minus the second. Side by side, `ffmpeg -re` does the same
//! job on the same source (H.264 decode, libx264 `veryfast` `zerolatency` without
//! B-frames at the source's bitrate, AAC → Opus) to a null output.
//!
//! Run: `cargo bench --bench rendition_cpu`. Environment: `SECONDS=20` (window),
//! `SIZE=1280x720`, `KBPS=2500`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{build_meshcast, cpu_seconds, free_port, wait_port, window_from_env};
use meshcast::webrtc::client;

fn main() {
    let window = window_from_env(20);
    let size = std::env::var("SIZE").unwrap_or_else(|_| "1280x720".into());
    let kbps: u32 = std::env::var("KBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500);
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rendition_cpu");
    std::fs::create_dir_all(&work).unwrap();
    // x264 `veryfast`, High profile, with and without 3 B-frames.
    let encode = |bframes: &str| {
        let extra = ["-profile:v", "high", "-bf", bframes];
        common::encoded_source_with(&work, &size, kbps, &format!("-bf{bframes}"), &extra)
    };
    let (with_b, without_b) = (encode("3"), encode("0"));
    let bin = build_meshcast();

    let rtmp = free_port();
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let webrtc = free_port();
    let mut node = common::start_meshcast(
        &bin,
        &work.join("meshcast.toml"),
        &format!(
            "[node]\nid = \"bench\"\n[rtmp]\nlisten = \"127.0.0.1:{rtmp}\"\n[http]\nlisten = \"{http}\"\n[backbone]\nlisten = \"off\"\n[webrtc]\nlisten = \"127.0.0.1:{webrtc}\"\n"
        ),
    );
    wait_port(rtmp);
    let mut publishers = [("bframes", &with_b), ("plain", &without_b)].map(|(name, src)| {
        common::loop_publisher(src, &format!("rtmp://127.0.0.1:{rtmp}/live/{name}"))
    });
    std::thread::sleep(Duration::from_secs(4));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# WebRTC rendition: {size}p30 H.264 High, 3 B-frames, ~{kbps} kb/s + AAC; window {}s, {cores} cores",
        window.as_secs()
    );
    let pid = node.id();
    let base = cpu_while(pid, window, None);
    let plain = cpu_while(pid, window, Some((http, "/whep/live/plain")));
    let rendition = cpu_while(pid, window, Some((http, "/whep/live/bframes")));
    let ffmpeg = ffmpeg_transcode(&with_b, kbps, window);
    for p in &mut publishers {
        let _ = p.kill();
        let _ = p.wait();
    }
    let _ = node.kill();
    let _ = node.wait();

    let cost = rendition.cpu - plain.cpu;
    println!("| what | % of a core |");
    println!("|---|---|");
    println!(
        "| meshcast, publish only (2 streams) | {:.1}% |",
        base.cpu * 100.0
    );
    println!(
        "| + 1 WHEP viewer, stream without B-frames ({} video packets) | {:.1}% |",
        plain.packets,
        plain.cpu * 100.0
    );
    println!(
        "| + 1 WHEP viewer, stream with B-frames: the rendition ({} video packets) | {:.1}% |",
        rendition.packets,
        rendition.cpu * 100.0
    );
    println!(
        "| **the rendition alone** (difference) | **{:.1}%** |",
        cost * 100.0
    );
    println!(
        "| ffmpeg CLI, the same transcode (`-re`, to null) | {:.1}% |",
        ffmpeg * 100.0
    );
    println!("meshcast rendition / ffmpeg CLI: {:.2}x", cost / ffmpeg);
}

struct Measured {
    cpu: f64,
    packets: u64,
}

/// Average cores `pid` used over `window`, while a WHEP viewer plays `whep` if given (its
/// join, and the rendition's start, happen before the window).
fn cpu_while(pid: u32, window: Duration, whep: Option<(SocketAddr, &str)>) -> Measured {
    let viewer = whep.map(|(http, path)| {
        let path = path.to_string();
        let duration = window + Duration::from_secs(6);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(client::play(http, &path, duration))
        })
    });
    if viewer.is_some() {
        std::thread::sleep(Duration::from_secs(3));
    }
    let cpu = cores_over(pid, window);
    let packets = match viewer.map(|v| v.join().unwrap()) {
        Some(Ok(stats)) => {
            assert!(
                stats.connected && stats.video_packets > 0,
                "the viewer got video"
            );
            stats.video_packets
        }
        Some(Err(e)) => panic!("WHEP viewer failed: {e}"),
        None => 0,
    };
    Measured { cpu, packets }
}

/// Average cores an `ffmpeg -re` transcode of `source` like the rendition's uses.
fn ffmpeg_transcode(source: &Path, kbps: u32, window: Duration) -> f64 {
    let rate = format!("{kbps}k");
    let mut child = common::looping_ffmpeg(source)
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-tune",
            "zerolatency",
        ])
        .args([
            "-bf", "0", "-b:v", &rate, "-maxrate", &rate, "-bufsize", &rate,
        ])
        .args(["-c:a", "libopus", "-b:a", "64k", "-f", "null", "-"])
        .spawn()
        .expect("ffmpeg");
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cores_over(child.id(), window);
    let _ = child.kill();
    let _ = child.wait();
    cpu
}

/// Average cores `pid` uses over `window`, from now.
fn cores_over(pid: u32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    let t = Instant::now();
    std::thread::sleep(window);
    (cpu_seconds(pid) - before) / t.elapsed().as_secs_f64()
}
