//! Running nodes for months: readiness for load balancers and orchestrators, and logs a
//! collector can parse.

mod common;

use std::process::Command;
use std::time::Duration;

use common::http::http_get;
use common::*;

#[test]
fn readyz_waits_until_a_node_has_joined_its_mesh() {
    // A standalone node dials nobody: ready at once.
    let standalone = NodeProc::start(NodeSpec::standalone());
    assert_eq!(
        http_get(standalone.http, "/readyz").unwrap(),
        (200, "ready\n".into())
    );

    // An edge whose origin is not up yet: alive, not ready, and it says why.
    let origin_addr = node_addr();
    let edge = NodeProc::start(NodeSpec::edge("edge-1", vec![origin_addr]));
    assert_eq!(http_get(edge.http, "/healthz").unwrap().0, 200);
    let (status, why) = http_get(edge.http, "/readyz").unwrap();
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("0 of 1 backbone links up"), "{why}");
    // The origin comes up (its peer, origin B, is not): the edge becomes ready.
    let b_addr = node_addr();
    let mut spec = NodeSpec::origin("origin-a");
    spec.upstreams = vec![b_addr];
    let origin = NodeProc::start_at(spec, origin_addr);
    wait_until(Duration::from_secs(10), "the edge is ready", || {
        http_get(edge.http, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
    // The origin waits for its peer.
    let (status, why) = http_get(origin.http, "/readyz").unwrap();
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("0 of 1"), "{why}");
    let mut spec = NodeSpec::origin("origin-b");
    spec.upstreams = vec![origin_addr];
    let _b = NodeProc::start_at(spec, b_addr);
    wait_until(Duration::from_secs(10), "the origins are ready", || {
        http_get(origin.http, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
}

#[test]
fn logs_can_be_one_json_object_per_line() {
    let node = NodeProc::start(NodeSpec {
        extra: "\n[log]\nformat = \"json\"\nlevel = \"info\"\n".into(),
        ..NodeSpec::standalone()
    });
    // Something to log: a request for a stream nobody publishes.
    let _ = http_get(node.http, "/live/nothing.flv");
    wait_until(Duration::from_secs(5), "log lines", || {
        node.log().lines().count() >= 2
    });
    let log = node.log();
    let mut started = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        started |= v["fields"]["message"] == "meshcast node started";
    }
    assert!(started, "{log}");

    // A bad value is named by check-config.
    let dir = temp_dir("log-config");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[log]\nformat = \"xml\"\nlevel = \"meshcast=shout\"\n").unwrap();
    let out = Command::new(&*BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("log.format: `xml`: must be text or json"),
        "{err}"
    );
    assert!(err.contains("log.level"), "{err}");
}
