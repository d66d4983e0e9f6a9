//! Shared helpers for the process-level tests: start meshcast nodes with generated configs,
//! publish with the real `ffmpeg`, read with the real `ffprobe`, query the HTTP API.
//! Every child process is killed (by its own PID) when its handle drops.

#![allow(dead_code)]

pub mod bounded;
pub mod browser;
pub mod cdp;
pub mod egress_api;
pub mod flv_watch;
pub mod http;
pub mod impair;
pub mod nginx;
pub mod ports;
pub mod rooms;

#[allow(unused_imports)]
pub use http::{http_get, http_request};

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The node binary under test: `MESHCAST_BIN` when set (a private copy, so that builds of
/// other worktrees sharing the target directory cannot swap it mid-run), else cargo's.
pub static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("MESHCAST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meshcast").to_string())
});

/// The `backbone.token` of every test node (a real cluster's is a random secret of 16 bytes
/// or more; on loopback a node takes any non-empty one).
pub const TEST_TOKEN: &str = "meshcast-test-cluster-token";

pub use ports::free_port;

/// An address for the next node: a loopback IP of its own (127.10.x.y; Linux routes all of
/// 127/8 to `lo`) and a port free on it. Each node of a multi-node test is then a distinct
/// host, as it would be between regions, while tests stay on loopback.
pub fn node_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % (254 * 254);
    let ip = std::net::Ipv4Addr::new(127, 10, (n / 254) as u8, (n % 254 + 1) as u8);
    SocketAddr::new(ip.into(), free_port())
}

thread_local! {
    /// The panic of this test thread, if it has panicked.
    static FAILURE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keeps each test thread's panic message, so the node logs dumped while unwinding can end
/// with it (the default hook prints it before them).
fn remember_failures() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            FAILURE.with(|f| *f.borrow_mut() = Some(info.to_string()));
            default(info);
        }));
    });
}

/// A fresh directory under the system's temp dir, removed with its contents when the
/// guard is dropped (a test leaves nothing behind, even when it fails).
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "meshcast-test-{name}-{}-{}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

pub struct TempDir(PathBuf);

impl TempDir {
    /// The path, no longer removed on drop: for an owner that removes it itself.
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// A meshcast process.
pub struct NodeProc {
    pub name: String,
    pub child: Child,
    pub rtmp: SocketAddr,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub webrtc: SocketAddr,
    pub dir: PathBuf,
    /// Sent as a bearer token on API calls (nodes with `[auth]`).
    pub admin_token: Option<String>,
}

pub struct NodeSpec {
    pub role: &'static str,
    pub id: String,
    pub region: String,
    /// Origins: other origins' QUIC addresses. Edges: upstream origins.
    pub upstreams: Vec<SocketAddr>,
    pub extra: String,
    /// Appended to the `[node]` section.
    pub node_extra: String,
    /// Added to the `[webrtc]` section, whose default is to listen on a free loopback port;
    /// with a `listen` key of their own they replace it.
    pub webrtc_extra: String,
    /// Appended to the `[rtmp]` and `[http]` sections.
    pub rtmp_extra: String,
    pub http_extra: String,
}

impl NodeSpec {
    pub fn standalone() -> Self {
        NodeSpec {
            role: "standalone",
            id: "standalone".into(),
            region: "local".into(),
            upstreams: vec![],
            extra: String::new(),
            node_extra: String::new(),
            webrtc_extra: String::new(),
            rtmp_extra: String::new(),
            http_extra: String::new(),
        }
    }
    pub fn origin(id: &str) -> Self {
        NodeSpec {
            role: "origin",
            id: id.into(),
            region: "r".into(),
            ..Self::standalone()
        }
    }
    pub fn edge(id: &str, origins: Vec<SocketAddr>) -> Self {
        NodeSpec {
            role: "edge",
            id: id.into(),
            region: "r".into(),
            upstreams: origins,
            ..Self::standalone()
        }
    }
}

/// Runs `meshcast run --config path`, logging to `dir/node.log`.
pub fn spawn_node(path: &Path, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let mut cmd = Command::new(&*BIN);
    // A config with a [log] section says its own level; others log meshcast's debug lines.
    let own_level = std::fs::read_to_string(path).is_ok_and(|c| c.contains("\n[log]"));
    if !own_level {
        cmd.env("RUST_LOG", "info,meshcast=debug");
    }
    cmd.args(["run", "--config"])
        .arg(path)
        // What a config leaves relative to the working directory (the recording root by
        // default, with the egress state file) stays in the node's own directory.
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start meshcast")
}

impl NodeProc {
    /// Starts a node on a loopback address of its own ([`node_addr`]; the QUIC port is
    /// reserved even for edges, unused).
    pub fn start(spec: NodeSpec) -> NodeProc {
        Self::start_at(spec, node_addr())
    }

    /// Starts a node whose QUIC address is `quic` (from [`node_addr`]); its other sockets
    /// listen on the same IP.
    pub fn start_at(spec: NodeSpec, quic: SocketAddr) -> NodeProc {
        remember_failures();
        // The node is a host of its own: every socket it listens on is on its QUIC address.
        let ip = quic.ip();
        let rtmp = SocketAddr::new(ip, free_port());
        let http = SocketAddr::new(ip, free_port());
        let webrtc = SocketAddr::new(ip, free_port());
        let dir = temp_dir(&spec.id).keep();
        let list = |v: &Vec<SocketAddr>| {
            v.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let backbone = match spec.role {
            // An edge's connections to its origins leave from its own address too.
            "edge" => format!(
                "origins = [{}]\nbind = \"{}\"\nidle_grace_ms = 1000\n",
                list(&spec.upstreams),
                quic.ip()
            ),
            _ => format!("listen = \"{quic}\"\npeers = [{}]\n", list(&spec.upstreams)),
        };
        // Extra keys replace the section when they set the listen address themselves.
        let webrtc_section = if spec.webrtc_extra.contains("listen") {
            spec.webrtc_extra.clone()
        } else {
            format!("listen = \"{webrtc}\"\n{}", spec.webrtc_extra)
        };
        let config = format!(
            "[node]\nid = \"{}\"\nregion = \"{}\"\nrole = \"{}\"\n{}\n\n[rtmp]\nlisten = \"{rtmp}\"\n{}\n\n[http]\nlisten = \"{http}\"\n{}\n\n[webrtc]\n{webrtc_section}\n\n[backbone]\ntoken = \"{TEST_TOKEN}\"\n{backbone}\n{}\n",
            spec.id, spec.region, spec.role, spec.node_extra, spec.rtmp_extra, spec.http_extra, spec.extra
        );
        let path = dir.join("node.toml");
        std::fs::write(&path, config).unwrap();
        let child = spawn_node(&path, &dir);
        let node = NodeProc {
            name: spec.id,
            child,
            rtmp,
            http,
            quic,
            webrtc,
            dir,
            admin_token: None,
        };
        wait_until(Duration::from_secs(10), "node HTTP up", || {
            http_get(node.http, "/healthz")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        });
        node
    }

    pub fn rtmp_url(&self, stream: &str) -> String {
        format!("rtmp://{}/live/{stream}", self.rtmp)
    }

    pub fn flv_url(&self, stream: &str) -> String {
        format!("http://{}/live/{stream}.flv", self.http)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    pub fn streams(&self) -> Vec<Value> {
        let (_, body) =
            http::http_get_bearer(self.http, "/api/v1/streams", self.admin_token.as_deref())
                .expect("streams API");
        let v: Value = serde_json::from_str(&body).expect("streams JSON");
        v["streams"].as_array().cloned().unwrap_or_default()
    }

    pub fn stream(&self, name: &str) -> Option<Value> {
        self.streams()
            .into_iter()
            .find(|s| s["stream"] == format!("live/{name}"))
    }

    pub fn links(&self) -> Vec<Value> {
        let (_, body) =
            http::http_get_bearer(self.http, "/api/v1/links", self.admin_token.as_deref())
                .expect("links API");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["links"].as_array().cloned().unwrap_or_default()
    }

    /// Value of a Prometheus sample, e.g. `meshcast_slow_disconnects_total{proto="rtmp"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = http_get(self.http, "/metrics").expect("metrics");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .map(|v| v.trim().parse().unwrap_or(0.0))
            })
            .unwrap_or(0.0)
    }

    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn wait_for_link_count(&self, n: usize) {
        wait_until(Duration::from_secs(10), "backbone links up", || {
            self.links().len() >= n
        });
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log());
            // CI shows the tail of a failure's output: repeat the failure after each log.
            if let Some(failure) = FAILURE.with(|f| f.borrow().clone()) {
                eprintln!("---- the failure, again: {failure}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Origins A and B meshed with each other and an edge of B (A → B → edge), links up.
pub fn start_two_origins_and_edge() -> (NodeProc, NodeProc, NodeProc) {
    let a_quic = node_addr();
    let b_quic = node_addr();
    let mut spec_a = NodeSpec::origin("origin-a");
    spec_a.upstreams = vec![b_quic];
    let mut spec_b = NodeSpec::origin("origin-b");
    spec_b.upstreams = vec![a_quic];
    let a = NodeProc::start_at(spec_a, a_quic);
    let b = NodeProc::start_at(spec_b, b_quic);
    let edge = NodeProc::start(NodeSpec::edge("edge-b1", vec![b_quic]));
    // Each origin dials the other (one outbound, one inbound link); B also has the edge.
    a.wait_for_link_count(2);
    b.wait_for_link_count(3);
    edge.wait_for_link_count(1);
    (a, b, edge)
}

/// An `ffmpeg` publishing a synthetic 640x360 H.264 + AAC stream in real time.
pub struct Publisher {
    pub child: Child,
}

pub struct PublishOpts {
    pub seconds: u32,
    pub gop: u32,
    pub bframes: u32,
    /// x264's preset (`ultrafast` by default: no CABAC, no 8x8 transform, so a Main profile
    /// stream at most) and profile (`-profile:v`, when set).
    pub preset: &'static str,
    pub profile: Option<&'static str>,
    /// Instead of the test pattern: black 320x240 video with one white frame at the start of
    /// every second and silence with a 1 kHz beep starting at the same instant, so A/V sync
    /// can be measured on the decoded output ([`av_offsets`]).
    pub sync_marks: bool,
}

impl Default for PublishOpts {
    fn default() -> Self {
        PublishOpts {
            seconds: 30,
            gop: 30,
            bframes: 2,
            preset: "ultrafast",
            profile: None,
            sync_marks: false,
        }
    }
}

/// lavfi sources for [`PublishOpts::sync_marks`].
const FLASH_VIDEO: &str =
    "color=c=black:s=320x240:r=30,drawbox=color=white:t=fill:enable='lt(mod(t,1),0.02)'";
const BEEP_AUDIO: &str = "aevalsrc=exprs='if(lt(mod(t,1),0.1),0.5*sin(2*PI*1000*t),0)':s=44100";

impl Publisher {
    pub fn start(url: &str, opts: PublishOpts) -> Publisher {
        let (video, audio) = if opts.sync_marks {
            (FLASH_VIDEO, BEEP_AUDIO)
        } else {
            (
                "testsrc2=size=640x360:rate=30",
                "sine=frequency=440:sample_rate=44100",
            )
        };
        let child = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-re"])
            .args(["-f", "lavfi", "-i", video])
            .args(["-f", "lavfi", "-i", audio])
            .args(["-t", &opts.seconds.to_string()])
            .args(["-c:v", "libx264", "-preset", opts.preset])
            .args(["-tune", "zerolatency"])
            .args(
                opts.profile
                    .map(|p| ["-profile:v", p])
                    .into_iter()
                    .flatten(),
            )
            .args([
                "-g",
                &opts.gop.to_string(),
                "-bf",
                &opts.bframes.to_string(),
            ])
            .args(["-c:a", "aac", "-b:a", "64k", "-f", "flv", url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ffmpeg is installed");
        Publisher { child }
    }

    /// Waits for ffmpeg to exit; returns (success, stderr).
    pub fn wait(mut self, timeout: Duration) -> (bool, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status.success(), err);
            }
            if start.elapsed() > timeout {
                panic!("ffmpeg did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a publisher and waits until `node` lists the stream with both tracks configured.
pub fn publish_and_wait(url: &str, node: &NodeProc, name: &str, opts: PublishOpts) -> Publisher {
    let p = Publisher::start(url, opts);
    wait_until(
        Duration::from_secs(15),
        "stream live with both tracks",
        || {
            node.stream(name)
                .map(|s| !s["video"].is_null() && !s["audio"].is_null())
                .unwrap_or(false)
        },
    );
    p
}

/// What ffprobe read from a URL.
#[derive(Debug)]
pub struct Probe {
    pub streams: Vec<Value>,
    pub packets: Vec<Value>,
}

impl Probe {
    pub fn stream_of(&self, codec_type: &str) -> Option<&Value> {
        self.streams.iter().find(|s| s["codec_type"] == codec_type)
    }

    pub fn packets_of(&self, codec_type: &str) -> Vec<&Value> {
        let Some(idx) = self.stream_of(codec_type).map(|s| s["index"].clone()) else {
            return vec![];
        };
        self.packets
            .iter()
            .filter(|p| p["stream_index"] == idx)
            .collect()
    }

    /// Asserts dts strictly increases per stream and pts >= dts.
    pub fn assert_timestamps_sane(&self) {
        for s in &self.streams {
            let idx = &s["index"];
            let mut last: Option<i64> = None;
            for p in self.packets.iter().filter(|p| &p["stream_index"] == idx) {
                let dts = p["dts"].as_i64().expect("packet has dts");
                let pts = p["pts"].as_i64().expect("packet has pts");
                assert!(pts >= dts, "pts {pts} < dts {dts} in stream {idx}");
                if let Some(l) = last {
                    assert!(
                        dts > l,
                        "dts not increasing in stream {idx}: {l} then {dts}"
                    );
                }
                last = Some(dts);
            }
        }
    }
}

/// Reads `seconds` of stream time from `url` with ffprobe.
pub fn ffprobe(url: &str, seconds: u32) -> Probe {
    let out = bounded::output_within(
        Command::new("ffprobe")
            .args(["-v", "error", "-rw_timeout", "15000000"])
            .args([
                "-show_entries",
                "stream=index,codec_name,codec_type,width,height,sample_rate,channels",
            ])
            .args(["-show_entries", "packet=stream_index,pts,dts,flags"])
            .args(["-read_intervals", &format!("%+{seconds}")])
            .args(["-of", "json", url])
            .stdin(Stdio::null()),
        Duration::from_secs(seconds as u64 + 60),
    );
    assert!(
        out.status.success(),
        "ffprobe {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("ffprobe JSON");
    Probe {
        streams: v["streams"].as_array().cloned().unwrap_or_default(),
        packets: v["packets"].as_array().cloned().unwrap_or_default(),
    }
}

/// Checks a probe of the synthetic stream: codecs, size, frame count, timestamps.
pub fn assert_synthetic_stream(p: &Probe, seconds: u32) {
    let v = p.stream_of("video").expect("video stream");
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(v["width"], 640);
    assert_eq!(v["height"], 360);
    let a = p.stream_of("audio").expect("audio stream");
    assert_eq!(a["codec_name"], "aac");
    assert_eq!(a["sample_rate"], "44100");
    assert_eq!(p.streams.len(), 2, "exactly two streams: {:?}", p.streams);
    let frames = p.packets_of("video").len() as i64;
    let expected = 30 * seconds as i64;
    assert!(
        (frames - expected).abs() <= expected / 5 + 2,
        "{frames} video frames in {seconds}s, expected about {expected}"
    );
    let first = p.packets_of("video")[0];
    assert!(
        first["flags"].as_str().unwrap_or("").starts_with('K'),
        "first video packet is a keyframe: {first}"
    );
    assert!(p.packets_of("audio").len() as i64 >= 40 * seconds as i64 * 8 / 10);
    p.assert_timestamps_sane();
}

pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// For each flash in the [`PublishOpts::sync_marks`] stream at `input` (a URL or file), read
/// for `seconds`: when its beep starts minus when the flash is shown, in seconds, from the
/// decoded pictures and samples (FFmpeg's `blackframe` on the negated video and
/// `silencedetect`). Equal offsets in input and output mean A/V sync was kept.
pub fn av_offsets(input: &str, seconds: u32) -> Vec<f64> {
    let out = bounded::output_within(
        Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-nostats",
                "-rw_timeout",
                "15000000",
                "-i",
                input,
            ])
            .args(["-t", &seconds.to_string()])
            .args(["-vf", "negate,blackframe=amount=90:threshold=64"])
            .args(["-af", "silencedetect=noise=-30dB:duration=0.3"])
            .args(["-f", "null", "-"])
            .stdin(Stdio::null()),
        Duration::from_secs(seconds as u64 + 60),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    let field = |line: &str, key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let flashes: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("Parsed_blackframe"))
        .filter_map(|l| field(l, " t:"))
        .collect();
    let beeps: Vec<f64> = log
        .lines()
        .filter_map(|l| field(l, "silence_end: "))
        .collect();
    flashes
        .iter()
        .filter_map(|f| {
            beeps
                .iter()
                .map(|b| b - f)
                .filter(|d| d.abs() < 0.4)
                .min_by(|a, b| a.abs().total_cmp(&b.abs()))
        })
        .collect()
}

/// Serialises the tests of one test binary that load the 2-core machine (browsers, hundreds
/// of viewers, nodes killed while freezes are measured): their timing-based outcomes suffer
/// when two run at once. Hold the guard for the whole test; a test that panicked while
/// holding it does not block the others.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// ffprobe that may fail: (success, stderr, packets read).
pub fn try_probe(url: &str, seconds: u32) -> (bool, String, usize) {
    let out = bounded::output_within(
        Command::new("ffprobe")
            .args(["-v", "error", "-rw_timeout", "10000000"])
            .args(["-show_entries", "packet=stream_index"])
            .args(["-read_intervals", &format!("%+{seconds}")])
            .args(["-of", "json", url])
            .stdin(Stdio::null()),
        Duration::from_secs(seconds as u64 + 40),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let packets = v["packets"].as_array().map_or(0, |p| p.len());
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        packets,
    )
}

/// Every file under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A 3-second ffmpeg publish to `url`, waited for: (succeeded, what ffmpeg printed).
pub fn short_publish(url: &str) -> (bool, String) {
    Publisher::start(
        url,
        PublishOpts {
            seconds: 3,
            ..Default::default()
        },
    )
    .wait(Duration::from_secs(30))
}

/// A token's claims: `act` on `streams`, an hour long, nothing else.
pub fn claims(act: meshcast::auth::Action, streams: &[&str]) -> meshcast::auth::Claims {
    meshcast::auth::Claims {
        act: meshcast::auth::token::OneOrMany::One(act),
        streams: streams.iter().map(|s| s.to_string()).collect(),
        exp: meshcast::auth::token::now_s() + 3600,
        nbf: None,
        iat: None,
        sub: None,
        room: None,
        name: None,
        ns: None,
    }
}

/// `claims` signed with the HS256 `secret`.
pub fn sign(secret: &str, claims: &meshcast::auth::Claims) -> String {
    meshcast::auth::Keys::new(&[secret.to_string()], &[] as &[&str])
        .unwrap()
        .mint(claims)
        .unwrap()
}
