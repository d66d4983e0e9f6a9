//! Lockdown: tokens, the auth webhook, the admin API, the egress destination policy,
//! slow and silent clients, and hostile RTMP input, all against real nodes and real clients
//! (ffmpeg, ffprobe).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::egress_api::{egress_status, start_egress};
use common::http::{http_get_bearer, http_raw};
use common::*;
use meshcast::auth::token::now_s;
use meshcast::auth::{Action, Claims};

const SECRET: &str = "lockdown-test-secret-0123456789";

fn mint(secret: &str, act: Action, streams: &[&str], exp_in: i64, nbf_in: Option<i64>) -> String {
    let now = now_s() as i64;
    sign(
        secret,
        &Claims {
            exp: (now + exp_in) as u64,
            nbf: nbf_in.map(|n| (now + n) as u64),
            iat: Some(now as u64),
            ..claims(act, streams)
        },
    )
}

fn token(act: Action, streams: &[&str]) -> String {
    mint(SECRET, act, streams, 3600, None)
}

/// A bad token of the matrix: its label, the token (none: no token), what the refusal says.
type BadToken = (&'static str, Option<String>, &'static str);

/// The bad tokens of the auth matrix for `action` on `stream`, each with what the refusal
/// must say, then the valid one.
fn matrix(action: Action, stream: &str) -> (Vec<BadToken>, String) {
    let wrong_action = if action == Action::Play {
        Action::Publish
    } else {
        Action::Play
    };
    let bad = vec![
        ("none", None, "token is required"),
        (
            "expired",
            Some(mint(SECRET, action, &[stream], -3600, None)),
            "expired",
        ),
        (
            "not yet valid",
            Some(mint(SECRET, action, &[stream], 7200, Some(3600))),
            "not valid yet",
        ),
        (
            "forged",
            Some(mint(
                "somebody-elses-secret-000",
                action,
                &[stream],
                3600,
                None,
            )),
            "signature",
        ),
        (
            "wrong action",
            Some(token(wrong_action, &[stream])),
            "does not allow",
        ),
        (
            "wrong stream",
            Some(token(action, &["other/*"])),
            "does not cover",
        ),
    ];
    (bad, token(action, &[stream]))
}

fn with_token(url: &str, t: &Option<String>) -> String {
    match t {
        Some(t) => format!("{url}?token={t}"),
        None => url.to_string(),
    }
}

fn auth_node(extra: &str) -> NodeProc {
    let mut node = NodeProc::start(NodeSpec {
        extra: format!("\n[auth]\nsecrets = [\"{SECRET}\"]\n{extra}"),
        ..NodeSpec::standalone()
    });
    node.admin_token = Some(token(Action::Admin, &[]));
    node
}

/// The status line of an HTTP response, reading only its head (the body may never end).
fn head_status(addr: SocketAddr, path: &str, extra_headers: &str) -> u16 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra_headers}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn auth_matrix_over_rtmp_flv_webrtc_signalling_and_the_admin_api() {
    let node = auth_node("");
    let mut all_tokens = Vec::new();

    // RTMP publish (ffmpeg): every bad token is refused with its reason.
    let (bad, valid) = matrix(Action::Publish, "live/cam");
    for (label, t, why) in &bad {
        let url = with_token(&node.rtmp_url("cam"), t);
        let (ok, err) = short_publish(&url);
        assert!(!ok, "publish with a {label} token was accepted");
        assert!(err.contains(why), "publish, {label}: ffmpeg said {err}");
        all_tokens.extend(t.clone());
    }
    assert!(node.stream("cam").is_none());
    let _publisher = publish_and_wait(
        &with_token(&node.rtmp_url("cam"), &Some(valid.clone())),
        &node,
        "cam",
        PublishOpts::default(),
    );
    all_tokens.push(valid);
    // The name never carries the query.
    assert!(node.streams().iter().all(|s| s["stream"] == "live/cam"));

    // RTMP play (ffprobe).
    let (bad, valid) = matrix(Action::Play, "live/cam");
    for (label, t, _) in &bad {
        let (ok, err, packets) = try_probe(&with_token(&node.rtmp_url("cam"), t), 2);
        assert!(
            !ok || packets == 0,
            "RTMP play with a {label} token: {packets} packets, {err}"
        );
        all_tokens.extend(t.clone());
    }
    let (ok, err, packets) = try_probe(&with_token(&node.rtmp_url("cam"), &Some(valid.clone())), 2);
    assert!(
        ok && packets > 30,
        "RTMP play with a valid token: {packets} packets, {err}"
    );

    // HTTP-FLV: 401/403 with a JSON reason; the valid token by query (ffprobe) and header.
    for (label, t, why) in &bad {
        let path = with_token("/live/cam.flv", t);
        let (status, _, body) = http_raw(node.http, "GET", &path, "", "").unwrap();
        assert!(status == 401 || status == 403, "FLV, {label}: {status}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON reason");
        assert!(
            v["error"].as_str().unwrap().contains(why),
            "FLV, {label}: {body}"
        );
        assert_eq!(body.trim().lines().count(), 1);
    }
    let (ok, err, packets) = try_probe(&with_token(&node.flv_url("cam"), &Some(valid.clone())), 2);
    assert!(
        ok && packets > 30,
        "FLV with a valid token: {packets} packets, {err}"
    );
    assert_eq!(
        head_status(
            node.http,
            "/live/cam.flv",
            &format!("Authorization: Bearer {valid}\r\n")
        ),
        200
    );

    // WHIP and WHEP: the token is checked before the offer is looked at (a valid token
    // gets as far as the offer's own check: 400 for this one).
    for (kind, action) in [("whip", Action::Publish), ("whep", Action::Play)] {
        let (bad, valid) = matrix(action, "live/cam");
        let sdp = "v=0\r\n";
        let ct = "Content-Type: application/sdp\r\n";
        for (label, t, why) in &bad {
            let path = with_token(&format!("/{kind}/live/cam"), t);
            let (status, _, body) = http_raw(node.http, "POST", &path, ct, sdp).unwrap();
            assert!(
                status == 401 || status == 403,
                "{kind}, {label}: {status} {body}"
            );
            assert!(body.contains(why), "{kind}, {label}: {body}");
        }
        let bearer = format!("{ct}Authorization: Bearer {valid}\r\n");
        let (status, _, body) = http_raw(
            node.http,
            "POST",
            &format!("/{kind}/live/cam"),
            &bearer,
            sdp,
        )
        .unwrap();
        assert!(
            status != 401 && status != 403,
            "{kind} with a valid token: {status} {body}"
        );
        all_tokens.extend(bad.into_iter().filter_map(|(_, t, _)| t));
        all_tokens.push(valid);
    }

    // The admin API.
    let admin_bad = [
        ("none", None, 401),
        (
            "expired",
            Some(mint(SECRET, Action::Admin, &[], -3600, None)),
            401,
        ),
        (
            "not yet valid",
            Some(mint(SECRET, Action::Admin, &[], 7200, Some(3600))),
            401,
        ),
        (
            "forged",
            Some(mint(
                "somebody-elses-secret-000",
                Action::Admin,
                &[],
                3600,
                None,
            )),
            401,
        ),
        ("wrong action", Some(token(Action::Publish, &["*"])), 403),
    ];
    for (label, t, want) in &admin_bad {
        for path in ["/api/v1/streams", "/api/v1/egress", "/api/v1/cluster"] {
            let (status, _) = http_get_bearer(node.http, path, t.as_deref()).unwrap();
            assert_eq!(status, *want, "{path} with a {label} token");
        }
        let (status, _) =
            http_get_bearer(node.http, &with_token("/api/v1/streams", t), None).unwrap();
        assert_eq!(status, *want, "streams with a {label} token in the query");
    }
    let (status, body) =
        http_get_bearer(node.http, "/api/v1/streams", node.admin_token.as_deref()).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("live/cam"));

    // Kicking the publisher ends its stream.
    let bearer = format!(
        "Authorization: Bearer {}\r\n",
        node.admin_token.as_ref().unwrap()
    );
    let (status, _, _) = http_raw(node.http, "DELETE", "/api/v1/streams/live/cam", "", "").unwrap();
    assert_eq!(status, 401);
    let (status, _, _) =
        http_raw(node.http, "DELETE", "/api/v1/streams/live/cam", &bearer, "").unwrap();
    assert_eq!(status, 204);
    wait_until(Duration::from_secs(10), "kicked stream gone", || {
        node.stream("cam").is_none()
    });

    // No token reaches the log, and refusals are counted.
    let log = node.log();
    for t in &all_tokens {
        assert!(!log.contains(t.as_str()), "a token is in the log");
    }
    assert!(node.metric("meshcast_refused_total{protocol=\"rtmp\",why=\"denied\"}") >= 6.0);
    assert!(node.metric("meshcast_refused_total{protocol=\"flv\",why=\"denied\"}") >= 6.0);
}

/// A small HTTP server answering each request with `decide(body)`; it keeps the bodies.
struct HookServer {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl HookServer {
    fn start(decide: fn(&str) -> u16) -> HookServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, st) = (bodies.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !st.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Head, then Content-Length bytes of body.
                let body = loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break Some(body.to_string());
                        }
                    }
                };
                let Some(body) = body else { continue };
                let status = decide(&body);
                b.lock().unwrap().push(body);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        HookServer { addr, bodies, stop }
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Sends `request` (a publish or play) on `conn` and, while the node waits for its auth
/// hook (`hook_delay`), a ping: the ping must be answered before the request and before the
/// hook could have answered (the connection is read meanwhile), and the request once the
/// hook has (`accepted` says which event that is).
async fn answered_while_the_hook_decides(
    conn: &mut meshcast::rtmp::client::ClientConn,
    request: Result<
        rml_rtmp::sessions::ClientSessionResult,
        rml_rtmp::sessions::ClientSessionError,
    >,
    accepted: fn(&rml_rtmp::sessions::ClientSessionEvent) -> bool,
    hook_delay: Duration,
) {
    use rml_rtmp::sessions::ClientSessionEvent;
    use tokio::io::AsyncWriteExt;
    let asked = Instant::now();
    conn.send(request).await.unwrap();
    // createStream's answer comes at once; the client then sends its publish or play.
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        conn.until(Vec::new(), |_| None::<Result<(), _>>),
    )
    .await;
    let (ping, _) = conn.session.send_ping_request().unwrap();
    conn.socket.write_all(&ping.bytes).await.unwrap();
    let first = conn
        .until(Vec::new(), |ev| match ev {
            ClientSessionEvent::PingResponseReceived { .. } => Some(Ok("ping")),
            ev if accepted(ev) => Some(Ok("request")),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(first, "ping", "the request was answered before the ping");
    assert!(
        asked.elapsed() < hook_delay,
        "the ping waited for the hook: {:?}",
        asked.elapsed()
    );
    conn.until(Vec::new(), |ev| accepted(ev).then_some(Ok(())))
        .await
        .unwrap();
    let waited = asked.elapsed();
    assert!(
        waited >= hook_delay && waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_or_play_under_a_slow_webhook_is_answered_and_its_connection_read_meanwhile() {
    use rml_rtmp::sessions::{ClientSessionEvent, PublishRequestType};
    const HOOK_DELAY: Duration = Duration::from_secs(2);
    let hook = HookServer::start(|_| {
        std::thread::sleep(HOOK_DELAY);
        200
    });
    let node = NodeProc::start(NodeSpec {
        extra: format!(
            "\n[auth]\nwebhook = \"http://{}/auth\"\nwebhook_timeout_ms = 5000\n",
            hook.addr
        ),
        ..NodeSpec::standalone()
    });
    let rtmp = node.rtmp.to_string();
    let connect = || meshcast::rtmp::client::ClientConn::connect(&rtmp, "live", None, None);
    let mut publisher = connect().await.unwrap();
    let publish = publisher
        .session
        .request_publishing("slow".into(), PublishRequestType::Live);
    answered_while_the_hook_decides(
        &mut publisher,
        publish,
        |ev| matches!(ev, ClientSessionEvent::PublishRequestAccepted),
        HOOK_DELAY,
    )
    .await;
    let mut player = connect().await.unwrap();
    let play = player.session.request_playback("slow".into());
    answered_while_the_hook_decides(
        &mut player,
        play,
        |ev| matches!(ev, ClientSessionEvent::PlaybackRequestAccepted),
        HOOK_DELAY,
    )
    .await;
    assert_eq!(hook.bodies.lock().unwrap().len(), 2);
}

#[test]
fn the_auth_webhook_allows_refuses_and_fails_closed() {
    let hook = HookServer::start(|body| if body.contains("live/yes") { 200 } else { 403 });
    let node = NodeProc::start(NodeSpec {
        extra: format!(
            "\n[auth]\nwebhook = \"http://{}/auth\"\nwebhook_timeout_ms = 1000\n",
            hook.addr
        ),
        ..NodeSpec::standalone()
    });
    let _yes = publish_and_wait(
        &format!("{}?pass=1", node.rtmp_url("yes")),
        &node,
        "yes",
        PublishOpts::default(),
    );
    let (ok, err) = short_publish(&node.rtmp_url("no"));
    assert!(!ok && err.contains("webhook"), "{err}");
    let (status, _, body) = http_raw(node.http, "GET", "/live/no.flv", "", "").unwrap();
    assert_eq!(status, 403, "{body}");
    // The hook was told who asked for what.
    let bodies = hook.bodies.lock().unwrap().clone();
    let first: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(first["action"], "publish");
    assert_eq!(first["protocol"], "rtmp");
    assert_eq!(first["stream"], "live/yes");
    assert_eq!(first["query"], "pass=1");
    assert_eq!(first["node"], "standalone");
    assert!(first["client"].as_str().unwrap().starts_with("127."));
    // A play of the allowed stream goes through; a second one is answered from the cache.
    let asked = bodies.len();
    assert_eq!(head_status(node.http, "/live/yes.flv", ""), 200);
    assert_eq!(head_status(node.http, "/live/yes.flv", ""), 200);
    assert_eq!(hook.bodies.lock().unwrap().len(), asked + 1);

    // The webhook down: the node fails closed.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = NodeProc::start(NodeSpec {
        extra: format!("\n[auth]\nwebhook = \"http://{closed}/auth\"\nwebhook_timeout_ms = 500\n"),
        ..NodeSpec::standalone()
    });
    let (ok, err) = short_publish(&down.rtmp_url("yes"));
    assert!(!ok && err.contains("did not answer"), "{err}");
}

fn post_egress(node: &NodeProc, url: &str, headers: &str) -> (u16, String) {
    let body = format!("{{\"stream\":\"live/s1\",\"kind\":\"rtmp\",\"url\":\"{url}\"}}");
    let (status, _, body) = http_raw(node.http, "POST", "/api/v1/egress", headers, &body).unwrap();
    (status, body)
}

#[test]
fn egress_destinations_follow_the_policy_and_the_api_refuses_cross_site_calls() {
    let json = "Content-Type: application/json\r\n";
    let locked = auth_node("");
    let admin = format!(
        "{json}Authorization: Bearer {}\r\n",
        locked.admin_token.as_ref().unwrap()
    );
    // Under auth, loopback and private destinations are refused.
    for url in [
        "rtmp://127.0.0.1:22/x/y",
        "rtmp://10.0.0.1/live/k",
        "rtmp://[::1]:1935/live/k",
        "rtmp://localhost/live/k",
    ] {
        let (status, body) = post_egress(&locked, url, &admin);
        assert_eq!(status, 403, "{url}: {body}");
    }
    // The cross-site request of the report: text/plain gets 415, a foreign Origin 403.
    let (status, _) = post_egress(
        &locked,
        "rtmp://127.0.0.1:22/x/y",
        &format!(
            "Content-Type: text/plain\r\nAuthorization: Bearer {}\r\n",
            locked.admin_token.as_ref().unwrap()
        ),
    );
    assert_eq!(status, 415);
    let (status, body) = post_egress(
        &locked,
        "rtmp://127.0.0.1:22/x/y",
        &format!("{admin}Origin: http://evil.example\r\n"),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin"), "{body}");

    // allow_private_destinations lets them through.
    let open = auth_node("\n[egress]\nallow_private_destinations = true\n");
    let admin_open = format!(
        "{json}Authorization: Bearer {}\r\n",
        open.admin_token.as_ref().unwrap()
    );
    let (status, body) = post_egress(&open, "rtmp://127.0.0.1:22/x/y", &admin_open);
    assert_eq!(status, 201, "{body}");

    // An allow-list: a match is taken, a miss refused; max_jobs caps the jobs.
    let port = free_port();
    let listed = auth_node(&format!(
        "\n[egress]\ndestinations = [\"rtmp://127.0.0.1:{port}/live/*\"]\nmax_jobs = 1\n"
    ));
    let admin_listed = format!(
        "{json}Authorization: Bearer {}\r\n",
        listed.admin_token.as_ref().unwrap()
    );
    let (status, body) = post_egress(&listed, "rtmp://127.0.0.1:1/live/k", &admin_listed);
    assert_eq!(status, 403, "{body}");
    let (status, body) = post_egress(
        &listed,
        &format!("rtmp://127.0.0.1:{port}/live/k"),
        &admin_listed,
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = post_egress(
        &listed,
        &format!("rtmp://127.0.0.1:{port}/live/k2"),
        &admin_listed,
    );
    assert_eq!(status, 429, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_and_silent_rtmp_publishers_are_dropped() {
    let node = NodeProc::start(NodeSpec {
        rtmp_extra: "idle_timeout_ms = 1500".into(),
        http_extra: "header_timeout_ms = 500".into(),
        ..NodeSpec::standalone()
    });
    // Slowloris: headers that never end.
    let mut s = TcpStream::connect(node.http).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        n == 0 || text.starts_with("HTTP/1.1 408"),
        "the server answered an unfinished request: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "dropped after {:?}",
        started.elapsed()
    );

    // A publisher that says nothing after its publish is dropped and its name freed.
    let mut conn =
        meshcast::rtmp::client::ClientConn::connect(&node.rtmp.to_string(), "live", None, None)
            .await
            .unwrap();
    let r = conn
        .session
        .request_publishing("quiet".into(), rml_rtmp::sessions::PublishRequestType::Live);
    conn.send(r).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    use tokio::io::AsyncReadExt;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("a silent publisher was not dropped"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "dropped after {:?}",
        started.elapsed()
    );
    let node2 = &node;
    let publisher = tokio::task::spawn_blocking({
        let url = node.rtmp_url("quiet");
        move || Publisher::start(&url, PublishOpts::default())
    })
    .await
    .unwrap();
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(15), "the name published again", || {
            node2.stream("quiet").is_some()
        })
    });
    drop(publisher);
    assert!(node.metric("meshcast_refused_total{protocol=\"http\",why=\"header_timeout\"}") >= 1.0);
    assert!(node.metric("meshcast_refused_total{protocol=\"rtmp\",why=\"idle\"}") >= 1.0);
}

/// AMF0 for a command `name` whose third value nests strict arrays `depth` deep.
fn deep_command(name: &str, depth: usize) -> Vec<u8> {
    let mut body = vec![0x02];
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(name.as_bytes());
    body.push(0x00);
    body.extend_from_slice(&1f64.to_be_bytes());
    for _ in 0..depth {
        body.push(0x0a);
        body.extend_from_slice(&1u32.to_be_bytes());
    }
    body.push(0x05);
    body
}

/// One AMF0 command message as RTMP chunks (csid 3, 128-byte chunks).
fn command_chunks(body: &[u8], stream_id: u32) -> Vec<u8> {
    let mut out = vec![3u8, 0, 0, 0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    out.push(20);
    out.extend_from_slice(&stream_id.to_le_bytes());
    for (i, piece) in body.chunks(128).enumerate() {
        if i > 0 {
            out.push(0xc3);
        }
        out.extend_from_slice(piece);
    }
    out
}

/// Completes an RTMP handshake as a client over a blocking socket.
fn raw_handshake(addr: SocketAddr) -> TcpStream {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hs = Handshake::new(PeerType::Client);
    s.write_all(&hs.generate_outbound_p0_and_p1().unwrap())
        .unwrap();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed during the handshake");
        match hs.process_bytes(&buf[..n]).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => {
                s.write_all(&response_bytes).unwrap()
            }
            HandshakeProcessResult::Completed { response_bytes, .. } => {
                s.write_all(&response_bytes).unwrap();
                return s;
            }
        }
    }
}

/// Reads until the peer closes; panics if it does not within 10 s.
fn assert_closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => panic!("{what}: the connection stayed open"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_amf0_closes_one_connection_and_the_node_serves_on() {
    let node = NodeProc::start(NodeSpec::standalone());
    let node = Arc::new(node);
    let n2 = node.clone();
    let (publisher, watcher) = tokio::task::spawn_blocking(move || {
        let p = publish_and_wait(&n2.rtmp_url("ok"), &n2, "ok", PublishOpts::default());
        let w = flv_watch::FlvWatcher::start(n2.http, "/live/ok.flv");
        (p, w)
    })
    .await
    .unwrap();

    let rtmp = node.rtmp;
    tokio::task::spawn_blocking(move || {
        // `connect`: 10,000 levels (refused for depth) and the report's 30,000 (refused
        // for length).
        for depth in [10_000, 30_000] {
            let mut s = raw_handshake(rtmp);
            let _ = s.write_all(&command_chunks(&deep_command("connect", depth), 0));
            assert_closed(&mut s, "deep connect");
        }
    })
    .await
    .unwrap();
    // `publish` and `play` after a proper connect.
    for command in ["publish", "play"] {
        let mut conn =
            meshcast::rtmp::client::ClientConn::connect(&rtmp.to_string(), "live", None, None)
                .await
                .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = conn
            .socket
            .write_all(&command_chunks(&deep_command(command, 10_000), 1))
            .await;
        let mut buf = vec![0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), conn.socket.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("deep {command}: the connection stayed open"),
            }
        }
    }

    // A hostile destination server answers the egress's connect with deep AMF0.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    tokio::spawn(async move {
        use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..20 {
            let Ok(Ok((mut s, _))) =
                tokio::time::timeout(Duration::from_secs(60), fake.accept()).await
            else {
                return;
            };
            let mut hs = Handshake::new(PeerType::Server);
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                match hs.process_bytes(&buf[..n]) {
                    Ok(HandshakeProcessResult::InProgress { response_bytes }) => {
                        let _ = s.write_all(&response_bytes).await;
                    }
                    Ok(HandshakeProcessResult::Completed { response_bytes, .. }) => {
                        let _ = s.write_all(&response_bytes).await;
                        let _ = s
                            .write_all(&command_chunks(&deep_command("_result", 10_000), 0))
                            .await;
                        let _ =
                            tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    });
    let id = start_egress(
        &node,
        serde_json::json!({"stream": "live/ok", "kind": "rtmp", "url": format!("rtmp://{fake_addr}/live/x")}),
    );
    let n3 = node.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(
            Duration::from_secs(20),
            "the egress refuses the deep reply",
            || egress_status(&n3, &id).to_string().contains("nests deeper"),
        );
    })
    .await
    .unwrap();

    // The node is up and its viewer kept receiving throughout.
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(watcher.ended().is_none(), "the viewer was cut off");
    assert!(
        watcher.video_after(since) > 20,
        "the viewer stopped receiving"
    );
    let (status, _) = http_get(node.http, "/healthz").unwrap();
    assert_eq!(status, 200);
    let log = node.log();
    assert!(
        log.contains("refused input: AMF0 nests deeper"),
        "no log line"
    );
    assert!(
        log.contains("refused input: message of type 20"),
        "no log line"
    );
    drop(publisher);
}

#[test]
fn stream_and_viewer_limits_refuse_with_a_reason_and_count() {
    let node = NodeProc::start(NodeSpec {
        extra: "\n[limits]\nmax_streams = 1\nmax_viewers_per_stream = 1\n".into(),
        ..NodeSpec::standalone()
    });
    let _first = publish_and_wait(&node.rtmp_url("one"), &node, "one", PublishOpts::default());
    let (ok, err) = short_publish(&node.rtmp_url("two"));
    assert!(!ok && err.contains("stream limit"), "{err}");
    // One viewer per stream: the first HTTP-FLV viewer plays, the second gets a 503.
    let mut first = TcpStream::connect(node.http).unwrap();
    write!(first, "GET /live/one.flv HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = first.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (status, _, body) = http_raw(node.http, "GET", "/live/one.flv", "", "").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("viewer limit"), "{body}");
    let (ok, err, packets) = try_probe(&node.rtmp_url("one"), 1);
    assert!(!ok || packets == 0, "a second RTMP viewer played: {err}");
    // The place is given back when the viewer leaves.
    drop(first);
    wait_until(Duration::from_secs(10), "the viewer's place freed", || {
        head_status(node.http, "/live/one.flv", "") == 200
    });
    assert!(node.metric("meshcast_refused_total{protocol=\"flv\",why=\"limit\"}") >= 1.0);
    assert!(node.metric("meshcast_refused_total{protocol=\"rtmp\",why=\"limit\"}") >= 2.0);
}

/// A tmpfs of `mb` MiB mounted at `dir` for the test's life.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mb: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs (the test needs root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn the_disk_floor_stops_a_recording_cleanly_and_keeps_what_was_written() {
    let floor = temp_dir("floor");
    let disk = floor.join("disk");
    let _tmpfs = Tmpfs::mount(&disk, 24);
    // 24 MiB with a 20 MiB floor: about 4 MiB can be written.
    let node = NodeProc::start(NodeSpec {
        extra: format!(
            "\n[recording]\nroot = \"{}\"\nmin_free_mb = 20\n",
            disk.display()
        ),
        ..NodeSpec::standalone()
    });
    let _publisher = publish_and_wait(
        &node.rtmp_url("rec"),
        &node,
        "rec",
        PublishOpts {
            seconds: 120,
            ..Default::default()
        },
    );
    let id = start_egress(
        &node,
        serde_json::json!({"stream": "live/rec", "kind": "record", "format": "mp4", "segment_seconds": 2}),
    );
    let mut last = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(90),
        "the recording stops at the floor",
        || {
            last = egress_status(&node, &id);
            last["state"] == "failed"
        },
    );
    assert!(
        last["last_error"].as_str().unwrap().contains("min_free_mb"),
        "{last}"
    );
    let files: Vec<String> = last["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    assert!(files.len() >= 2, "{last}");
    // Every file written, the last one included, plays.
    for f in &files {
        let (ok, err, packets) = try_probe(disk.join(f).to_str().unwrap(), 60);
        assert!(ok && packets > 10, "{f}: {packets} packets, {err}");
    }
    // Nothing more is written, and the node serves on.
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let sizes: Vec<u64> = files.iter().map(|f| size(&disk.join(f))).collect();
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<u64> = files.iter().map(|f| size(&disk.join(f))).collect();
    assert_eq!(sizes, after);
    assert!(node.stream("rec").is_some());
}

/// A host of the test's own: a network namespace joined to this one by a veth pair, with
/// `host` on this side and `peer` inside.
struct Netns {
    name: String,
    host: std::net::IpAddr,
    peer: std::net::IpAddr,
}

impl Netns {
    fn create() -> Netns {
        let id = std::process::id() % 250;
        let name = format!("mc-lock-{}", std::process::id());
        let (veth, inner) = (format!("mcl{id}a"), format!("mcl{id}b"));
        let host = format!("10.213.{id}.1");
        let peer = format!("10.213.{id}.2");
        let run = |args: &[&str]| {
            let ok = Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {}", args.join(" "));
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let _ = Command::new("ip").args(["link", "del", &veth]).status();
        run(&["netns", "add", &name]);
        run(&["link", "add", &veth, "type", "veth", "peer", "name", &inner]);
        run(&["link", "set", &inner, "netns", &name]);
        run(&["addr", "add", &format!("{host}/30"), "dev", &veth]);
        run(&["link", "set", &veth, "up"]);
        let ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", name.as_str(), "ip"];
            full.extend_from_slice(args);
            run(&full);
        };
        ns(&["addr", "add", &format!("{peer}/30"), "dev", &inner]);
        ns(&["link", "set", &inner, "up"]);
        ns(&["link", "set", "lo", "up"]);
        Netns {
            name,
            host: host.parse().unwrap(),
            peer: peer.parse().unwrap(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_remote_admin_call_on_a_node_without_auth_is_refused() {
    let host = Netns::create();
    let node = NodeProc::start_at(
        NodeSpec::standalone(),
        SocketAddr::new(host.host, free_port()),
    );
    let curl = |path: &str| {
        let out = bounded::output_within(
            Command::new("ip")
                .args(["netns", "exec", &host.name, "curl", "-s", "-m", "10"])
                .args(["-w", "\n%{http_code}"])
                .arg(format!("http://{}{path}", node.http)),
            Duration::from_secs(20),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_string())
    };
    for path in ["/api/v1/streams", "/api/v1/egress", "/api/v1/cluster"] {
        let (status, body) = curl(path);
        assert_eq!(status, 403, "{path} from {}: {body}", host.peer);
        assert!(body.contains("configure [auth]"), "{body}");
    }
    // What any client may ask still answers.
    assert_eq!(curl("/healthz").0, 200);
    assert!(node.metric("meshcast_refused_total{protocol=\"api\",why=\"not_loopback\"}") >= 3.0);
}

#[test]
fn the_event_hook_hears_publish_play_stop_unpublish_and_viewers_can_be_kicked() {
    let hook = HookServer::start(|_| 200);
    let node = NodeProc::start(NodeSpec {
        extra: format!(
            "\n[hooks]\nevents = \"http://{}/events\"\n\n[limits]\npublisher_hold_ms = 0\n",
            hook.addr
        ),
        ..NodeSpec::standalone()
    });
    let publisher = publish_and_wait(&node.rtmp_url("ev"), &node, "ev", PublishOpts::default());
    let watcher = flv_watch::FlvWatcher::start(node.http, "/live/ev.flv");
    let mut viewers = Vec::new();
    wait_until(Duration::from_secs(10), "the FLV viewer listed", || {
        let (_, b) = http_get(node.http, "/api/v1/viewers").unwrap();
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        viewers = v["viewers"].as_array().cloned().unwrap_or_default();
        !viewers.is_empty()
    });
    assert_eq!(viewers[0]["stream"], "live/ev");
    assert_eq!(viewers[0]["protocol"], "flv");
    let id = viewers[0]["id"].as_str().unwrap().to_string();
    let kick = |id: &str| {
        let path = format!("/api/v1/viewers/{id}");
        http_raw(node.http, "DELETE", &path, "", "").unwrap().0
    };
    assert_eq!(kick(&id), 204);
    wait_until(Duration::from_secs(10), "the kicked viewer cut off", || {
        watcher.ended().is_some()
    });
    let (_, b) = http_get(node.http, "/api/v1/viewers").unwrap();
    assert!(b.contains("\"viewers\":[]"), "{b}");
    assert_eq!(kick(&id), 404);
    // An RTMP viewer, then the publisher leaves.
    let (ok, err, _) = try_probe(&node.rtmp_url("ev"), 1);
    assert!(ok, "{err}");
    drop(publisher);
    let want = [
        ("publish", "rtmp"),
        ("play", "flv"),
        ("stop", "flv"),
        ("play", "rtmp"),
        ("stop", "rtmp"),
        ("unpublish", "rtmp"),
    ];
    wait_until(Duration::from_secs(20), "every event delivered", || {
        let got: Vec<(String, String)> = hook
            .bodies
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .map(|v| {
                (
                    v["event"].as_str().unwrap_or("").to_string(),
                    v["protocol"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        want.iter()
            .all(|(e, p)| got.iter().any(|(ge, gp)| ge == e && gp == p))
    });
    let first: serde_json::Value = serde_json::from_str(&hook.bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(first["stream"], "live/ev");
    assert_eq!(first["node"], "standalone");
    assert!(node.metric("meshcast_hook_events_delivered_total") >= 6.0);
}

#[test]
fn an_edge_forwards_a_tokened_publish_to_its_origin_under_auth() {
    let auth = format!("\n[auth]\nsecrets = [\"{SECRET}\"]\n");
    let mut origin = NodeProc::start(NodeSpec {
        extra: auth.clone(),
        ..NodeSpec::origin("origin-a")
    });
    origin.admin_token = Some(token(Action::Admin, &[]));
    let mut edge = NodeProc::start(NodeSpec {
        extra: auth,
        ..NodeSpec::edge("edge-a", vec![origin.quic])
    });
    edge.admin_token = Some(token(Action::Admin, &[]));
    edge.wait_for_link_count(1);
    // The publisher's token covers its stream on the edge; the edge signs its own for the
    // push to the origin.
    let publish = token(Action::Publish, &["live/fw"]);
    let _publisher = Publisher::start(
        &format!("{}?token={publish}", edge.rtmp_url("fw")),
        PublishOpts::default(),
    );
    wait_until(
        Duration::from_secs(20),
        "the publish forwarded to the origin",
        || origin.stream("fw").is_some(),
    );
    let play = token(Action::Play, &["live/*"]);
    let (ok, err, packets) = try_probe(&format!("{}?token={play}", origin.rtmp_url("fw")), 2);
    assert!(
        ok && packets > 30,
        "{packets} packets from the origin: {err}"
    );
    // The signed forward token shows nowhere.
    let (_, egress) =
        http_get_bearer(edge.http, "/api/v1/egress", edge.admin_token.as_deref()).unwrap();
    assert!(!egress.contains("token="), "{egress}");
    assert!(
        !edge.log().contains("token=ey"),
        "a token is in the edge's log"
    );
    assert!(
        !origin.log().contains("token=ey"),
        "a token is in the origin's log"
    );
}
