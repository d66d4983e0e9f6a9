//! Janus (Debian `janus`, streaming plugin + HTTP transport only) as a benchmark peer, and a
//! small async client of its HTTP API for viewers. The verified set-up and its reasons are
//! in docs/janus-benchmark-notes.md; in short, Janus never gathers ICE candidates on a
//! loopback interface, so it runs in a private network namespace where a veth end carries
//! 127.0.0.2 ([`JANUS_IP`]), and its viewers must use that address too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// The address Janus gathers its candidate on and its viewers bind.
pub const JANUS_IP: [u8; 4] = [127, 0, 0, 2];
/// The streaming plugin's RTP inputs (janus.plugin.streaming.jcfg).
pub const VIDEO_PORT: u16 = 5004;
pub const AUDIO_PORT: u16 = 5002;
/// The mountpoint's id.
pub const MOUNTPOINT: u64 = 1;
const HTTP_PORT: u16 = 8088;

/// Inside a fresh network namespace: loopback up, and a veth pair whose end `mcj0` carries
/// [`JANUS_IP`] (not flagged loopback, so Janus gathers it; traffic to it stays local).
pub fn set_up_namespace() {
    let ip = |args: &str| {
        let ok = Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {args}");
    };
    ip("link set lo up");
    ip("link add mcj0 type veth peer name mcj1");
    ip("addr add 127.0.0.2/32 dev mcj0");
    ip("link set mcj1 up");
    ip("link set mcj0 up");
}

/// A running Janus; killed (by its PID) when dropped.
pub struct Janus {
    child: Child,
    pub http: SocketAddr,
}

impl Janus {
    /// Starts Janus with the templates in `benches/janus/`, `event_loops` GLib loops (0:
    /// a thread per handle, Janus's default), in `work`.
    pub fn start(work: &Path, event_loops: usize) -> Janus {
        let dir = work.join("janus");
        let _ = std::fs::remove_dir_all(&dir);
        let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/janus");
        let libs = Path::new("/usr/lib/x86_64-linux-gnu/janus");
        for sub in ["conf", "plugins", "transports", "empty"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        for file in [
            "janus.jcfg",
            "janus.plugin.streaming.jcfg",
            "janus.transport.http.jcfg",
        ] {
            let text = std::fs::read_to_string(templates.join(file))
                .unwrap()
                .replace("@DIR@", dir.to_str().unwrap())
                .replace("@EVENT_LOOPS@", &event_loops.to_string());
            std::fs::write(dir.join("conf").join(file), text).unwrap();
        }
        for (sub, lib) in [
            ("plugins", "plugins/libjanus_streaming.so"),
            ("transports", "transports/libjanus_http.so"),
        ] {
            let name = Path::new(lib).file_name().unwrap();
            std::os::unix::fs::symlink(libs.join(lib), dir.join(sub).join(name)).unwrap();
        }
        let conf: PathBuf = dir.join("conf");
        let child = Command::new("janus")
            .arg("-F")
            .arg(&conf)
            .arg("-C")
            .arg(conf.join("janus.jcfg"))
            .args(["-o", "-N", "-L"])
            .arg(dir.join("janus.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("janus (Debian package `janus`)");
        let janus = Janus {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], HTTP_PORT)),
        };
        let start = Instant::now();
        while !super::http::http_get(janus.http, "/janus/info").is_ok_and(|r| r.0 == 200) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "janus did not start; see {}",
                dir.join("janus.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        janus
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Janus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One Janus API session shared by many viewers (one handle each). A long-poll task
/// dispatches each handle's offer and keeps the session alive.
pub struct Session {
    http: SocketAddr,
    id: u64,
    offers: Arc<Mutex<HashMap<u64, oneshot::Sender<String>>>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Session {
    pub async fn create(http: SocketAddr) -> Session {
        let r = request(http, "/janus", json!({"janus": "create"})).await;
        let id = r["data"]["id"].as_u64().expect("session id");
        let offers: Arc<Mutex<HashMap<u64, oneshot::Sender<String>>>> = Arc::default();
        let poller = tokio::spawn(poll(http, id, offers.clone()));
        Session {
            http,
            id,
            offers,
            poller,
        }
    }

    /// Attaches a handle, asks to watch the mountpoint and waits for Janus's offer.
    pub async fn watch(&self) -> Option<(u64, String)> {
        let path = format!("/janus/{}", self.id);
        let attach = json!({"janus": "attach", "plugin": "janus.plugin.streaming"});
        let handle = request(self.http, &path, attach).await["data"]["id"].as_u64()?;
        let (tx, rx) = oneshot::channel();
        self.offers.lock().unwrap().insert(handle, tx);
        let watch = json!({"janus": "message", "body": {"request": "watch", "id": MOUNTPOINT}});
        request(self.http, &format!("{path}/{handle}"), watch).await;
        let offer = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .ok()?
            .ok()?;
        Some((handle, offer))
    }

    /// Hands Janus the viewer's answer.
    pub async fn start(&self, handle: u64, answer: &str) {
        let start = json!({
            "janus": "message",
            "body": {"request": "start"},
            "jsep": {"type": "answer", "sdp": answer},
        });
        request(self.http, &format!("/janus/{}/{handle}", self.id), start).await;
    }

    pub async fn destroy(self) {
        self.poller.abort();
        request(
            self.http,
            &format!("/janus/{}", self.id),
            json!({"janus": "destroy"}),
        )
        .await;
    }
}

/// Long-polls the session's events; sends each handle's offer to its waiter.
async fn poll(
    http: SocketAddr,
    id: u64,
    offers: Arc<Mutex<HashMap<u64, oneshot::Sender<String>>>>,
) {
    loop {
        let events = get(http, &format!("/janus/{id}?maxev=100")).await;
        for ev in events.as_array().into_iter().flatten() {
            let (Some(sender), Some(sdp)) = (ev["sender"].as_u64(), ev["jsep"]["sdp"].as_str())
            else {
                continue;
            };
            if let Some(tx) = offers.lock().unwrap().remove(&sender) {
                let _ = tx.send(sdp.to_string());
            }
        }
    }
}

/// The address Janus's viewers bind.
pub fn viewer_ip() -> IpAddr {
    IpAddr::from(JANUS_IP)
}

async fn request(http: SocketAddr, path: &str, mut body: Value) -> Value {
    body["transaction"] = json!(format!("{:x}", rand::random::<u64>()));
    exchange(http, "POST", path, &body.to_string()).await
}

async fn get(http: SocketAddr, path: &str) -> Value {
    exchange(http, "GET", path, "").await
}

/// One HTTP/1.0 exchange (Janus's server chunks HTTP/1.1 replies); the JSON body, or null.
async fn exchange(http: SocketAddr, method: &str, path: &str, body: &str) -> Value {
    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
        return Value::Null;
    };
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut resp = Vec::new();
    if s.write_all(req.as_bytes()).await.is_err() || s.read_to_end(&mut resp).await.is_err() {
        return Value::Null;
    }
    let text = String::from_utf8_lossy(&resp);
    text.split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null)
}
