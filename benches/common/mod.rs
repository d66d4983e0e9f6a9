//! Helpers shared by the benchmark harnesses: build the release binary, pick ports, wait
//! for a server, read a process's CPU time and RSS from /proc.

#![allow(dead_code)]

pub mod cluster;
#[path = "../../tests/common/http.rs"]
pub mod http;
pub mod janus;
#[path = "../../tests/common/nginx.rs"]
pub mod nginx;
#[path = "../../tests/common/ports.rs"]
pub mod ports;
pub mod publish;
pub mod synth;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Builds `meshcast` in release mode and returns its path; or, when `MESHCAST_BIN` is set,
/// that binary as it is (a private copy, safe from other worktrees' builds).
pub fn build_meshcast() -> PathBuf {
    if let Ok(bin) = std::env::var("MESHCAST_BIN") {
        return PathBuf::from(bin);
    }
    // Without the variables cargo set for this run: some build scripts (ring's) watch them,
    // and a change would rebuild the dependencies on every run.
    let status = std::process::Command::new(env!("CARGO"))
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| {
            !k.starts_with("CARGO_") || k == "CARGO_HOME" || k == "CARGO_TARGET_DIR"
        }))
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

pub use ports::free_port;

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

/// A 30 s H.264 (`size`, `kbps`, GOP 2 s) + AAC FLV file, encoded once per work directory.
pub fn encoded_source(work: &Path, size: &str, kbps: u32) -> PathBuf {
    encoded_source_with(work, size, kbps, "", &[])
}

/// [`encoded_source`] with more x264 options (`extra`, e.g. a profile and B-frames), in a
/// file whose name carries `tag`.
pub fn encoded_source_with(
    work: &Path,
    size: &str,
    kbps: u32,
    tag: &str,
    extra: &[&str],
) -> PathBuf {
    let path = work.join(format!("source-{size}-{kbps}k{tag}.flv"));
    if path.exists() {
        return path;
    }
    eprintln!("encoding the benchmark source (once)...");
    let rate = format!("{kbps}k");
    let status = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args([
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc2=size={size}:rate=30"),
        ])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args([
            "-t", "30", "-c:v", "libx264", "-preset", "veryfast", "-g", "60",
        ])
        .args(extra)
        .args(["-b:v", &rate, "-maxrate", &rate, "-bufsize", &rate])
        .args(["-c:a", "aac", "-b:a", "128k", "-f", "flv"])
        .arg(&path)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    path
}

/// An `ffmpeg` reading `source` in real time, looping; the caller adds the output.
pub fn looping_ffmpeg(source: &Path) -> std::process::Command {
    let mut c = std::process::Command::new("ffmpeg");
    c.args([
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-stream_loop",
        "-1",
        "-i",
    ])
    .arg(source)
    .stdin(std::process::Stdio::null());
    c
}

/// Publishes `source` to `url` in real time, looping, without re-encoding (it costs the
/// publisher almost nothing).
pub fn loop_publisher(source: &Path, url: &str) -> std::process::Child {
    looping_ffmpeg(source)
        .args(["-c", "copy", "-f", "flv", url])
        .spawn()
        .expect("ffmpeg")
}

/// Writes `config` to `path` and runs `bin` on it (logging warnings only, to `path` with the
/// extension `log`). The benchmark's
/// `SERVER_MALLOC_ARENA_MAX`, if set, is passed to the server as `MALLOC_ARENA_MAX`.
pub fn start_meshcast(bin: &Path, path: &Path, config: &str) -> std::process::Child {
    std::fs::write(path, config).unwrap();
    let log = std::fs::File::create(path.with_extension("log")).unwrap();
    // SERVER_WRAP runs the server under a profiler, e.g. `heaptrack -o /tmp/mc`.
    let wrap = std::env::var("SERVER_WRAP").unwrap_or_default();
    let mut wrap = wrap.split_whitespace();
    let mut cmd = match wrap.next() {
        Some(tool) => {
            let mut c = std::process::Command::new(tool);
            c.args(wrap).arg(bin);
            c
        }
        None => std::process::Command::new(bin),
    };
    cmd.args(["run", "--config"])
        .arg(path)
        .env(
            "RUST_LOG",
            std::env::var("SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(std::env::var("SERVER_MALLOC_ARENA_MAX").map(|v| ("MALLOC_ARENA_MAX", v)))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `perf record -g` of a process, written out (SIGINT) when dropped.
pub struct PerfRecord(std::process::Child);

impl PerfRecord {
    pub fn start(pid: u32, out: &Path) -> PerfRecord {
        PerfRecord(
            std::process::Command::new("perf")
                .args(["record", "-g", "-F", "999", "-p", &pid.to_string(), "-o"])
                .arg(out)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("perf"),
        )
    }
}

impl Drop for PerfRecord {
    fn drop(&mut self) {
        // SIGINT makes perf write its file and exit.
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}
