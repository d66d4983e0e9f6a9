//! Headless Chromium (Debian `chromium`, fake camera and microphone) as a WebRTC peer: a
//! page served from the test, its `getStats()` posted back.
//!
//! Chromium only uses loopback for WebRTC when loopback is the only interface, so each test
//! re-runs itself inside a fresh network namespace (`unshare -n`) where the node, ffmpeg,
//! the page server and the browser all live on 127.0.0.1 ([`in_private_network`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{one_at_a_time, temp_dir, NodeProc};

/// True inside the namespace (run the test body); false outside, after running the test in
/// a namespace and checking it passed.
pub fn in_private_network(test: &str) -> bool {
    if std::env::var_os("MESHCAST_TEST_NETNS").is_some() {
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success(), "bring loopback up in the namespace");
        return true;
    }
    let _alone = one_at_a_time();
    let exe = std::env::current_exe().unwrap();
    // Bounded: a hang inside must fail this test, not hold the lock the others queue on.
    let status = super::bounded::status_within(
        Command::new("unshare")
            .args(["-n", "--"])
            .arg(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("MESHCAST_TEST_NETNS", "1"),
        Duration::from_secs(600),
    );
    assert!(
        status.success(),
        "{test} failed inside its network namespace"
    );
    false
}

/// Serves `page` at `/` and returns the body of the first `POST /result`.
pub fn serve_page(page: String) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            // A connection that never sends its request must not block the next one.
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (status, content) = if request_line.starts_with("POST /result") {
                let _ = tx.send(String::from_utf8_lossy(&body).to_string());
                ("200 OK", String::from("ok"))
            } else {
                ("200 OK", page.clone())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{content}",
                content.len()
            );
        }
    });
    (port, rx)
}

/// Headless Chromium with fake devices and loopback WebRTC, killed on drop.
pub struct Browser {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Browser {
    pub fn open(url: &str) -> Browser {
        let dir = temp_dir("chromium").keep();
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed");
        Browser { child, dir }
    }
}

impl Browser {
    /// Its profile directory (where `DevToolsActivePort` is).
    pub fn profile(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A page of `examples/` (what users copy), as the test serves it.
pub fn example_page(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `k=v&...`, each value percent-encoded.
pub fn page_query(params: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        q.append_pair(k, v);
    }
    q.finish()
}

/// Chromium playing `node`'s `live/{stream}` over WHEP for `seconds`; returns the browser
/// and what `getStats()` saw (logged as `{who} reported: ...`).
pub fn whep_in_chromium(
    node: &NodeProc,
    stream: &str,
    seconds: u32,
    who: &str,
) -> (Browser, serde_json::Value) {
    whep_in_chromium_with(node, stream, seconds, who, false)
}

pub fn whep_in_chromium_with(
    node: &NodeProc,
    stream: &str,
    seconds: u32,
    who: &str,
    tcp_only: bool,
) -> (Browser, serde_json::Value) {
    // The page users copy: examples/whep-player.html, given its parameters.
    let whep = format!("http://{}/whep/live/{stream}", node.http);
    let (port, results) = serve_page(example_page("whep-player.html"));
    let seconds = seconds.to_string();
    let query = page_query(&[
        ("url", whep.as_str()),
        ("seconds", seconds.as_str()),
        ("transport", if tcp_only { "tcp" } else { "any" }),
        ("report", "/result"),
    ]);
    let browser = Browser::open(&format!("http://127.0.0.1:{port}/?{query}"));
    let result = results
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the {who} page reported nothing; node log:\n{}", node.log()));
    let v: serde_json::Value = serde_json::from_str(&result).unwrap();
    eprintln!("{who} reported: {v}");
    (browser, v)
}
