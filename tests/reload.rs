//! Reloading the config without a drop: `SIGHUP` and `POST /api/v1/reload` re-read the
//! file and apply auth keys, limits, namespaces and an edge's origin list live, while
//! ffprobe and an HTTP-FLV viewer watch through it and backbone links stay up.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::flv_watch::{longest_gap, FlvWatcher};
use common::http::http_raw;
use common::*;
use meshcast::auth::Action;
use serde_json::Value;

const OLD_SECRET: &str = "reload-test-old-secret-0123";
const NEW_SECRET: &str = "reload-test-new-secret-0123";

fn token(secret: &str, act: Action, streams: &[&str]) -> String {
    sign(secret, &claims(act, streams))
}

/// Rewrites the node's config file: `from` becomes `to`.
fn edit_config(node: &NodeProc, from: &str, to: &str) {
    let path = node.dir.join("node.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

/// `POST /api/v1/reload` with `token`: (status, JSON answer).
fn api_reload(node: &NodeProc, token: &str) -> (u16, Value) {
    let (status, _, body) = http_raw(
        node.http,
        "POST",
        "/api/v1/reload",
        &format!("Authorization: Bearer {token}\r\n"),
        "",
    )
    .unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn a_reload_rotates_keys_and_limits_while_everyone_stays_connected() {
    let mut node = NodeProc::start(NodeSpec {
        extra: format!(
            "\n[auth]\nsecrets = [\"{OLD_SECRET}\"]\n\n[limits]\nmax_streams = 5\n\n[log]\nlevel = \"info\"\n"
        ),
        ..NodeSpec::standalone()
    });
    node.admin_token = Some(token(OLD_SECRET, Action::Admin, &[]));
    let old_publish = token(OLD_SECRET, Action::Publish, &["live/*"]);
    let old_play = token(OLD_SECRET, Action::Play, &["live/*"]);
    let _publisher = publish_and_wait(
        &format!("{}?token={old_publish}", node.rtmp_url("cam")),
        &node,
        "cam",
        PublishOpts::default(),
    );
    // Two viewers watch through both reloads: ffprobe (over RTMP) and an HTTP-FLV reader.
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-rw_timeout", "10000000"])
        .args(["-show_entries", "packet=stream_index", "-of", "json"])
        .args(["-read_intervals", "%+14"])
        .arg(format!("{}?token={old_play}", node.rtmp_url("cam")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ffprobe");
    let watcher = FlvWatcher::start(node.http, &format!("/live/cam.flv?token={old_play}"));
    wait_until(Duration::from_secs(10), "the FLV viewer plays", || {
        !watcher.media(9).is_empty()
    });
    wait_until(
        Duration::from_secs(10),
        "ffprobe and the FLV viewer listed",
        || {
            let (_, body) = common::http::http_get_bearer(
                node.http,
                "/api/v1/viewers",
                node.admin_token.as_deref(),
            )
            .unwrap();
            body.contains("\"rtmp\"") && body.contains("\"flv\"")
        },
    );
    let watching_since = Instant::now();
    assert!(!node.log().contains("DEBUG"), "debug lines at level info");

    // SIGHUP: the old secret is replaced by a new one, two streams at most, debug logs,
    // and a new RTMP port (which needs a restart).
    edit_config(&node, OLD_SECRET, NEW_SECRET);
    edit_config(&node, "max_streams = 5", "max_streams = 2");
    edit_config(&node, "level = \"info\"", "level = \"debug\"");
    let rtmp_line = format!("listen = \"{}\"", node.rtmp);
    edit_config(&node, &rtmp_line, "listen = \"127.0.0.1:1\"");
    node.signal("HUP");
    wait_until(Duration::from_secs(5), "the reload logged", || {
        node.log().contains("config reloaded")
    });
    let log = node.log();
    let line = log.lines().find(|l| l.contains("config reloaded")).unwrap();
    assert!(
        line.contains("\"auth\"") && line.contains("\"limits\"") && line.contains("\"log.level\""),
        "{line}"
    );
    assert!(line.contains("restart_required=[\"rtmp\"]"), "{line}");

    // The old key is gone, the new one works, the new limit holds.
    let (ok, err) = short_publish(&format!("{}?token={old_publish}", node.rtmp_url("two")));
    assert!(
        !ok && err.contains("signature"),
        "old key after the reload: {err}"
    );
    let new_publish = token(NEW_SECRET, Action::Publish, &["live/*"]);
    node.admin_token = Some(token(NEW_SECRET, Action::Admin, &[]));
    let _second = publish_and_wait(
        &format!("{}?token={new_publish}", node.rtmp_url("two")),
        &node,
        "two",
        PublishOpts::default(),
    );
    let (ok, err) = short_publish(&format!("{}?token={new_publish}", node.rtmp_url("three")));
    assert!(
        !ok && err.contains("stream limit (2)"),
        "third stream: {err}"
    );
    // The RTMP listener did not move; the log level did.
    assert!(std::net::TcpStream::connect(node.rtmp).is_ok());
    // Something logged at debug: an HTTP client that leaves mid-request.
    {
        use std::io::Write;
        let mut half = std::net::TcpStream::connect(node.http).unwrap();
        half.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    }
    wait_until(
        Duration::from_secs(5),
        "debug lines after the reload",
        || node.log().contains("DEBUG"),
    );

    // An invalid file through the API: refused with its problems, nothing applied.
    edit_config(&node, "max_streams = 2", "max_streams = 0");
    let admin = node.admin_token.clone().unwrap();
    let (status, answer) = api_reload(&node, &admin);
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["problems"]
            .to_string()
            .contains("limits.max_streams"),
        "{answer}"
    );
    edit_config(&node, "max_streams = 0", "max_streams = 3");
    let (status, answer) = api_reload(&node, &admin);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["applied"], serde_json::json!(["limits"]), "{answer}");
    assert_eq!(
        answer["restart_required"],
        serde_json::json!(["rtmp"]),
        "{answer}"
    );
    // Only a node admin reloads; the old key's admin token is nothing now.
    let (status, _) = api_reload(&node, &token(OLD_SECRET, Action::Admin, &[]));
    assert_eq!(status, 401);

    // Nobody was dropped: the first publisher is still live, the FLV viewer never
    // stalled, and ffprobe read its 14 seconds through both reloads.
    assert!(node.stream("cam").is_some());
    let probe = probe.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&probe.stdout).unwrap_or_default();
    let packets = v["packets"].as_array().map_or(0, |p| p.len());
    assert!(
        probe.status.success() && packets > 14 * 30,
        "ffprobe through the reloads: {packets} packets, {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(watcher.ended().is_none(), "{:?}", watcher.ended());
    let (gap, _) = longest_gap(&watcher.tags(), watching_since);
    assert!(
        gap < Duration::from_millis(1500),
        "the FLV viewer stalled {gap:?}"
    );
}

#[test]
fn an_edge_changes_its_origins_live_and_its_viewer_keeps_watching() {
    let (a, b, edge_b) = start_two_origins_and_edge();
    drop(edge_b);
    let mut spec = NodeSpec::edge("edge-1", vec![a.quic]);
    spec.extra = "\n[log]\nlevel = \"info\"\n".into();
    let edge = NodeProc::start(spec);
    edge.wait_for_link_count(1);
    let _publisher = publish_and_wait(&a.rtmp_url("cam"), &a, "cam", PublishOpts::default());
    let watcher = FlvWatcher::start(edge.http, "/live/cam.flv");
    wait_until(Duration::from_secs(10), "the edge's viewer plays", || {
        watcher.media(9).len() > 10
    });
    let origin_links = |n: &NodeProc| {
        let mut peers: Vec<String> = n.links().iter().map(|l| format!("{}", l["node"])).collect();
        peers.sort();
        peers
    };
    let a_links = origin_links(&a);

    // B joins the list, nearest first: the edge dials it.
    let origins = |list: &[std::net::SocketAddr]| {
        let quoted: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
        format!("origins = [{}]", quoted.join(", "))
    };
    edit_config(&edge, &origins(&[a.quic]), &origins(&[b.quic, a.quic]));
    edge.signal("HUP");
    wait_until(Duration::from_secs(10), "the edge links to both", || {
        edge.links().len() == 2
    });
    // A leaves it: the edge unlinks A and its viewer moves to B.
    let before = Instant::now();
    edit_config(&edge, &origins(&[b.quic, a.quic]), &origins(&[b.quic]));
    edge.signal("HUP");
    wait_until(Duration::from_secs(10), "the edge keeps only B", || {
        let l = edge.links();
        l.len() == 1 && l[0]["node"] == "origin-b"
    });
    wait_until(Duration::from_secs(10), "the viewer watches on", || {
        watcher.video_after(Instant::now() - Duration::from_millis(500)) > 5
            && watcher.video_after(before) > 90
    });
    assert!(watcher.ended().is_none(), "{:?}", watcher.ended());
    let (gap, _) = longest_gap(&watcher.tags(), before);
    assert!(gap < Duration::from_secs(2), "the viewer stalled {gap:?}");
    // The origins' link to each other stayed up through it all.
    assert!(
        origin_links(&a).iter().any(|p| p.contains("origin-b")),
        "{a_links:?}"
    );
    assert!(
        edge.log().contains("origin left the list"),
        "{}",
        edge.log()
    );
}

#[test]
fn a_reload_adds_and_removes_egress_rules_hooks_and_namespaces() {
    let node = NodeProc::start(NodeSpec {
        extra: "\n# reloaded below\n".into(),
        ..NodeSpec::standalone()
    });
    let _cam = publish_and_wait(&node.rtmp_url("cam"), &node, "cam", PublishOpts::default());
    let rule_jobs = || {
        let (_, body) = common::http::http_get(node.http, "/api/v1/egress").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        v["egress"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["created_by"] == "config")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(rule_jobs().is_empty());

    // A record rule, an event hook and strict namespaces arrive with a reload.
    let (hook_port, events) = common::browser::serve_page(String::new());
    let added = format!(
        "\n[[egress]]\nstream = \"live/*\"\nkind = \"record\"\nformat = \"flv\"\n\n\
         [hooks]\nevents = \"http://127.0.0.1:{hook_port}/result\"\n\n\
         [namespaces]\nstrict = true\n\n[[namespace]]\nname = \"live\"\n"
    );
    edit_config(
        &node,
        "# reloaded below\n",
        &format!("# reloaded below\n{added}"),
    );
    node.signal("HUP");
    wait_until(Duration::from_secs(10), "the rule's recording live", || {
        rule_jobs()
            .iter()
            .any(|j| j["stream"] == "live/cam" && j["state"] == "live")
    });
    // The hook hears a new viewer.
    let (ok, err, _) = try_probe(&node.flv_url("cam"), 1);
    assert!(ok, "{err}");
    let event = events
        .recv_timeout(Duration::from_secs(10))
        .expect("a hook event");
    assert!(
        event.contains("\"play\"") && event.contains("live/cam"),
        "{event}"
    );
    // Undeclared namespaces are refused now.
    let (ok, err) = short_publish(&format!("rtmp://{}/other/cam", node.rtmp));
    assert!(!ok && err.contains("not served"), "{err}");

    // The rule goes away with the next reload: its job stops; the publisher stays.
    edit_config(&node, &added, "\n");
    node.signal("HUP");
    wait_until(Duration::from_secs(10), "the rule's job stopped", || {
        rule_jobs().is_empty()
    });
    assert!(node.stream("cam").is_some());
    let recorded = files_under(&node.dir.join("recordings"));
    assert!(
        recorded
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "flv")),
        "{recorded:?}"
    );
}
