//! A backbone that knows its members: rogue peers against a real node process. The rogue is
//! a quinn client built here that speaks through meshcast's own sans-IO session, so it sends
//! exactly what a node would, except where it lies.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use meshcast::backbone::session::{ControlSession, PeerInfo, SessionError, SessionEvent};
use meshcast::backbone::wire::{ControlMessage, NodeRecord};
use meshcast::config::Role;

/// A rogue's control stream, hello sent.
struct Rogue {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: ControlSession,
}

/// A QUIC connection to `node`'s backbone, nothing said yet.
async fn connect(
    node: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let cfg = meshcast::config::Config::standalone_default();
    let client = meshcast::backbone::tls::client_config(&cfg.backbone).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint.connect_with(client, node, meshcast::backbone::tls::SERVER_NAME);
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting.unwrap())
        .await
        .expect("QUIC handshake in time")?;
    Ok((endpoint, conn))
}

/// Connects to `node`'s backbone as `id` (an edge) and sends the hello.
async fn dial(node: SocketAddr, id: &str, token: &str) -> Result<Rogue, quinn::ConnectionError> {
    let (endpoint, conn) = connect(node).await?;
    let (mut send, recv) = conn.open_bi().await?;
    let mut session = ControlSession::dialer(
        PeerInfo {
            node_id: id.into(),
            role: Role::Edge,
            region: "r".into(),
        },
        token,
        rand::random(),
        meshcast::backbone::channel_binding(&conn).unwrap(),
    );
    flush(&mut session, &mut send).await;
    Ok(Rogue {
        _endpoint: endpoint,
        conn,
        send,
        recv,
        session,
    })
}

async fn flush(session: &mut ControlSession, send: &mut quinn::SendStream) {
    while let Some(b) = session.poll_transmit() {
        // The node may close first; what it says then is what the test looks at.
        let _ = send.write_all(&b).await;
    }
}

impl Rogue {
    /// Pumps the hello until the session is ready or fails.
    async fn hello(&mut self) -> Result<PeerInfo, SessionError> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), self.recv.read(&mut buf))
                .await
                .expect("the node answers the hello in time");
            let n = match n {
                Ok(Some(n)) => n,
                _ => return Err(SessionError::Closed),
            };
            let events = self.session.handle_input(&buf[..n]);
            flush(&mut self.session, &mut self.send).await;
            for ev in events? {
                if let SessionEvent::Ready(peer) = ev {
                    return Ok(peer);
                }
            }
        }
    }

    /// Sends a node state, whatever the session thinks of it.
    async fn send_records(&mut self, records: Vec<NodeRecord>) {
        let mut buf = BytesMut::new();
        ControlMessage::NodeState(records).encode(&mut buf);
        self.send.write_all(&buf).await.unwrap();
    }

    /// Why the node closed the connection, within 10 s.
    async fn closed_by_node(&self) -> String {
        let e = tokio::time::timeout(Duration::from_secs(10), self.conn.closed())
            .await
            .expect("the node closes the connection");
        e.to_string()
    }
}

fn record(node: &str, http: &str) -> NodeRecord {
    NodeRecord::idle(node, Role::Edge, "r", http, "rtmp://192.0.2.9:1935", 1)
}

fn cluster_nodes(node: &NodeProc) -> Vec<serde_json::Value> {
    let (status, body) = http_get(node.http, "/api/v1/cluster").expect("cluster API");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["nodes"].as_array().cloned().unwrap_or_default()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 10 s: {what}");
}

async fn start(spec: NodeSpec) -> NodeProc {
    tokio::task::spawn_blocking(move || NodeProc::start(spec))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backbone_peer_with_a_wrong_token_is_refused_on_both_sides() {
    let origin = start(NodeSpec::origin("origin-a")).await;
    let mut rogue = dial(origin.quic, "rogue-1", "not-the-cluster-token-at-all")
        .await
        .unwrap();
    assert_eq!(rogue.hello().await, Err(SessionError::Unauthorized));
    let why = rogue.closed_by_node().await;
    assert!(why.contains("did not prove the cluster token"), "{why}");
    eventually("the node logs the refusal", || {
        origin
            .log()
            .contains("link closed: peer did not prove the cluster token")
    })
    .await;
    assert!(origin.links().is_empty());
    assert!(origin.metric("meshcast_session_errors_total{proto=\"backbone\"}") >= 1.0);
    // The right token gets in (the refusal was the token's doing).
    let mut member = dial(origin.quic, "edge-1", TEST_TOKEN).await.unwrap();
    assert_eq!(member.hello().await.unwrap().node_id, "origin-a");
    eventually("the member's link is listed", || origin.links().len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backbone_peer_that_describes_another_node_is_cut_off_and_never_routed_to() {
    let origin = start(NodeSpec::origin("origin-a")).await;
    let mut rogue = dial(origin.quic, "rogue-1", TEST_TOKEN).await.unwrap();
    rogue.hello().await.unwrap();
    // Describing itself is allowed: the node lists it while the link lives.
    rogue
        .send_records(vec![record("rogue-1", "http://192.0.2.1:8080")])
        .await;
    eventually("the rogue's own record is listed", || {
        cluster_nodes(&origin)
            .iter()
            .any(|n| n["node"] == "rogue-1")
    })
    .await;
    // A record about another node (a ghost edge pointing players elsewhere): the node
    // closes the link as a protocol violation.
    rogue
        .send_records(vec![
            record("rogue-1", "http://192.0.2.1:8080"),
            record("edge-ghost", "http://192.0.2.2:8080"),
        ])
        .await;
    let why = rogue.closed_by_node().await;
    assert!(why.contains("may only describe itself"), "{why}");
    eventually("the node logs the violation", || {
        origin
            .log()
            .contains("node record about \"edge-ghost\" from rogue-1")
    })
    .await;
    // Everything heard over that link is gone with it, and never comes back.
    eventually("the rogue's records leave with its link", || {
        cluster_nodes(&origin).len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let nodes = cluster_nodes(&origin);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["node"], "origin-a");
    // Players are routed to the origin itself, not to either address the rogue gave.
    let (status, body) =
        http_get(origin.http, "/api/v1/route?stream=live/x&action=play").expect("route API");
    assert_eq!(status, 200, "{body}");
    let route: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(route["node"]["node"], "origin-a", "{route}");
    assert!(!body.contains("192.0.2."), "{body}");
    let (status, head, _) =
        common::http::http_exchange(origin.http, "GET", "/route/live/x.flv", "text/plain", "")
            .unwrap();
    assert_eq!(status, 307, "{head}");
    assert_eq!(
        common::http::header_value(&head, "location").unwrap(),
        format!("http://{}/live/x.flv", origin.http)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stalls_or_floods_before_its_hello_is_dropped() {
    let origin = start(NodeSpec::origin("origin-a")).await;
    // A length prefix announcing 1 MiB where a hello (at most 4 KiB) belongs: dropped at
    // once, before any of that megabyte is sent.
    let (_e1, flooder) = connect(origin.quic).await.unwrap();
    let (mut send, _recv) = flooder.open_bi().await.unwrap();
    send.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(3), flooder.closed())
        .await
        .expect("dropped at once")
        .to_string();
    assert!(why.contains("1048576 bytes exceeds the limit"), "{why}");
    // Connected, and silent: dropped when the hello's time is up (5 s).
    let (_e2, staller) = connect(origin.quic).await.unwrap();
    let t0 = std::time::Instant::now();
    let why = tokio::time::timeout(Duration::from_secs(10), staller.closed())
        .await
        .expect("dropped within the hello's time")
        .to_string();
    assert!(why.contains("did not complete the hello in time"), "{why}");
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(origin.links().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_token_refuses_every_backbone_connection() {
    // A standalone node with no token and no peers starts (as `meshcast run` with no
    // config does), its backbone closed.
    let quic = node_addr();
    let ip = quic.ip();
    let http = SocketAddr::new(ip, free_port());
    let dir = temp_dir("no-token");
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nid = \"lonely\"\n[rtmp]\nlisten = \"{}\"\n[http]\nlisten = \"{http}\"\n\
             [webrtc]\nlisten = \"off\"\n[backbone]\nlisten = \"{quic}\"\n",
            SocketAddr::new(ip, free_port())
        ),
    )
    .unwrap();
    let child = spawn_node(&path, &dir);
    let node = NodeProc {
        name: "lonely".into(),
        child,
        rtmp: quic,
        http,
        quic,
        webrtc: quic,
        dir: dir.keep(),
        admin_token: None,
    };
    eventually("node HTTP up", || {
        http_get(node.http, "/healthz").is_ok_and(|(s, _)| s == 200)
    })
    .await;
    for token in ["", TEST_TOKEN] {
        match dial(node.quic, "anyone", token).await.map(|_| ()) {
            Err(e) => assert!(e.to_string().contains("refused"), "{e}"),
            Ok(_) => panic!("a closed backbone let a connection in (token {token:?})"),
        }
    }
    let log = node.log();
    assert_eq!(log.matches("the backbone is closed").count(), 1, "{log}");
    assert!(node.links().is_empty());
}

#[test]
fn check_config_names_backbone_token_when_it_is_empty_or_short_beyond_loopback() {
    let dir = temp_dir("check-config");
    let check = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(&*BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = check(
        "origin.toml",
        "[node]\nrole = \"origin\"\n[backbone]\nlisten = \"0.0.0.0:4433\"\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "backbone.token: is empty and backbone.listen 0.0.0.0:4433 is not a loopback address"
        ),
        "{err}"
    );
    let (code, err) = check(
        "edge.toml",
        "[node]\nrole = \"edge\"\n[backbone]\ntoken = \"change-me\"\norigins = [\"10.1.2.3:4433\"]\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("backbone.token: is 9 bytes and this node dials 10.1.2.3:4433"),
        "{err}"
    );
    assert!(err.contains("16 bytes or more"), "{err}");
    let (code, err) = check(
        "ok.toml",
        "[node]\nrole = \"edge\"\n[backbone]\ntoken = \"0123456789abcdef\"\norigins = [\"10.1.2.3:4433\"]\n",
    );
    assert_eq!(code, Some(0), "{err}");
}
