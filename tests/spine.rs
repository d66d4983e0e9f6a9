//! The spine, end to end with real clients: ffmpeg publishes over RTMP, ffprobe reads over
//! RTMP and HTTP-FLV from a standalone node, from an edge, and across two origins + an edge.

mod common;

use std::time::Duration;

use common::flv_watch::{longest_gap, timestamp_faults, FlvWatcher};
use common::*;

#[test]
fn standalone_serves_rtmp_and_flv_with_bframes() {
    let node = NodeProc::start(NodeSpec::standalone());
    let _p = publish_and_wait(
        &node.rtmp_url("demo"),
        &node,
        "demo",
        PublishOpts::default(),
    );
    let rtmp = ffprobe(&node.rtmp_url("demo"), 3);
    assert_synthetic_stream(&rtmp, 3);
    // B-frames came through: some packets are presented after later-decoded ones.
    let video = rtmp.packets_of("video");
    assert!(
        video.iter().any(|p| p["pts"].as_i64() > p["dts"].as_i64()),
        "B-frames keep pts > dts"
    );
    let flv = ffprobe(&node.flv_url("demo"), 3);
    assert_synthetic_stream(&flv, 3);
    // The publisher is one RTMP publisher in the metrics, whose frames are counted in.
    assert_eq!(node.metric("meshcast_publishers{proto=\"rtmp\"}"), 1.0);
    assert!(node.metric("meshcast_frames_in_total{proto=\"rtmp\"}") > 0.0);
    // The API says which streams have B-frames (WebRTC viewers' decoders take none).
    assert_eq!(node.stream("demo").unwrap()["video"]["bframes"], true);
    let flat = PublishOpts {
        bframes: 0,
        ..Default::default()
    };
    let _q = publish_and_wait(&node.rtmp_url("flat"), &node, "flat", flat);
    let _ = ffprobe(&node.rtmp_url("flat"), 1);
    assert_eq!(node.stream("flat").unwrap()["video"]["bframes"], false);
}

#[test]
fn late_joiner_starts_at_once_from_the_cached_keyframe() {
    let node = NodeProc::start(NodeSpec::standalone());
    // One keyframe every 10 s: without the cache a viewer would wait up to 10 s.
    let opts = PublishOpts {
        gop: 300,
        ..Default::default()
    };
    let _p = publish_and_wait(&node.rtmp_url("gop"), &node, "gop", opts);
    wait_until(Duration::from_secs(10), "3 s of stream", || {
        node.stream("gop").unwrap()["uptime_ms"].as_u64().unwrap() > 3000
    });
    for url in [node.rtmp_url("gop"), node.flv_url("gop")] {
        let probe = ffprobe(&url, 1);
        let video = probe.packets_of("video");
        let first = video[0];
        assert!(first["flags"].as_str().unwrap().starts_with('K'));
        // The first frame is the stream's first keyframe (t≈0), though we joined at t>3 s.
        assert!(
            first["dts"].as_i64().unwrap() < 500,
            "joined from cache: {first}"
        );
        probe.assert_timestamps_sane();
    }
}

#[test]
fn edge_pulls_on_first_viewer_and_releases_after_grace() {
    let origin = NodeProc::start(NodeSpec::origin("origin-a"));
    let edge = NodeProc::start(NodeSpec::edge("edge-1", vec![origin.quic]));
    edge.wait_for_link_count(1);
    let _p = publish_and_wait(&origin.rtmp_url("e"), &origin, "e", PublishOpts::default());
    assert!(edge.stream("e").is_none(), "no pull before a viewer asks");

    let probe = ffprobe(&edge.rtmp_url("e"), 3);
    assert_synthetic_stream(&probe, 3);
    let flv = ffprobe(&edge.flv_url("e"), 3);
    assert_synthetic_stream(&flv, 3);

    // Two viewers at once share one upstream subscription.
    let a = std::thread::spawn({
        let url = edge.rtmp_url("e");
        move || ffprobe(&url, 3)
    });
    let b = std::thread::spawn({
        let url = edge.flv_url("e");
        move || ffprobe(&url, 3)
    });
    wait_until(Duration::from_secs(10), "both viewers attached", || {
        edge.stream("e").is_some_and(|s| s["subscribers"] == 2)
    });
    let relay = edge.stream("e").unwrap();
    assert_eq!(relay["source"]["kind"], "relay");
    assert_eq!(relay["source"]["node"], "origin-a");
    assert_eq!(
        origin.stream("e").unwrap()["subscribers"],
        1,
        "the origin serves one subscription for the edge, whatever the viewers"
    );
    assert_synthetic_stream(&a.join().unwrap(), 3);
    assert_synthetic_stream(&b.join().unwrap(), 3);

    // The grace period is 1 s in these tests.
    wait_until(Duration::from_secs(10), "edge released the stream", || {
        edge.stream("e").is_none()
    });
    wait_until(
        Duration::from_secs(10),
        "origin saw the unsubscribe",
        || origin.stream("e").unwrap()["subscribers"] == 0,
    );
}

#[test]
fn two_origins_relay_a_to_b_to_edge() {
    let (a, b, edge) = start_two_origins_and_edge();

    let _p = publish_and_wait(&a.rtmp_url("mesh"), &a, "mesh", PublishOpts::default());
    let probe = ffprobe(&edge.rtmp_url("mesh"), 3);
    assert_synthetic_stream(&probe, 3);

    // While a viewer watches, the path is A → B → edge.
    let viewer = std::thread::spawn({
        let url = edge.flv_url("mesh");
        move || ffprobe(&url, 3)
    });
    wait_until(Duration::from_secs(10), "edge relays from B", || {
        edge.stream("mesh")
            .is_some_and(|s| s["source"]["node"] == "origin-b")
    });
    let on_b = b.stream("mesh").expect("B relays the stream");
    assert_eq!(on_b["source"]["node"], "origin-a");
    assert_synthetic_stream(&viewer.join().unwrap(), 3);

    // B can also be played directly (one hop from A).
    assert_synthetic_stream(&ffprobe(&b.rtmp_url("mesh"), 2), 2);
}

#[test]
fn second_publisher_of_a_live_name_is_refused() {
    let node = NodeProc::start(NodeSpec::standalone());
    let first = publish_and_wait(&node.rtmp_url("dup"), &node, "dup", PublishOpts::default());
    let second = Publisher::start(&node.rtmp_url("dup"), PublishOpts::default());
    let (ok, stderr) = second.wait(Duration::from_secs(20));
    assert!(!ok, "second publisher must fail");
    assert!(
        node.log().contains("already being published"),
        "the refusal is logged; ffmpeg said: {stderr}"
    );
    // The first publisher is unaffected.
    assert_synthetic_stream(&ffprobe(&node.rtmp_url("dup"), 2), 2);
    drop(first);
}

#[test]
fn publisher_disconnect_ends_the_stream_everywhere() {
    let origin = NodeProc::start(NodeSpec::origin("origin-a"));
    let edge = NodeProc::start(NodeSpec::edge("edge-1", vec![origin.quic]));
    edge.wait_for_link_count(1);
    let opts = PublishOpts {
        seconds: 8,
        ..Default::default()
    };
    let publisher = publish_and_wait(&origin.rtmp_url("end"), &origin, "end", opts);
    // Viewers with no time limit: they must end on their own when the publisher leaves.
    let mut viewers: Vec<std::process::Child> = [
        origin.rtmp_url("end"),
        edge.rtmp_url("end"),
        edge.flv_url("end"),
    ]
    .iter()
    .map(|url| {
        std::process::Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-rw_timeout",
                "30000000",
                "-i",
                url,
                "-c",
                "copy",
                "-f",
                "null",
                "-",
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap()
    })
    .collect();
    let (ok, err) = publisher.wait(Duration::from_secs(30));
    assert!(ok, "publisher ran to its end: {err}");
    wait_until(Duration::from_secs(15), "every viewer saw the end", || {
        viewers.iter_mut().all(|v| v.try_wait().unwrap().is_some())
    });
    wait_until(Duration::from_secs(10), "stream gone everywhere", || {
        origin.stream("end").is_none() && edge.stream("end").is_none()
    });
}

/// OBS or ffmpeg losing its connection and publishing again (`limits.publisher_hold_ms`,
/// 5 s by default): viewers on the origin and on an edge keep their connections, and what
/// they get goes on as one timeline.
#[test]
fn a_publisher_that_comes_back_within_the_hold_keeps_its_viewers() {
    let origin = NodeProc::start(NodeSpec::origin("origin-a"));
    let edge = NodeProc::start(NodeSpec::edge("edge-1", vec![origin.quic]));
    edge.wait_for_link_count(1);
    let first = publish_and_wait(
        &origin.rtmp_url("back"),
        &origin,
        "back",
        PublishOpts::default(),
    );
    let watchers = [
        FlvWatcher::start(origin.http, "/live/back.flv"),
        FlvWatcher::start(edge.http, "/live/back.flv"),
    ];
    wait_until(Duration::from_secs(15), "both viewers play", || {
        watchers.iter().all(|w| w.media(9).len() >= 60)
    });
    // The publisher's connection drops (SIGKILL: no unpublish), and it comes back a
    // second later, its timestamps starting from zero again.
    drop(first);
    let left = std::time::Instant::now();
    wait_until(
        Duration::from_secs(3),
        "the origin holds the stream",
        || {
            origin
                .stream("back")
                .is_some_and(|s| s["waiting_for_publisher"] == true)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let second = Publisher::start(&origin.rtmp_url("back"), PublishOpts::default());
    wait_until(
        Duration::from_secs(10),
        "the publisher takes it back",
        || origin.stream("back").is_some_and(|s| s["publishes"] == 2),
    );
    wait_until(
        Duration::from_secs(15),
        "both viewers play the new publish",
        || watchers.iter().all(|w| w.video_after(left) >= 90),
    );
    for (w, at) in watchers.iter().zip(["origin", "edge"]) {
        assert_eq!(
            w.ended(),
            None,
            "the viewer on the {at} kept its connection"
        );
        let video = w.media(9);
        let audio = w.media(8);
        // One timeline: never back, no jump larger than a frame interval or two.
        assert_eq!(timestamp_faults(&video, 0, 100), vec![], "{at}: video");
        assert_eq!(timestamp_faults(&audio, 0, 100), vec![], "{at}: audio");
        let (gap, _) = longest_gap(&video, left - Duration::from_millis(500));
        assert!(
            gap < Duration::from_secs(4),
            "{at}: longest video gap {gap:?}"
        );
        eprintln!(
            "{at}: longest video gap {gap:?} across the reconnect, {} video frames",
            video.len()
        );
    }
    assert!(edge
        .stream("back")
        .is_some_and(|s| s["source"]["kind"] == "relay"));
    // When the publisher leaves for good, the stream ends everywhere after the hold.
    drop(second);
    wait_until(Duration::from_secs(15), "the viewers saw the end", || {
        watchers.iter().all(|w| w.ended().is_some())
    });
    wait_until(Duration::from_secs(10), "stream gone everywhere", || {
        origin.stream("back").is_none() && edge.stream("back").is_none()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_viewer_is_dropped_without_slowing_others() {
    let mut spec = NodeSpec::standalone();
    spec.extra = "[limits]\nviewer_write_timeout_ms = 1500\nviewer_send_buffer_bytes = 32768\nstream_buffer_frames = 128\n".into();
    let node = tokio::task::spawn_blocking(move || NodeProc::start(spec))
        .await
        .unwrap();
    let url = node.rtmp_url("stall");
    let _p = tokio::task::block_in_place(|| {
        publish_and_wait(&url, &node, "stall", PublishOpts::default())
    });
    let rss_before = node.rss_kb();
    let addr = node.rtmp.to_string();
    let stalled =
        meshcast::rtmp::client::Player::connect_with_buffer(&addr, "live", "stall", Some(4096))
            .await
            .expect("stalled player connects");
    let stall = tokio::spawn(stalled.stall(Duration::from_secs(8)));
    // A healthy viewer during the stall gets the whole stream.
    let healthy_url = node.rtmp_url("stall");
    let probe = tokio::task::spawn_blocking(move || ffprobe(&healthy_url, 4))
        .await
        .unwrap();
    assert_synthetic_stream(&probe, 4);
    let stats = stall.await.unwrap().unwrap();
    assert!(
        stats.closed_by_server,
        "the server closed the stalled viewer"
    );
    assert!(node.metric("meshcast_slow_disconnects_total{proto=\"rtmp\"}") >= 1.0);
    let growth = node.rss_kb().saturating_sub(rss_before);
    assert!(growth < 30_000, "RSS grew by {growth} kB during the stall");
    assert!(node.log().contains("did not read"), "the reason is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_input_closes_only_that_session() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = tokio::task::spawn_blocking(|| NodeProc::start(NodeSpec::standalone()))
        .await
        .unwrap();
    let url = node.rtmp_url("g");
    let _p =
        tokio::task::block_in_place(|| publish_and_wait(&url, &node, "g", PublishOpts::default()));

    // 1. Random bytes instead of a handshake.
    let mut s = tokio::net::TcpStream::connect(node.rtmp).await.unwrap();
    let junk: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&junk).await;
    let mut buf = vec![0u8; 65536];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "garbage connection is closed");

    // 2. A valid handshake, then a truncated chunk and garbage chunk headers.
    let mut s = tokio::net::TcpStream::connect(node.rtmp).await.unwrap();
    let mut hs = rml_rtmp::handshake::Handshake::new(rml_rtmp::handshake::PeerType::Client);
    s.write_all(&hs.generate_outbound_p0_and_p1().unwrap())
        .await
        .unwrap();
    let handshake = async {
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            match hs.process_bytes(&buf[..n]).unwrap() {
                rml_rtmp::handshake::HandshakeProcessResult::InProgress { response_bytes } => {
                    s.write_all(&response_bytes).await.unwrap()
                }
                rml_rtmp::handshake::HandshakeProcessResult::Completed {
                    response_bytes, ..
                } => {
                    s.write_all(&response_bytes).await.unwrap();
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), handshake)
        .await
        .expect("the RTMP handshake completes");
    // A type-0 header announcing a 16 MB command message, then a type-3 chunk on an
    // unknown chunk stream, then an AMF command that is not AMF.
    let mut bad = vec![3, 0, 0, 0, 0xff, 0xff, 0xff, 20, 0, 0, 0, 0, 1, 2, 3];
    bad.extend_from_slice(&[0xc0 | 40, 9, 9, 9]);
    bad.extend_from_slice(&[3, 0, 0, 0, 0, 0, 4, 20, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]);
    let _ = s.write_all(&bad).await;
    drop(s);

    // 3. A QUIC peer that sends garbage on the control stream.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = meshcast::config::Config::standalone_default();
    let client = meshcast::backbone::tls::client_config(&cfg.backbone).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(node.quic, meshcast::backbone::tls::SERVER_NAME)
        .unwrap()
        .await
        .expect("QUIC handshake");
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 5, 0x42, 1, 2, 3, 4, 0, 0, 0])
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the node closes the malformed peer");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(_)),
        "closed by the application: {reason}"
    );

    // The node still serves everyone else.
    let url = node.rtmp_url("g");
    let probe = tokio::task::spawn_blocking(move || ffprobe(&url, 2))
        .await
        .unwrap();
    assert_synthetic_stream(&probe, 2);
    let log = node.log();
    assert!(
        log.contains("handshake failed") || log.contains("connection closed"),
        "{log}"
    );
    assert!(
        log.contains("malformed control message") || log.contains("unknown control message"),
        "{log}"
    );
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let mut node = NodeProc::start(NodeSpec::standalone());
    let _p = publish_and_wait(&node.rtmp_url("s"), &node, "s", PublishOpts::default());
    node.signal("TERM");
    wait_until(Duration::from_secs(10), "node exits", || !node.is_running());
    assert!(node.child.wait().unwrap().success());
    assert!(node.log().contains("meshcast node stopped"));
}

#[test]
fn sample_configs_are_valid_and_bad_ones_report_every_problem() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    let mut checked = 0;
    let sub = std::path::Path::new(dir).join("cluster-3region");
    let files = std::fs::read_dir(dir)
        .unwrap()
        .chain(std::fs::read_dir(&sub).unwrap());
    for entry in files {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = std::process::Command::new(&*BIN)
                .arg("check-config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 11, "{checked} configs");

    let badcfg = temp_dir("badcfg");
    let bad = badcfg.join("bad.toml");
    std::fs::write(
        &bad,
        "[node]\nrole = \"edge\"\nid = \"no spaces\"\n[rtmp]\nlisten = \"1.2.3.4\"\n[backbone]\norigins = [\"x\"]\n[limits]\nstream_buffer_frames = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(&*BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    for key in [
        "node.id",
        "rtmp.listen",
        "backbone.origins[0]",
        "limits.stream_buffer_frames",
    ] {
        assert!(
            err.contains(&format!("{file}: {key}: ")),
            "missing {key} in:\n{err}"
        );
    }
    // `run` refuses the same file with the same report.
    let out = common::bounded::output_within(
        std::process::Command::new(&*BIN)
            .args(["run", "--config"])
            .arg(&bad),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.id"));
}

#[test]
fn late_joiner_on_an_edge_starts_from_the_edges_cache() {
    let origin = NodeProc::start(NodeSpec::origin("origin-a"));
    let edge = NodeProc::start(NodeSpec::edge("edge-1", vec![origin.quic]));
    edge.wait_for_link_count(1);
    let opts = PublishOpts {
        gop: 300,
        ..Default::default()
    };
    let _p = publish_and_wait(&origin.rtmp_url("eg"), &origin, "eg", opts);
    // A first viewer makes the edge pull; it keeps watching while a second one joins later.
    let first = std::thread::spawn({
        let url = edge.flv_url("eg");
        move || ffprobe(&url, 6)
    });
    wait_until(Duration::from_secs(10), "edge relaying", || {
        edge.stream("eg").is_some()
    });
    wait_until(Duration::from_secs(10), "3 s into the stream", || {
        origin.stream("eg").unwrap()["uptime_ms"].as_u64().unwrap() > 3500
    });
    let late = ffprobe(&edge.rtmp_url("eg"), 1);
    let video = late.packets_of("video");
    assert!(video[0]["flags"].as_str().unwrap().starts_with('K'));
    assert!(
        video[0]["dts"].as_i64().unwrap() < 500,
        "started from the edge's cached keyframe"
    );
    late.assert_timestamps_sane();
    first.join().unwrap().assert_timestamps_sane();
}

/// Runs `meshcast cert ARGS`; returns the files it wrote.
fn meshcast_cert(args: &[&str]) -> Vec<String> {
    let out = common::bounded::output_within(
        std::process::Command::new(&*BIN).arg("cert").args(args),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "meshcast cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `[backbone]` keys for a node with certificate `files` (cert, key) and the CA in `ca`.
fn tls_keys(files: &[String], ca: &std::path::Path) -> String {
    format!(
        "cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        files[0],
        files[1],
        ca.join("ca.pem").display()
    )
}

#[test]
fn backbone_with_a_ca_verifies_peers_and_the_node_their_certificate_names() {
    let dir = temp_dir("pki");
    let (ca, other_ca) = (dir.join("ca"), dir.join("other-ca"));
    meshcast_cert(&["ca", "--out", ca.to_str().unwrap()]);
    meshcast_cert(&["ca", "--out", other_ca.to_str().unwrap()]);
    let node_cert = |ca: &std::path::Path, id: &str| {
        meshcast_cert(&[
            "node",
            "--ca",
            ca.to_str().unwrap(),
            "--id",
            id,
            "--out",
            dir.to_str().unwrap(),
        ])
    };
    let mut o = NodeSpec::origin("origin-a");
    // `extra` lands in [backbone] here: it is written right after the backbone keys.
    o.extra = tls_keys(&node_cert(&ca, "origin-a"), &ca);
    let origin = NodeProc::start(o);
    let mut trusted = NodeSpec::edge("edge-ok", vec![origin.quic]);
    trusted.extra = tls_keys(&node_cert(&ca, "edge-ok"), &ca);
    let edge = NodeProc::start(trusted);
    // A certificate from another CA; a certificate of this CA for another node; none.
    let mut untrusted = NodeSpec::edge("edge-bad", vec![origin.quic]);
    untrusted.extra = tls_keys(&node_cert(&other_ca, "edge-bad"), &other_ca);
    let stranger = NodeProc::start(untrusted);
    let mut impostor = NodeSpec::edge("edge-imp", vec![origin.quic]);
    impostor.extra = tls_keys(&node_cert(&ca, "edge-real"), &ca);
    let impostor = NodeProc::start(impostor);
    let mut anonymous = NodeSpec::edge("edge-anon", vec![origin.quic]);
    anonymous.extra = format!("ca = \"{}\"\n", ca.join("ca.pem").display());
    let anonymous = NodeProc::start(anonymous);

    edge.wait_for_link_count(1);
    let _p = publish_and_wait(
        &origin.rtmp_url("tls"),
        &origin,
        "tls",
        PublishOpts::default(),
    );
    assert_synthetic_stream(&ffprobe(&edge.rtmp_url("tls"), 2), 2);

    std::thread::sleep(Duration::from_secs(2));
    for (who, node) in [
        ("an edge of another CA", &stranger),
        ("an edge with another node's certificate", &impostor),
        ("an edge with no certificate", &anonymous),
    ] {
        assert!(node.links().is_empty(), "{who} linked");
        assert!(!node.log().contains("link up"), "{who} linked");
        let (status, _) = http_get(node.http, "/live/tls.flv").unwrap();
        assert_eq!(status, 404, "{who} plays");
    }
    assert!(
        origin.log().contains("does not name node edge-imp"),
        "the origin says why it refused the impostor"
    );
}
