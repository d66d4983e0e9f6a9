//! The cluster under failure: real meshcast processes on loopback, real ffmpeg publishers,
//! viewers that keep one connection for the whole test.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::flv_watch::{longest_gap, timestamp_faults, FlvWatcher};
use common::*;

// These tests kill nodes and measure freezes: `one_at_a_time` keeps 2 cores honest.

/// Origins meshed with each other (every origin lists all the others), links up.
fn mesh(ids: &[&str]) -> Vec<NodeProc> {
    let addrs: Vec<SocketAddr> = ids.iter().map(|_| node_addr()).collect();
    let nodes: Vec<NodeProc> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut spec = NodeSpec::origin(id);
            spec.upstreams = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| *a)
                .collect();
            NodeProc::start_at(spec, addrs[i])
        })
        .collect();
    for n in &nodes {
        // One link each way with every other origin.
        n.wait_for_link_count(2 * (ids.len() - 1));
    }
    nodes
}

/// Origins A, B, C meshed, and an edge that prefers B, then C; links up.
fn three_origins_and_an_edge() -> (Vec<NodeProc>, NodeProc) {
    three_origins_and_an_edge_with("")
}

/// [`three_origins_and_an_edge`] with `extra` in the edge's `[backbone]` section.
fn three_origins_and_an_edge_with(extra: &str) -> (Vec<NodeProc>, NodeProc) {
    let origins = mesh(&["origin-a", "origin-b", "origin-c"]);
    let mut spec = NodeSpec::edge("edge-1", vec![origins[1].quic, origins[2].quic]);
    spec.extra = extra.into();
    let edge = NodeProc::start(spec);
    edge.wait_for_link_count(2);
    (origins, edge)
}

fn source_node(node: &NodeProc, name: &str) -> Option<String> {
    node.stream(name)
        .and_then(|s| s["source"]["node"].as_str().map(str::to_string))
}

fn outbound_to(node: &NodeProc, peer: &str) -> bool {
    node.links()
        .iter()
        .any(|l| l["node"] == peer && l["direction"] == "outbound")
}

/// As WebRTC publishers send (no B-frames: RTP time runs forward packet by packet), long
/// enough to outlast the test.
fn failover_publish() -> PublishOpts {
    PublishOpts {
        seconds: 60,
        gop: 30,
        bframes: 0,
        ..Default::default()
    }
}

type WhepViewer = std::thread::JoinHandle<
    Result<meshcast::webrtc::client::WhepStats, meshcast::webrtc::client::WhepClientError>,
>;

/// An HTTP-FLV viewer and a WHEP viewer of `live/{name}` on `edge`, each one connection
/// for the whole test, both playing when this returns.
fn watch(edge: &NodeProc, name: &str, whep_for: Duration) -> (FlvWatcher, WhepViewer) {
    let watcher = FlvWatcher::start(edge.http, &format!("/live/{name}.flv"));
    let (http, path) = (edge.http, format!("/whep/live/{name}"));
    let whep = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(meshcast::webrtc::client::play(http, &path, whep_for))
    });
    wait_until(Duration::from_secs(10), "edge viewer gets video", || {
        watcher.media(9).len() >= 60
    });
    // Let the WebRTC viewer connect and play a little first.
    std::thread::sleep(Duration::from_millis(1500));
    (watcher, whep)
}

fn cluster_view(node: &NodeProc) -> serde_json::Value {
    let (status, body) = http_get(node.http, "/api/v1/cluster").expect("cluster API");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("cluster JSON")
}

/// The link to `node` in a `/api/v1/cluster` view.
fn link_to<'a>(view: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    view["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["node"] == node)
        .unwrap_or_else(|| panic!("no link to {node}: {view}"))
}

/// What `/api/v1/cluster` and the per-link metrics show with `live/fo` published on A and
/// watched on the edge through B.
fn check_cluster_view(a: &NodeProc, b: &NodeProc, edge: &NodeProc) {
    let on_edge = cluster_view(edge);
    assert_eq!(on_edge["node"]["role"], "edge", "{on_edge}");
    // Which origin serves the edge, per stream.
    let pulls = on_edge["pulls"].as_array().unwrap();
    assert!(
        pulls
            .iter()
            .any(|p| p["stream"] == "live/fo" && p["upstream"] == "origin-b"),
        "{on_edge}"
    );
    // Links carry measured RTT and transport counters.
    let to_b = link_to(&on_edge, "origin-b");
    assert!(to_b["rtt_ms"].as_f64().unwrap() > 0.0, "{to_b}");
    assert!(to_b["sent_packets"].as_u64().unwrap() > 0, "{to_b}");
    assert!(
        to_b["received_bytes"].as_u64().unwrap() > 100_000,
        "media came over it: {to_b}"
    );
    assert!(to_b["loss"].as_f64().unwrap() < 0.5, "{to_b}");
    // B's directory knows A publishes it; A lists it as published there.
    let on_b = cluster_view(b);
    let dir = on_b["directory"].as_array().unwrap();
    assert!(
        dir.iter()
            .any(|d| d["stream"] == "live/fo" && d["origin"] == "origin-a"),
        "{on_b}"
    );
    let on_a = cluster_view(a);
    assert!(
        on_a["published"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "live/fo"),
        "{on_a}"
    );
    // The same figures per link in Prometheus.
    let label = r#"{peer="origin-b",direction="outbound"}"#;
    assert!(edge.metric(&format!("meshcast_backbone_link_rtt_seconds{label}")) > 0.0);
    assert!(
        edge.metric(&format!(
            "meshcast_backbone_link_received_bytes_total{label}"
        )) > 100_000.0
    );
}

/// The largest step forward between consecutive tags' timestamps, in ms.
fn largest_step(tags: &[common::flv_watch::Tag]) -> u32 {
    tags.windows(2)
        .map(|w| w[1].ts_ms.saturating_sub(w[0].ts_ms))
        .max()
        .unwrap_or(0)
}

#[test]
fn edge_keeps_its_viewers_when_its_origin_is_killed() {
    let _serial = one_at_a_time();
    let (origins, edge) = three_origins_and_an_edge();
    let (a, b, c) = (&origins[0], &origins[1], &origins[2]);

    let _publisher = publish_and_wait(&a.rtmp_url("fo"), a, "fo", failover_publish());
    let (watcher, whep) = watch(&edge, "fo", Duration::from_secs(9));
    assert_eq!(source_node(&edge, "fo").as_deref(), Some("origin-b"));
    check_cluster_view(a, b, &edge);

    let killed = Instant::now();
    b.signal("KILL");

    // The edge moves to C within the link timeout and a re-subscribe.
    wait_until(Duration::from_secs(5), "edge re-homed to origin-c", || {
        source_node(&edge, "fo").as_deref() == Some("origin-c")
    });
    let rehomed = killed.elapsed();
    // Origins notice B's death by silence, not the QUIC idle timeout.
    wait_until(
        Duration::from_secs(3),
        "A and C close their links to B",
        || !outbound_to(a, "origin-b") && !outbound_to(c, "origin-b"),
    );
    let noticed = killed.elapsed();
    // Let media flow from C for a while.
    let resumed_at = Instant::now();
    wait_until(Duration::from_secs(5), "video flows again", || {
        watcher.video_after(resumed_at) >= 60
    });
    std::thread::sleep(Duration::from_secs(1));

    assert_eq!(
        watcher.ended(),
        None,
        "the viewer's connection must stay open"
    );
    let video = watcher.media(9);
    let audio = watcher.media(8);
    let (gap, after) = longest_gap(&video, killed - Duration::from_millis(100));
    eprintln!(
        "re-homed after {rehomed:?}, links to B closed after {noticed:?}; longest video gap \
         {gap:?}, resumed with {after:?}; {} video / {} audio tags",
        video.len(),
        audio.len()
    );
    let step = largest_step(&video);
    eprintln!("largest video timestamp step over HTTP-FLV: {step} ms");
    // Frames made while the edge was cut off are skipped (it resumes at the live keyframe
    // when the new origin no longer caches them), so time may step forward, but by no more
    // than the freeze lasted: the viewer's clock and the stream's stay together.
    assert!(
        Duration::from_millis(step as u64) <= gap + Duration::from_millis(200),
        "video time stepped {step} ms over a {gap:?} freeze"
    );
    assert!(
        gap <= Duration::from_millis(1500),
        "video froze for {gap:?} (target ~1 s)"
    );
    // Same publish, so timestamps run on: nothing twice, nothing back, no big jump.
    let vf = timestamp_faults(&video, 0, 1000);
    assert!(vf.is_empty(), "video timestamps broke at {vf:?}");
    let af = timestamp_faults(&audio, 0, 1000);
    assert!(af.is_empty(), "audio timestamps broke at {af:?}");
    let strictly = video.windows(2).all(|w| w[1].ts_ms > w[0].ts_ms);
    assert!(strictly, "a video frame came twice");
    assert!(edge.metric("meshcast_backbone_rehomes_total") >= 1.0);

    let w = whep.join().unwrap().expect("WHEP viewer ran");
    eprintln!("WHEP viewer: {w:?}");
    assert!(w.connected && w.audio_packets > 0);
    assert!(
        w.max_video_gap <= Duration::from_millis(1500),
        "WHEP video froze for {:?}",
        w.max_video_gap
    );
    assert_eq!(w.video_time_backwards, 0, "WHEP video time went back");
    assert!(w.max_video_time_step_ms <= 1000, "WHEP video time jumped");
    assert!(a.metric("meshcast_backbone_links_timed_out_total") >= 1.0);
}

#[test]
fn viewers_stay_when_the_publishers_origin_dies_and_it_republishes_elsewhere() {
    let _serial = one_at_a_time();
    let (origins, edge) = three_origins_and_an_edge();
    let (a, b, c) = (&origins[0], &origins[1], &origins[2]);
    let first = publish_and_wait(&a.rtmp_url("pf"), a, "pf", failover_publish());
    let (watcher, whep) = watch(&edge, "pf", Duration::from_secs(10));
    // A second edge hangs off C, so C relays the stream when the publisher comes to it.
    let edge_c = NodeProc::start(NodeSpec::edge("edge-c", vec![c.quic]));
    edge_c.wait_for_link_count(1);
    let watcher_c = FlvWatcher::start(edge_c.http, "/live/pf.flv");
    wait_until(Duration::from_secs(10), "edge-c viewer gets video", || {
        watcher_c.media(9).len() >= 30
    });
    assert_eq!(source_node(c, "pf").as_deref(), Some("origin-a"));

    // The publisher's origin dies; the publisher (as OBS does with a backup server, or
    // after asking the route API) publishes again to origin C.
    let killed = Instant::now();
    a.signal("KILL");
    drop(first);
    let second = Publisher::start(&c.rtmp_url("pf"), failover_publish());
    let resumed_at = Instant::now();
    // The dead origin's announce is gone from every directory within the bound (3 s).
    wait_until(
        Duration::from_secs(3),
        "origin-a's streams leave the directories",
        || {
            [b, c].iter().all(|n| {
                let view = cluster_view(n);
                view["directory"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|d| d["origin"] != "origin-a")
            })
        },
    );
    let gone = killed.elapsed();
    assert!(
        gone <= Duration::from_millis(3200),
        "directories kept origin-a for {gone:?}"
    );
    wait_until(Duration::from_secs(10), "video flows again", || {
        watcher.video_after(resumed_at) >= 60
    });
    let republished = killed.elapsed();
    std::thread::sleep(Duration::from_secs(1));

    assert_eq!(
        watcher.ended(),
        None,
        "the viewer's connection must stay open"
    );
    // B, which serves the edge, found the stream on C: the edge never saw a change.
    assert_eq!(source_node(b, "pf").as_deref(), Some("origin-c"));
    assert_eq!(source_node(&edge, "pf").as_deref(), Some("origin-b"));
    let video = watcher.media(9);
    let audio = watcher.media(8);
    let (gap, _) = longest_gap(&video, killed - Duration::from_millis(100));
    let step = largest_step(&video);
    eprintln!(
        "video again {republished:?} after the kill; origin-a out of the directories after \
         {gone:?}; longest video gap {gap:?}; largest timestamp step {step} ms; {} video / {} \
         audio tags",
        video.len(),
        audio.len()
    );
    // The freeze is the origin's death being noticed plus a new ffmpeg starting.
    assert!(gap <= Duration::from_secs(4), "video froze for {gap:?}");
    // A new publish session is spliced on: time never goes back, and moves forward by no
    // more than the freeze.
    assert!(
        video.windows(2).all(|w| w[1].ts_ms > w[0].ts_ms),
        "video time went back or repeated"
    );
    assert!(
        audio.windows(2).all(|w| w[1].ts_ms >= w[0].ts_ms),
        "audio time went back"
    );
    assert!(
        Duration::from_millis(step as u64) <= gap + Duration::from_millis(200),
        "video time stepped {step} ms over a {gap:?} freeze"
    );
    assert!(b.metric("meshcast_backbone_rehomes_total") >= 1.0);

    // C took the publish although it relayed the name, and its relay's viewers (edge-c)
    // carried on from the new publish.
    assert_eq!(
        c.stream("pf").map(|s| s["source"]["kind"].clone()),
        Some(serde_json::json!("local"))
    );
    assert_eq!(watcher_c.ended(), None, "edge-c's viewer stays connected");
    let video_c = watcher_c.media(9);
    let (gap_c, _) = longest_gap(&video_c, killed - Duration::from_millis(100));
    eprintln!("edge-c (via C's relay, then C's own publish): longest video gap {gap_c:?}");
    assert!(
        gap_c <= Duration::from_secs(4),
        "edge-c froze for {gap_c:?}"
    );
    assert!(video_c.windows(2).all(|w| w[1].ts_ms > w[0].ts_ms));
    assert!(watcher_c.video_after(resumed_at) >= 30);

    let w = whep.join().unwrap().expect("WHEP viewer ran");
    eprintln!("WHEP viewer: {w:?}");
    assert!(w.connected && w.audio_packets > 0);
    assert!(w.max_video_gap <= Duration::from_secs(4), "{w:?}");
    assert_eq!(
        w.video_time_backwards, 0,
        "WHEP video time went back: {w:?}"
    );
    drop(second);
}

#[test]
fn a_stream_crosses_a_lossy_long_link_between_origins_without_a_gap_longer_than_a_gop() {
    // 75 ms each way (150 ms RTT), 10 ms jitter (which reorders), 2% loss each way.
    crosses_an_impaired_link(75, 10, 0.02, (120.0, 250.0));
}

#[test]
fn a_stream_crosses_a_long_link_losing_five_percent_each_way_without_a_gap_longer_than_a_gop() {
    // 75 ms each way, 10 ms jitter, 5% loss each way: the worst the issue names.
    crosses_an_impaired_link(75, 10, 0.05, (120.0, 260.0));
}

/// Origin C reaches origin A only through a user-space impaired link (`delay_ms` each
/// way, `jitter_ms`, `loss` each way); an edge on C plays A's stream for 12 s.
fn crosses_an_impaired_link(delay_ms: u64, jitter_ms: u64, loss: f64, rtt_ms: (f64, f64)) {
    let _serial = one_at_a_time();
    let a_quic = node_addr();
    let a = NodeProc::start_at(NodeSpec::origin("origin-a"), a_quic);
    let lossy = common::impair::Impairment {
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(jitter_ms),
        loss,
        ..Default::default()
    };
    let link = common::impair::Relay::start(a_quic, lossy, lossy);
    let mut spec_c = NodeSpec::origin("origin-c");
    spec_c.upstreams = vec![link.addr];
    let c = NodeProc::start_at(spec_c, node_addr());
    let edge = NodeProc::start(NodeSpec::edge("edge-c1", vec![c.quic]));
    a.wait_for_link_count(1);
    c.wait_for_link_count(2);
    edge.wait_for_link_count(1);

    // One GOP is 1 s (30 frames at 30 fps).
    let _publisher = publish_and_wait(&a.rtmp_url("far"), &a, "far", failover_publish());
    // The viewer asks at once, most likely before the announce has crossed the impaired
    // link: C holds the edge's request until it arrives (`limits.play_wait_ms`).
    let watcher = FlvWatcher::start(edge.http, "/live/far.flv");
    wait_until(Duration::from_secs(15), "edge viewer gets video", || {
        watcher.media(9).len() >= 30
    });
    let watching = Instant::now();
    std::thread::sleep(Duration::from_secs(12));

    assert_eq!(watcher.ended(), None);
    let video = watcher.media(9);
    let (gap, _) = longest_gap(&video, watching);
    let played = video.iter().filter(|t| t.at > watching).count();
    let view = cluster_view(&c);
    let to_a = link_to(&view, "origin-a");
    let ((up_passed, up_dropped), (down_passed, down_dropped)) =
        (link.up.counts(), link.down.counts());
    let (passed, dropped) = (up_passed + down_passed, up_dropped + down_dropped);
    eprintln!(
        "lossy link: {passed} datagrams passed, {dropped} dropped; C's view of it: {to_a}; \
         {played} video frames in 12 s, longest gap {gap:?}; groups dropped by A: {}",
        a.metric("meshcast_backbone_groups_dropped_total")
    );
    assert!(
        gap <= Duration::from_secs(1),
        "video froze for {gap:?}, longer than a GOP"
    );
    assert!(played >= 300, "{played} video frames in 12 s (30 fps sent)");
    assert!(
        video.windows(2).all(|w| w[1].ts_ms > w[0].ts_ms),
        "video time went back or repeated"
    );
    // The link's RTT is measured, not configured; its losses are seen.
    let rtt = to_a["rtt_ms"].as_f64().unwrap();
    assert!(
        (rtt_ms.0..=rtt_ms.1).contains(&rtt),
        "RTT {rtt} ms over a {} ms RTT link",
        2 * delay_ms
    );
    assert!(to_a["lost_packets"].as_u64().unwrap() > 0, "{to_a}");
    assert!(dropped > 0);
    // Loss and delay are not death: the link stayed up the whole time.
    assert_eq!(c.metric("meshcast_backbone_links_timed_out_total"), 0.0);
}

/// `configs/cluster-3region/run.sh`, stopped with SIGTERM (its trap stops every node).
struct ThreeRegions(std::process::Child);

impl Drop for ThreeRegions {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        // The script's trap stops its nodes; if that does not end within 20 s, the script
        // is killed with its process group (its nodes).
        let _ = common::bounded::wait_or_kill_group(&mut self.0, Duration::from_secs(20));
    }
}

#[test]
fn the_three_region_example_cluster_runs_from_its_script() {
    use std::os::unix::process::CommandExt;
    let _serial = one_at_a_time();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/cluster-3region/run.sh"
    );
    let _cluster = ThreeRegions(
        std::process::Command::new("bash")
            .args([script, BIN.as_str()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own group, so a script that will not stop can be killed with its nodes.
            .process_group(0)
            .spawn()
            .expect("run.sh"),
    );
    let http = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    // Each origin links to the two others both ways and to its own and the other edges.
    wait_until(
        Duration::from_secs(20),
        "the mesh and the edges are up",
        || {
            [9080, 9081, 9082].iter().all(|&p| {
                http_get(http(p), "/api/v1/links")
                    .ok()
                    .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v["links"].as_array().is_some_and(|l| l.len() >= 7))
            })
        },
    );
    // Publish in us, watch in ap: ap's edge pulls through its own region's origin.
    let _publisher = Publisher::start("rtmp://127.0.0.1:2935/live/world", PublishOpts::default());
    wait_until(Duration::from_secs(15), "published in us", || {
        http_get(http(9080), "/api/v1/streams").is_ok_and(|(_, b)| b.contains("live/world"))
    });
    wait_until(Duration::from_secs(5), "ap's origin knows it", || {
        http_get(http(9082), "/api/v1/cluster").is_ok_and(|(_, b)| b.contains("live/world"))
    });
    let probe = ffprobe("http://127.0.0.1:9092/live/world.flv", 3);
    assert_synthetic_stream(&probe, 3);
    let (_, body) = http_get(http(9092), "/api/v1/cluster").unwrap();
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["node"]["region"], "ap", "{view}");
    assert!(
        view["pulls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["stream"] == "live/world" && p["upstream"] == "origin-ap"),
        "the ap edge is served by the ap origin: {view}"
    );
}

/// Whether `node`'s directory names `owner` as the publisher of `live/{name}`.
fn directory_names(node: &NodeProc, name: &str, owner: &str) -> bool {
    cluster_view(node)["directory"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["stream"] == format!("live/{name}") && d["origin"] == owner)
}

#[test]
fn two_publishers_racing_for_one_name_on_two_origins_leave_exactly_one_winner() {
    let _serial = one_at_a_time();
    // Origins A and B reach each other only through 150 ms (one way) links, so two
    // publishers that start together both get in before either origin hears of the other.
    let a_quic = node_addr();
    let b_quic = node_addr();
    let far = common::impair::Impairment {
        delay: Duration::from_millis(150),
        ..Default::default()
    };
    let to_b = common::impair::Relay::start(b_quic, far, far);
    let to_a = common::impair::Relay::start(a_quic, far, far);
    let mut spec_a = NodeSpec::origin("origin-a");
    spec_a.upstreams = vec![to_b.addr];
    let mut spec_b = NodeSpec::origin("origin-b");
    spec_b.upstreams = vec![to_a.addr];
    let a = NodeProc::start_at(spec_a, a_quic);
    let b = NodeProc::start_at(spec_b, b_quic);
    a.wait_for_link_count(2);
    b.wait_for_link_count(2);
    let origins = [&a, &b];

    let opts = || PublishOpts {
        seconds: 30,
        ..Default::default()
    };
    let mut raced = 0;
    for round in 0..3 {
        let name = format!("race-{round}");
        let mut publishers = [
            Publisher::start(&a.rtmp_url(&name), opts()),
            Publisher::start(&b.rtmp_url(&name), opts()),
        ];
        std::thread::sleep(Duration::from_secs(3));
        let running: Vec<bool> = publishers
            .iter_mut()
            .map(|p| p.child.try_wait().unwrap().is_none())
            .collect();
        assert_eq!(
            running.iter().filter(|r| **r).count(),
            1,
            "round {round}: exactly one publisher keeps the name ({running:?})"
        );
        let winner = running.iter().position(|r| *r).unwrap();
        let (won, lost) = (origins[winner], origins[1 - winner]);
        let [p0, p1] = publishers;
        let (keep, loser) = if winner == 0 { (p0, p1) } else { (p1, p0) };
        let (ok, stderr) = loser.wait(Duration::from_secs(1));
        assert!(!ok, "the losing ffmpeg fails");
        // The loser is told why, in FFmpeg's own words ("Server error: ...").
        let told = if stderr.contains(&format!(
            "lost the publish race for live/{name} to {}",
            won.name
        )) {
            raced += 1;
            true
        } else {
            stderr.contains(&format!("live/{name} is already published on {}", won.name))
        };
        assert!(told, "round {round}: the loser's ffmpeg says why: {stderr}");
        // Both origins agree: the winner holds it, the other names the winner.
        assert_eq!(
            won.stream(&name).map(|s| s["source"]["kind"].clone()),
            Some(serde_json::json!("local"))
        );
        wait_until(
            Duration::from_secs(2),
            "the loser's origin names the winner",
            || directory_names(lost, &name, &won.name),
        );
        eprintln!(
            "round {round}: {} won ({})",
            won.name,
            if told && stderr.contains("race") {
                "race"
            } else {
                "refused at once"
            }
        );
        if round == 0 {
            // Viewers of the name on the loser's origin get the winner's stream.
            let p = ffprobe(&lost.flv_url(&name), 2);
            assert!(
                p.packets_of("video").len() >= 30,
                "video plays on the other origin"
            );
            assert_eq!(source_node(lost, &name).as_deref(), Some(won.name.as_str()));
            // Later publishers of a held name are refused at once, over RTMP and WHIP.
            let late = Publisher::start(&lost.rtmp_url(&name), opts());
            let (ok, stderr) = late.wait(Duration::from_secs(5));
            assert!(!ok);
            assert!(stderr.contains("is already published on"), "{stderr}");
            let (status, body) = whip_offer(lost, &name);
            assert_eq!(status, 409, "{body}");
            assert!(
                body.contains(&format!("already published on {}", won.name)),
                "{body}"
            );
        }
        drop(keep);
    }
    // With 150 ms between the origins, most rounds are real races; at least one must be.
    assert!(raced >= 1, "no round raced");
    let evicted: f64 = origins
        .iter()
        .map(|o| o.metric("meshcast_publishers_evicted_total"))
        .sum();
    assert_eq!(evicted, raced as f64);
}

/// A WHIP POST with a minimal offer: (status, body).
fn whip_offer(node: &NodeProc, name: &str) -> (u16, String) {
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
    let path = format!("/whip/live/{name}");
    common::http::http_send(node.http, "POST", &path, "application/sdp", sdp).expect("WHIP POST")
}

#[test]
fn edges_return_to_a_restarted_origin_without_interrupting_their_viewers() {
    let _serial = one_at_a_time();
    let (mut origins, edge) = three_origins_and_an_edge_with("return_after_ms = 1000");
    let (a_quic, b_quic, c_quic) = (origins[0].quic, origins[1].quic, origins[2].quic);
    let a = &origins[0];
    let _publisher = publish_and_wait(&a.rtmp_url("back"), a, "back", failover_publish());
    let (watcher, whep) = watch(&edge, "back", Duration::from_secs(16));
    assert_eq!(source_node(&edge, "back").as_deref(), Some("origin-b"));

    // B dies; the edge moves to C (the origin-SIGKILL test measures that freeze).
    origins[1].signal("KILL");
    wait_until(Duration::from_secs(5), "edge re-homed to origin-c", || {
        source_node(&edge, "back").as_deref() == Some("origin-c")
    });
    std::thread::sleep(Duration::from_secs(1));

    // B comes back on its old address and rejoins the mesh.
    let restarted = Instant::now();
    let mut spec_b = NodeSpec::origin("origin-b");
    spec_b.upstreams = vec![a_quic, c_quic];
    origins[1] = NodeProc::start_at(spec_b, b_quic);
    let (a, c) = (&origins[0], &origins[2]);
    wait_until(Duration::from_secs(5), "A and C link to B again", || {
        outbound_to(a, "origin-b") && outbound_to(c, "origin-b")
    });
    // Once B has been linked for return_after_ms, the edge moves back to it.
    wait_until(Duration::from_secs(10), "edge back on origin-b", || {
        source_node(&edge, "back").as_deref() == Some("origin-b")
    });
    let returned = restarted.elapsed();
    let back_at = Instant::now();
    wait_until(Duration::from_secs(5), "video flows from B", || {
        watcher.video_after(back_at) >= 45
    });

    assert_eq!(watcher.ended(), None, "the viewer's connection stays open");
    let video = watcher.media(9);
    let audio = watcher.media(8);
    let (gap, _) = longest_gap(&video, restarted);
    eprintln!(
        "back on origin-b {returned:?} after its restart; longest video gap since: {gap:?}; \
         C's links: {:?}",
        c.links().len()
    );
    // Make-before-break: no freeze beyond frame jitter, nothing twice, nothing back.
    assert!(
        gap <= Duration::from_millis(300),
        "video froze for {gap:?} while returning"
    );
    assert!(
        video.windows(2).all(|w| w[1].ts_ms > w[0].ts_ms),
        "a video frame came twice or time went back"
    );
    let vf = timestamp_faults(&video, 0, 1000);
    assert!(vf.is_empty(), "video timestamps broke at {vf:?}");
    let af = timestamp_faults(&audio, 0, 1000);
    assert!(af.is_empty(), "audio timestamps broke at {af:?}");
    assert_eq!(edge.metric("meshcast_backbone_returns_total"), 1.0);
    // The edge let go of its subscription on C.
    wait_until(Duration::from_secs(3), "C stops serving the edge", || {
        c.metric("meshcast_viewers{proto=\"backbone\"}") == 0.0
    });

    let w = whep.join().unwrap().expect("WHEP viewer ran");
    eprintln!("WHEP viewer: {w:?}");
    assert!(w.connected && w.audio_packets > 0);
    assert_eq!(w.video_time_backwards, 0, "WHEP video time went back");
    assert!(w.max_video_time_step_ms <= 1000, "WHEP video time jumped");
}

/// `/api/v1/route` on `node` for `live/{name}` from a client in `region`.
fn route(node: &NodeProc, name: &str, region: &str, action: &str) -> serde_json::Value {
    let path = format!("/api/v1/route?stream=live/{name}&region={region}&action={action}");
    let (status, body) = http_get(node.http, &path).expect("route API");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("route JSON")
}

fn candidates(route: &serde_json::Value) -> Vec<String> {
    route["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_route_api_sends_clients_to_the_nearest_then_least_loaded_edge_by_measured_rtt() {
    let _serial = one_at_a_time();
    // Origins us, eu, ap. us reaches eu at 30 ms and ap at 75 ms each way (user-space
    // relays, both directions); eu and ap are next to each other. Nobody configures these
    // distances: routing measures them.
    let quic: Vec<SocketAddr> = (0..3).map(|_| node_addr()).collect();
    let delay = |ms| common::impair::Impairment {
        delay: Duration::from_millis(ms),
        ..Default::default()
    };
    let us_eu = common::impair::Relay::start(quic[1], delay(30), delay(30));
    let eu_us = common::impair::Relay::start(quic[0], delay(30), delay(30));
    let us_ap = common::impair::Relay::start(quic[2], delay(75), delay(75));
    let ap_us = common::impair::Relay::start(quic[0], delay(75), delay(75));
    let peers = [
        vec![us_eu.addr, us_ap.addr],
        vec![eu_us.addr, quic[2]],
        vec![ap_us.addr, quic[1]],
    ];
    let origins: Vec<NodeProc> = ["us", "eu", "ap"]
        .iter()
        .enumerate()
        .map(|(i, region)| {
            let mut spec = NodeSpec::origin(&format!("origin-{region}"));
            spec.region = region.to_string();
            spec.upstreams = peers[i].clone();
            NodeProc::start_at(spec, quic[i])
        })
        .collect();
    for o in &origins {
        o.wait_for_link_count(4);
    }
    let edge = |id: &str, region: &str, origin: usize| {
        let mut spec = NodeSpec::edge(id, vec![quic[origin]]);
        spec.region = region.into();
        spec.node_extra = "max_viewers = 10".into();
        let e = NodeProc::start(spec);
        e.wait_for_link_count(1);
        e
    };
    let us1 = edge("edge-us1", "us", 0);
    let us2 = edge("edge-us2", "us", 0);
    let eu1 = edge("edge-eu1", "eu", 1);
    let ap1 = edge("edge-ap1", "ap", 2);
    // Every node learns every other (edges through their origin).
    wait_until(
        Duration::from_secs(10),
        "all 7 nodes known everywhere",
        || {
            [&us1, &ap1, &origins[1]]
                .iter()
                .all(|n| cluster_view(n)["nodes"].as_array().unwrap().len() == 7)
        },
    );

    // Where to publish, asked of an edge: an origin of the publisher's region.
    let to_publish = route(&ap1, "rt", "eu", "publish");
    assert_eq!(to_publish["node"]["node"], "origin-eu", "{to_publish}");
    let rtmp = to_publish["urls"]["rtmp"].as_str().unwrap().to_string();
    assert_eq!(rtmp, origins[1].rtmp_url("rt"));
    let _publisher = publish_and_wait(&rtmp, &origins[1], "rt", failover_publish());

    // Five viewers on us1 make it half full (max_viewers = 10): us2 is the better edge.
    let watchers: Vec<FlvWatcher> = (0..5)
        .map(|_| FlvWatcher::start(us1.http, "/live/rt.flv"))
        .collect();
    wait_until(
        Duration::from_secs(10),
        "us1 reports its five viewers",
        || {
            let r = route(&ap1, "rt", "us", "play");
            r["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["node"] == "edge-us1" && c["load"].as_f64().unwrap() >= 0.5)
        },
    );
    let r = route(&ap1, "rt", "us", "play");
    eprintln!("route for us: {r}");
    assert_eq!(
        candidates(&r),
        ["edge-us2", "edge-us1", "edge-eu1", "edge-ap1"],
        "same region by load, then eu (60 ms) before ap (150 ms)"
    );
    let cands = r["candidates"].as_array().unwrap();
    let eu_ms = cands[2]["dist_ms"].as_f64().unwrap();
    let ap_ms = cands[3]["dist_ms"].as_f64().unwrap();
    assert!((50.0..120.0).contains(&eu_ms), "us-eu measured {eu_ms} ms");
    assert!((130.0..250.0).contains(&ap_ms), "us-ap measured {ap_ms} ms");
    assert!(cands[1]["load"].as_f64().unwrap() >= 0.5);
    assert!(cands[1]["warm"].as_bool().unwrap(), "us1 has the stream");
    // Any node's /cluster shows which origin serves which edge, and each node's load.
    let view = cluster_view(&origins[2]);
    let us1_rec = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "edge-us1")
        .unwrap_or_else(|| panic!("{view}"));
    assert_eq!(
        us1_rec["pulls"],
        serde_json::json!([["origin-us", 1]]),
        "{us1_rec}"
    );
    assert_eq!(us1_rec["viewers"], 5, "{us1_rec}");
    assert!(us1_rec["out_bps"].as_u64().unwrap() > 100_000, "{us1_rec}");
    assert_eq!(view["regions"].as_array().unwrap().len(), 3, "{view}");

    // Any node redirects a player to that edge, and FFmpeg follows the 307.
    let (status, head, _) = common::http::http_exchange(
        origins[2].http,
        "GET",
        "/route/live/rt.flv?region=us",
        "text/plain",
        "",
    )
    .unwrap();
    assert_eq!(status, 307, "{head}");
    let location = common::http::header_value(&head, "location").unwrap();
    assert_eq!(location, format!("http://{}/live/rt.flv", us2.http));
    let probe = ffprobe(
        &format!("http://{}/route/live/rt.flv?region=us", origins[2].http),
        2,
    );
    assert!(
        probe.packets_of("video").len() >= 30,
        "played through the redirect"
    );
    // WHIP to an edge: 307 to an origin, offer and all.
    let sdp = "v=0\r\n";
    let (status, head, _) =
        common::http::http_exchange(eu1.http, "POST", "/whip/live/new", "application/sdp", sdp)
            .unwrap();
    assert_eq!(status, 307, "{head}");
    assert_eq!(
        common::http::header_value(&head, "location").unwrap(),
        format!("http://{}/whip/live/new", origins[1].http)
    );

    // Both us edges die: players from us go to the nearest region by RTT, eu.
    drop(watchers);
    us1.signal("KILL");
    us2.signal("KILL");
    wait_until(
        Duration::from_secs(8),
        "dead edges leave the routes",
        || candidates(&route(&ap1, "rt", "us", "play")) == ["edge-eu1", "edge-ap1"],
    );
}

/// FFmpeg sending a live H.264 (no B-frames, a keyframe every 20 s unless asked) + Opus
/// encode as RTP to two local ports, for a WHIP publisher to relay.
fn rtp_feeder(video: u16, audio: u16) -> Publisher {
    let child = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=15"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args([
            "-t",
            "40",
            "-map",
            "0:v",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .args([
            "-tune",
            "zerolatency",
            "-profile:v",
            "baseline",
            "-g",
            "300",
            "-bf",
            "0",
        ])
        .args([
            "-b:v",
            "150k",
            "-f",
            "rtp",
            "-payload_type",
            "96",
            "-pkt_size",
            "1100",
        ])
        .arg(format!("rtp://127.0.0.1:{video}"))
        .args(["-map", "1:a", "-c:a", "libopus", "-b:a", "32k", "-f", "rtp"])
        .args(["-payload_type", "111"])
        .arg(format!("rtp://127.0.0.1:{audio}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ffmpeg is installed");
    Publisher { child }
}

#[test]
fn a_hundred_edges_asking_for_a_keyframe_at_once_reach_the_publisher_once_per_interval() {
    let _serial = one_at_a_time();
    let origin = NodeProc::start(NodeSpec::origin("origin-a"));
    // A WHIP publisher (it can be asked for keyframes, unlike RTMP), relaying a live encode.
    let video = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let audio = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let feeder = rtp_feeder(
        video.local_addr().unwrap().port(),
        audio.local_addr().unwrap().port(),
    );
    let http = origin.http;
    let publisher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            video.set_nonblocking(true).unwrap();
            audio.set_nonblocking(true).unwrap();
            meshcast::webrtc::client::publish_rtp(
                http,
                "/whip/live/kf",
                tokio::net::UdpSocket::from_std(video).unwrap(),
                tokio::net::UdpSocket::from_std(audio).unwrap(),
                Duration::from_secs(14),
            )
            .await
        })
    });
    wait_until(Duration::from_secs(15), "WHIP stream live", || {
        origin.stream("kf").is_some_and(|s| !s["video"].is_null())
    });

    // A hundred edges in this process, each a real backbone node with its own hub and QUIC
    // link to the origin, each pulling the stream.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = meshcast::media::StreamKey::new("live", "kf").unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let edges: Vec<_> = rt.block_on(async {
        let mut edges = Vec::new();
        for i in 0..100 {
            let text = format!(
                "[node]\nid = \"edge-{i}\"\nrole = \"edge\"\n[backbone]\ntoken = \"{TEST_TOKEN}\"\norigins = [\"{}\"]\n",
                origin.quic
            );
            let config =
                meshcast::config::Config::parse(&text, "edge", std::path::Path::new(".")).unwrap();
            let metrics = std::sync::Arc::new(meshcast::metrics::Metrics::new());
            let hub = meshcast::hub::Hub::new(config.limits.clone(), metrics);
            let settings = meshcast::node::backbone_settings(&config, hub.metrics().clone());
            let bb = meshcast::backbone::Backbone::start(settings, hub.clone(), shutdown.clone())
                .unwrap();
            hub.set_upstream(bb.clone());
            edges.push((hub, bb));
        }
        edges
    });
    wait_until(Duration::from_secs(15), "100 edges linked", || {
        origin.links().len() >= 100
    });
    let subs: Vec<_> = rt.block_on(async {
        let mut subs = Vec::new();
        for (hub, _) in &edges {
            let sub = hub
                .subscribe(&key, meshcast::hub::Scope::Any)
                .await
                .expect("edge pulls the stream");
            subs.push(sub);
        }
        subs
    });
    // Let the pulls settle (their own start-up requests pass), then everyone asks at once.
    std::thread::sleep(Duration::from_secs(2));
    let received = |o: &NodeProc| o.metric("meshcast_keyframe_requests_received_total");
    let to_publisher =
        |o: &NodeProc| o.metric("meshcast_keyframe_requests_forwarded_total{to=\"publisher\"}");
    let (r0, p0) = (received(&origin), to_publisher(&origin));
    let burst = Instant::now();
    for sub in &subs {
        sub.request_keyframe();
    }
    let window = Duration::from_secs(3);
    std::thread::sleep(window);
    let (r1, p1) = (received(&origin), to_publisher(&origin));
    let sent_up: f64 = edges
        .iter()
        .map(|(hub, _)| hub.metrics().keyframe_requests_to_upstream.get() as f64)
        .sum();
    eprintln!(
        "in {:?}: the origin got {} keyframe requests and sent {} to the publisher; the edges \
         sent {sent_up} upstream in all",
        burst.elapsed(),
        r1 - r0,
        p1 - p0
    );
    assert!(r1 - r0 >= 100.0, "every edge's request reached the origin");
    // At most one per 500 ms interval reaches the publisher (the WHIP ingest also asks on
    // its own every 2 s, through the same gate).
    let bound = (window.as_secs_f64() / 0.5).floor() + 1.0;
    assert!(
        p1 - p0 <= bound,
        "{} requests to the publisher in {window:?}",
        p1 - p0
    );
    assert!(p1 - p0 >= 1.0, "the publisher was asked");

    drop(subs);
    shutdown.cancel();
    rt.block_on(async {
        for (_, bb) in &edges {
            bb.close().await;
        }
    });
    drop(edges);
    let stats = publisher.join().unwrap().expect("WHIP publisher ran");
    eprintln!("WHIP publisher: {stats:?}");
    assert!(stats.connected && stats.video_packets > 0);
    // The publisher's own count agrees: over its whole 14 s run, no more than one request
    // per interval.
    assert!(
        stats.keyframe_requests as f64 <= 14.0 / 0.5 + 1.0,
        "{} PLIs in 14 s",
        stats.keyframe_requests
    );
    drop(feeder);
}

fn local_on(node: &NodeProc, name: &str) -> bool {
    node.stream(name)
        .is_some_and(|s| s["source"]["kind"] == "local")
}

#[test]
fn a_publish_to_an_edge_is_forwarded_to_an_origin_and_moves_when_that_origin_dies() {
    let _serial = one_at_a_time();
    let mut origins = mesh(&["origin-a", "origin-b"]);
    let e1 = NodeProc::start(NodeSpec::edge(
        "edge-1",
        vec![origins[0].quic, origins[1].quic],
    ));
    let e2 = NodeProc::start(NodeSpec::edge(
        "edge-2",
        vec![origins[0].quic, origins[1].quic],
    ));
    e1.wait_for_link_count(2);
    e2.wait_for_link_count(2);
    wait_until(Duration::from_secs(10), "edge-1 knows both origins", || {
        cluster_view(&e1)["nodes"].as_array().unwrap().len() == 4
    });

    // ffmpeg publishes to the edge, which forwards it to an origin (RTMP cannot follow a
    // redirect, so the edge takes the publish itself).
    let _publisher = publish_and_wait(&e1.rtmp_url("fw"), &e1, "fw", failover_publish());
    wait_until(Duration::from_secs(10), "an origin publishes it", || {
        origins.iter().any(|o| local_on(o, "fw"))
    });
    let target = origins.iter().position(|o| local_on(o, "fw")).unwrap();
    let other = 1 - target;
    // It plays from the other edge (through the mesh) and from the edge it came in on.
    let p = ffprobe(&e2.flv_url("fw"), 2);
    assert!(p.packets_of("video").len() >= 45, "edge-2 plays it");
    assert!(p.stream_of("audio").is_some());
    let p = ffprobe(&e1.flv_url("fw"), 2);
    assert!(p.packets_of("video").len() >= 45, "edge-1 plays it");

    // The origin it went to dies: the forward moves to the other origin, and viewers of the
    // other edge get it again.
    let killed = Instant::now();
    origins[target].signal("KILL");
    let survivor = &origins[other];
    wait_until(Duration::from_secs(10), "the other origin takes it", || {
        local_on(survivor, "fw")
    });
    let moved = killed.elapsed();
    let p = ffprobe(&e2.flv_url("fw"), 2);
    eprintln!(
        "forward moved to {} {moved:?} after {} died",
        survivor.name, origins[target].name
    );
    assert!(p.packets_of("video").len() >= 45, "edge-2 plays it again");
    assert!(
        moved <= Duration::from_secs(3),
        "forward moved after {moved:?}"
    );

    // A second publisher of the name on the other edge: the origin refuses the forward, and
    // that publisher is told why.
    let late = Publisher::start(&e2.rtmp_url("fw"), failover_publish());
    let (ok, stderr) = late.wait(Duration::from_secs(10));
    assert!(!ok, "the second publisher is stopped");
    eprintln!("the second publisher was told: {}", stderr.trim());
    assert!(stderr.contains("already"), "it is told why: {stderr}");
    assert!(local_on(survivor, "fw"), "the first publish carries on");
    origins.remove(target);
}

#[test]
fn a_publish_to_an_edge_waits_for_an_origin_and_is_forwarded_when_one_comes_up() {
    let _serial = one_at_a_time();
    // The edge's only origin is not running yet.
    let origin_quic = node_addr();
    let edge = NodeProc::start(NodeSpec::edge("edge-1", vec![origin_quic]));
    let _publisher = publish_and_wait(&edge.rtmp_url("early"), &edge, "early", failover_publish());
    // Its local viewers are served meanwhile.
    let p = ffprobe(&edge.flv_url("early"), 1);
    assert!(
        p.packets_of("video").len() >= 20,
        "the edge plays its own publish"
    );

    // The origin comes up: the edge links to it and the publish is forwarded, without the
    // publisher doing anything.
    let up = Instant::now();
    let origin = NodeProc::start_at(NodeSpec::origin("origin-a"), origin_quic);
    wait_until(Duration::from_secs(15), "the origin publishes it", || {
        local_on(&origin, "early")
    });
    eprintln!("forwarded {:?} after the origin came up", up.elapsed());
    let p = ffprobe(&origin.flv_url("early"), 2);
    assert!(p.packets_of("video").len() >= 45, "the origin plays it");
}
