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
    std::fs::write(
        &path,
        "[log]\nformat = \"xml\"\nlevel = \"meshcast=shout\"\n",
    )
    .unwrap();
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

#[test]
fn api_egress_jobs_come_back_after_a_crash_and_record_a_new_file() {
    use common::egress_api::{delete_egress, egress_status, start_egress};
    let mut node = NodeProc::start(NodeSpec {
        extra: "\n[recording]\nroot = \"rec\"\n".into(),
        ..NodeSpec::standalone()
    });
    let opts = || PublishOpts {
        seconds: 30,
        ..Default::default()
    };
    let publisher = publish_and_wait(&node.rtmp_url("keep"), &node, "keep", opts());
    let id = start_egress(
        &node,
        serde_json::json!({"stream": "live/keep", "kind": "record", "template": "{ns}/{stream}.{ext}"}),
    );
    wait_until(Duration::from_secs(10), "recording", || {
        egress_status(&node, &id)["state"] == "live"
    });
    std::thread::sleep(Duration::from_secs(3));
    let state_file = node.dir.join("rec/.egress-state-standalone.json");
    let state = std::fs::read_to_string(&state_file).unwrap();
    assert!(
        state.contains(&id) && state.contains("live/keep"),
        "{state}"
    );

    // The node crashes; its publisher goes with it.
    node.signal("KILL");
    let _ = node.child.wait();
    drop(publisher);
    // It starts again from the same config: the job is back under its id, waiting.
    node.child = spawn_node(&node.dir.join("node.toml"), &node.dir);
    wait_until(Duration::from_secs(10), "node up again", || {
        http_get(node.http, "/healthz").is_ok_and(|(s, _)| s == 200)
    });
    let status = egress_status(&node, &id);
    assert_eq!(status["state"], "waiting", "{status}");
    // The publisher comes back: the recording goes on in a new file.
    let _publisher = publish_and_wait(&node.rtmp_url("keep"), &node, "keep", opts());
    wait_until(Duration::from_secs(10), "recording again", || {
        egress_status(&node, &id)["state"] == "live"
    });
    std::thread::sleep(Duration::from_secs(3));
    let done = delete_egress(&node, &id);
    let files = done["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{done}");
    let second = node.dir.join("rec").join(files[0].as_str().unwrap());
    let first = node.dir.join("rec/live/keep.mp4");
    assert_ne!(first, second, "a new file after the restart");
    for f in [&first, &second] {
        let p = ffprobe(f.to_str().unwrap(), 30);
        assert!(
            p.stream_of("video").is_some() && p.packets_of("video").len() >= 30,
            "{}",
            f.display()
        );
    }
    // Deleted: it is not resumed again.
    let state = std::fs::read_to_string(&state_file).unwrap();
    assert!(!state.contains(&id), "{state}");
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_a_node_exposes() {
    // Two linked origins: the link families have samples too.
    let (a_quic, b_quic) = (node_addr(), node_addr());
    let mut spec = NodeSpec::origin("origin-a");
    spec.upstreams = vec![b_quic];
    let a = NodeProc::start_at(spec, a_quic);
    let mut spec = NodeSpec::origin("origin-b");
    spec.upstreams = vec![a_quic];
    let _b = NodeProc::start_at(spec, b_quic);
    a.wait_for_link_count(2);
    let (status, metrics) = http_get(a.http, "/metrics").unwrap();
    assert_eq!(status, 200);
    let mut names = std::collections::HashSet::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                if kind == "counter" {
                    names.insert(format!("{name}_total"));
                }
            }
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../docs/grafana-dashboard.json")).unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("meshcast_") {
                let token: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    names.contains(&token),
                    "{} queries {token}, which /metrics does not have",
                    panel["title"]
                );
                queried += 1;
                rest = &rest[i + token.len()..];
            }
        }
    }
    assert!(queried >= 20, "{queried} metrics queried");
}

#[test]
fn the_examples_and_configs_users_copy_pass_check_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("examples/recording.toml")];
    for dir in ["configs", "configs/cluster-3region"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        let out = Command::new(&*BIN)
            .arg("check-config")
            .arg(f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The systemd unit runs the binary the way the README does, on the config it checks.
    let unit = std::fs::read_to_string(root.join("examples/meshcast.service")).unwrap();
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .to_string()
    };
    let start = line("ExecStart=");
    let check = line("ExecStartPre=");
    assert!(
        start.ends_with("run --config /etc/meshcast/meshcast.toml"),
        "{start}"
    );
    assert!(
        check.ends_with("check-config /etc/meshcast/meshcast.toml"),
        "{check}"
    );
    assert_eq!(line("KillSignal="), "SIGTERM");
    assert_eq!(line("ExecReload="), "/bin/kill -HUP $MAINPID");
    // Every file the examples README lists exists.
    let readme = std::fs::read_to_string(root.join("examples/README.md")).unwrap();
    for name in readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
    {
        assert!(
            root.join("examples").join(name).exists(),
            "examples/README.md lists {name}"
        );
    }
}
