//! Namespaces as tenants, against real nodes and real clients (ffmpeg, ffprobe): each
//! namespace's own keys, limits, egress rules and recording root, the namespace-scoped
//! admin API, `namespaces.strict`, and a namespace kept to its region.

mod common;

use std::time::Duration;

use common::flv_watch::FlvWatcher;
use common::http::{http_get_bearer, http_raw};
use common::*;
use meshcast::auth::{Action, Claims};
use serde_json::Value;

const NODE_SECRET: &str = "namespaces-node-secret-0123";
const A_SECRET: &str = "namespaces-tenant-a-secret-0123";

fn mint(secret: &str, act: Action, streams: &[&str], ns: Option<&str>) -> String {
    let ns = ns.map(str::to_string);
    sign(
        secret,
        &Claims {
            ns,
            ..claims(act, streams)
        },
    )
}

/// The `stream` names an admin token lists.
fn listed(node: &NodeProc, token: &str) -> Vec<String> {
    let (status, body) = http_get_bearer(node.http, "/api/v1/streams", Some(token)).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut names: Vec<String> = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn wait_listed(node: &NodeProc, stream: &str) {
    let admin = mint(NODE_SECRET, Action::Admin, &[], None);
    wait_until(Duration::from_secs(15), stream, || {
        listed(node, &admin).iter().any(|s| s == stream)
    });
}

fn status_of(node: &NodeProc, method: &str, path: &str, token: &str) -> (u16, String) {
    let (status, _, body) = http_raw(
        node.http,
        method,
        path,
        &format!("Authorization: Bearer {token}\r\n"),
        "",
    )
    .unwrap();
    (status, body)
}

#[test]
fn namespaces_keep_their_tokens_limits_listings_and_recordings_apart() {
    let node = NodeProc::start(NodeSpec {
        extra: format!(
            r#"
[auth]
secrets = ["{NODE_SECRET}"]

[namespaces]
strict = true

[[namespace]]
name = "tenant-a"
recording_root = "rec-a"
auth = {{ secrets = ["{A_SECRET}"] }}
limits = {{ max_streams = 1, max_viewers = 1 }}
[[namespace.egress]]
kind = "record"
format = "flv"

[[namespace]]
name = "tenant-b"

[[namespace]]
name = "capped"
limits = {{ max_bitrate_kbps = 150 }}
"#
        ),
        ..NodeSpec::standalone()
    });
    let rtmp = |path: &str, token: &str| format!("rtmp://{}/{path}?token={token}", node.rtmp);
    let a_publish = mint(A_SECRET, Action::Publish, &["*"], None);
    let node_publish = mint(NODE_SECRET, Action::Publish, &["*"], None);

    // Tenant A publishes with its own key; the node's key is nothing there, and A's is
    // nothing in tenant B.
    let (ok, err) = short_publish(&rtmp("tenant-a/cam", &node_publish));
    assert!(
        !ok && err.contains("signature"),
        "node token in tenant-a: {err}"
    );
    let _a = Publisher::start(&rtmp("tenant-a/cam", &a_publish), PublishOpts::default());
    wait_listed(&node, "tenant-a/cam");
    let (ok, err) = short_publish(&rtmp("tenant-b/cam", &a_publish));
    assert!(
        !ok && err.contains("signature"),
        "A's token in tenant-b: {err}"
    );
    let _b = Publisher::start(&rtmp("tenant-b/cam", &node_publish), PublishOpts::default());
    wait_listed(&node, "tenant-b/cam");
    // Strict: a namespace nobody declared is refused.
    let (ok, err) = short_publish(&rtmp("other/cam", &node_publish));
    assert!(
        !ok && err.contains("not served"),
        "undeclared namespace: {err}"
    );
    // Tenant A's stream limit.
    let (ok, err) = short_publish(&rtmp("tenant-a/two", &a_publish));
    assert!(
        !ok && err.contains("stream limit"),
        "second stream in tenant-a: {err}"
    );

    // Playback: A's play token plays A; the node's does not. One viewer is A's limit.
    let a_play = mint(A_SECRET, Action::Play, &["tenant-a/*"], None);
    let flv = |path: &str, t: &str| format!("http://{}/{path}.flv?token={t}", node.http);
    let node_play = mint(NODE_SECRET, Action::Play, &["*"], None);
    let (ok, _, packets) = try_probe(&flv("tenant-a/cam", &node_play), 2);
    assert!(!ok || packets == 0, "tenant-a played with the node's token");
    let watcher = FlvWatcher::start(node.http, &format!("/tenant-a/cam.flv?token={a_play}"));
    wait_until(Duration::from_secs(10), "the first viewer plays", || {
        !watcher.media(9).is_empty()
    });
    let (ok, err, packets) = try_probe(&flv("tenant-a/cam", &a_play), 2);
    assert!(
        !ok || packets == 0,
        "a second viewer of tenant-a: {packets} packets, {err}"
    );
    drop(watcher);
    let (ok, err, packets) = try_probe(&flv("tenant-a/cam", &a_play), 2);
    assert!(
        ok && packets > 30,
        "tenant-a with its play token: {packets}, {err}"
    );
    let (ok, err, packets) = try_probe(&flv("tenant-b/cam", &node_play), 2);
    assert!(
        ok && packets > 30,
        "tenant-b with the node's token: {packets}, {err}"
    );

    // The admin API: A's admin token sees and touches tenant-a only; a node token claiming
    // tenant-b sees tenant-b only; the node's admin sees everything.
    let a_admin = mint(A_SECRET, Action::Admin, &[], None);
    let b_admin = mint(NODE_SECRET, Action::Admin, &[], Some("tenant-b"));
    let node_admin = mint(NODE_SECRET, Action::Admin, &[], None);
    assert_eq!(listed(&node, &a_admin), ["tenant-a/cam"]);
    assert_eq!(listed(&node, &b_admin), ["tenant-b/cam"]);
    assert_eq!(listed(&node, &node_admin), ["tenant-a/cam", "tenant-b/cam"]);
    let (status, body) = status_of(&node, "GET", "/api/v1/cluster", &a_admin);
    assert_eq!(status, 403, "cluster for a namespace admin: {body}");
    let (status, body) = status_of(&node, "GET", "/api/v1/rooms", &a_admin);
    assert_eq!(status, 403, "rooms for a namespace admin: {body}");
    let (status, body) = status_of(&node, "DELETE", "/api/v1/streams/tenant-b/cam", &a_admin);
    assert_eq!(status, 403, "kick in another namespace: {body}");
    // Tenant A's record rule is its egress; B's admin does not see it.
    let egress = |t: &str| {
        let (status, body) = status_of(&node, "GET", "/api/v1/egress", t);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["egress"].as_array().unwrap().clone()
    };
    let a_jobs = egress(&a_admin);
    assert_eq!(a_jobs.len(), 1, "{a_jobs:?}");
    assert_eq!(a_jobs[0]["stream"], "tenant-a/cam");
    assert!(egress(&b_admin).is_empty());
    let id = a_jobs[0]["id"].as_str().unwrap();
    let (status, _) = status_of(&node, "GET", &format!("/api/v1/egress/{id}"), &b_admin);
    assert_eq!(status, 404);
    let (status, body) = status_of(&node, "DELETE", "/api/v1/streams/tenant-a/cam", &a_admin);
    assert_eq!(status, 204, "{body}");

    // The recording went under tenant A's own root.
    wait_until(Duration::from_secs(10), "tenant-a's recording", || {
        files_under(&node.dir.join("rec-a")).iter().any(|f| {
            let f = f.display().to_string();
            f.contains("cam") && f.ends_with(".flv")
        })
    });
    assert!(
        !files_under(&node.dir.join("recordings"))
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "flv")),
        "tenant-a recorded under the node's root"
    );

    // A publisher over its namespace's bitrate is stopped (the test pattern at 640x360 is
    // far above 150 kbit/s).
    let (ok, err) = short_publish(&rtmp("capped/cam", &node_publish));
    assert!(!ok, "a publish over capped's bitrate ran to its end: {err}");
    wait_until(
        Duration::from_secs(5),
        "the bitrate refusal counted",
        || node.metric("meshcast_refused_total{protocol=\"publish\",why=\"bitrate\"}") >= 1.0,
    );
    assert!(node.log().contains("150 kbit/s"), "{}", node.log());
}

#[test]
fn a_namespace_kept_to_its_region_is_not_pulled_from_another() {
    let namespaces =
        "\n[[namespace]]\nname = \"local\"\nrelay = false\n[[namespace]]\nname = \"live\"\n";
    let quic: Vec<_> = (0..3).map(|_| node_addr()).collect();
    let origin = |id: &str, region: &str, i: usize| {
        let mut spec = NodeSpec::origin(id);
        spec.region = region.into();
        spec.upstreams = quic
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| *a)
            .collect();
        spec.extra = namespaces.into();
        NodeProc::start_at(spec, quic[i])
    };
    let eu = origin("eu-1", "eu", 0);
    let eu2 = origin("eu-2", "eu", 1);
    let us = origin("us-1", "us", 2);
    for n in [&eu, &eu2, &us] {
        n.wait_for_link_count(4);
    }
    let _local = Publisher::start(
        &format!("rtmp://{}/local/cam", eu.rtmp),
        PublishOpts::default(),
    );
    let _live = publish_and_wait(&eu.rtmp_url("cam"), &eu, "cam", PublishOpts::default());
    wait_listed_open(&eu, "local/cam");
    let flv = |n: &NodeProc, path: &str| format!("http://{}/{path}.flv", n.http);

    // The same region pulls it; another region does not, though it pulls `live`.
    let (ok, err, packets) = try_probe(&flv(&eu2, "local/cam"), 2);
    assert!(ok && packets > 30, "local/cam in eu-2: {packets}, {err}");
    let (ok, err, packets) = try_probe(&flv(&us, "live/cam"), 2);
    assert!(ok && packets > 30, "live/cam in us-1: {packets}, {err}");
    let (ok, err, packets) = try_probe(&flv(&us, "local/cam"), 2);
    assert!(
        !ok && packets == 0,
        "local/cam reached us-1: {packets}, {err}"
    );
    // It was never announced to the other region: us-1's directory lacks it.
    let (_, body) = http_get_bearer(us.http, "/api/v1/cluster", None).unwrap();
    let cluster: Value = serde_json::from_str(&body).unwrap();
    let directory: Vec<&str> = cluster["directory"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["stream"].as_str())
        .collect();
    assert!(directory.contains(&"live/cam"), "{directory:?}");
    assert!(!directory.contains(&"local/cam"), "{directory:?}");
}

/// Waits until a node without auth lists `stream`.
fn wait_listed_open(node: &NodeProc, stream: &str) {
    wait_until(Duration::from_secs(15), stream, || {
        node.streams().iter().any(|s| s["stream"] == stream)
    });
}
