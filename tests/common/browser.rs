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

/// A page that plays `whep_url` and posts what `getStats()` saw after `seconds`. With
/// `tcp_only` it drops the answer's UDP candidates, as if UDP to the server were blocked.
pub fn whep_player_page(whep_url: &str, seconds: u32, tcp_only: bool) -> String {
    format!(
        r#"<!doctype html><html><body><video id="v" autoplay muted playsinline></video><script>
async function report(obj) {{
  await fetch('/result', {{method: 'POST', body: JSON.stringify(obj)}});
}}
(async () => {{
  try {{
    const pc = new RTCPeerConnection();
    pc.addTransceiver('video', {{direction: 'recvonly'}});
    pc.addTransceiver('audio', {{direction: 'recvonly'}});
    pc.ontrack = e => {{ document.getElementById('v').srcObject = e.streams[0] || new MediaStream([e.track]); }};
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const resp = await fetch('{whep_url}', {{method: 'POST', headers: {{'Content-Type': 'application/sdp'}}, body: offer.sdp}});
    if (resp.status !== 201) {{ await report({{error: 'status ' + resp.status + ' ' + await resp.text()}}); return; }}
    const location = resp.headers.get('Location');
    let answer = await resp.text();
    if ({tcp_only}) answer = answer.split('\r\n').filter(l => !/^a=candidate:.* udp /i.test(l)).join('\r\n');
    await pc.setRemoteDescription({{type: 'answer', sdp: answer}});
    const t0 = performance.now();
    let first = null, mark = null, decoded = 0;
    while (performance.now() - t0 < {seconds} * 1000) {{
      await new Promise(r => setTimeout(r, 100));
      const stats = await pc.getStats();
      stats.forEach(s => {{
        if (s.type === 'inbound-rtp' && s.kind === 'video') decoded = s.framesDecoded || 0;
      }});
      const now = performance.now() - t0;
      if (decoded > 0 && first === null) first = now;
      // The steady decode rate is counted from 1 s after the first frame.
      if (first !== null && mark === null && now - first >= 1000) mark = {{at: now, decoded}};
    }}
    const out = {{location, firstFrameMs: first, iceState: pc.iceConnectionState}};
    if (mark) out.steadyFps = (decoded - mark.decoded) * 1000 / (performance.now() - t0 - mark.at);
    const final = await pc.getStats();
    final.forEach(s => {{
      if (s.type === 'transport' && s.selectedCandidatePairId) {{
        const pair = final.get(s.selectedCandidatePairId);
        const remote = pair && final.get(pair.remoteCandidateId);
        out.remoteProtocol = remote && remote.protocol;
      }}
    }});
    final.forEach(s => {{
      if (s.type === 'inbound-rtp' && s.kind === 'video') {{
        out.framesDecoded = s.framesDecoded; out.width = s.frameWidth; out.height = s.frameHeight;
        out.packetsLost = s.packetsLost; out.keyFramesDecoded = s.keyFramesDecoded;
        out.framesReceived = s.framesReceived; out.framesDropped = s.framesDropped;
        out.pliCount = s.pliCount; out.nackCount = s.nackCount; out.videoPackets = s.packetsReceived;
        const codec = s.codecId && final.get(s.codecId);
        out.videoCodec = codec && codec.mimeType; out.videoFmtp = codec && codec.sdpFmtpLine;
      }}
      if (s.type === 'inbound-rtp' && s.kind === 'audio') {{
        out.audioPackets = s.packetsReceived; out.audioSamples = s.totalSamplesReceived;
      }}
    }});
    const del = await fetch('{whep_url}'.replace(/\/whep\/.*/, '') + location, {{method: 'DELETE'}});
    out.deleteStatus = del.status;
    await report(out);
  }} catch (e) {{ await report({{error: String(e)}}); }}
}})();
</script></body></html>"#
    )
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
    let whep = format!("http://{}/whep/live/{stream}", node.http);
    let (port, results) = serve_page(whep_player_page(&whep, seconds, tcp_only));
    let browser = Browser::open(&format!("http://127.0.0.1:{port}/"));
    let result = results
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the {who} page reported nothing; node log:\n{}", node.log()));
    let v: serde_json::Value = serde_json::from_str(&result).unwrap();
    eprintln!("{who} reported: {v}");
    (browser, v)
}
