//! Streams as real encoders make them (H.264 Main and High profile, with B-frames, as OBS's
//! and most hardware encoders' defaults produce) play in a browser over WHEP: headless
//! Chromium must decode at least 90% of the source's frame rate, on the node the stream is
//! published to and on an edge two hops away. A stream with B-frames reaches WebRTC viewers
//! through its rendition (`name~webrtc`), made once, on the publisher's node; a stream
//! without B-frames is never re-encoded. Each test runs in its own network namespace (see
//! `common::browser`).

mod common;

use std::time::Duration;

use common::browser::*;
use common::*;

/// A source as a publisher's encoder makes it, and what the browser must be answered.
struct Case {
    name: &'static str,
    profile: &'static str,
    bframes: u32,
    /// The `profile_idc`s the answer's `profile-level-id` may carry (hex): the source's, or,
    /// when the browser does not offer it, the least profile whose decoders decode it
    /// (Chromium without hardware decoders offers High 4:4:4 Predictive, `f4`, not High).
    profile_idc: &'static [&'static str],
}

const CASES: [Case; 3] = [
    Case {
        name: "main-bf3",
        profile: "main",
        bframes: 3,
        profile_idc: &["4d"],
    },
    Case {
        name: "high-bf2",
        profile: "high",
        bframes: 2,
        profile_idc: &["64", "f4"],
    },
    Case {
        name: "high-bf0",
        profile: "high",
        bframes: 0,
        profile_idc: &["64", "f4"],
    },
];

/// The source's frame rate (`common::Publisher`: 30 fps).
const SOURCE_FPS: f64 = 30.0;

/// An ffmpeg RTMP publish of `case` to `origin` (x264 `veryfast`, so High profile really
/// uses High's tools), waited for until live.
fn publish(origin: &NodeProc, case: &Case) -> Publisher {
    let opts = PublishOpts {
        seconds: 60,
        gop: 60,
        bframes: case.bframes,
        preset: "veryfast",
        profile: Some(case.profile),
        ..Default::default()
    };
    publish_and_wait(&origin.rtmp_url(case.name), origin, case.name, opts)
}

/// Publishes each case to `origin` and plays it in Chromium over WHEP from `viewer`.
/// `relays` are the nodes between them, which must relay the rendition, not make it.
fn every_case_plays(origin: &NodeProc, viewer: &NodeProc, relays: &[&NodeProc]) {
    for case in &CASES {
        let _publisher = publish(origin, case);
        let has_bframes = case.bframes > 0;
        wait_until(Duration::from_secs(5), "B-frames reported", || {
            origin.stream(case.name).unwrap()["video"]["bframes"] == has_bframes
        });
        let (browser, v) = whep_in_chromium(viewer, case.name, 8, case.name);
        drop(browser);
        assert!(v["error"].is_null(), "{}: page error: {v}", case.name);
        let fps = v["steadyFps"].as_f64().unwrap_or(0.0);
        assert!(
            fps >= 0.9 * SOURCE_FPS,
            "{}: decoded {fps:.1} frames a second of {SOURCE_FPS}: {v}",
            case.name
        );
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(640), Some(360))
        );
        // The answer names the profile the browser really gets (the rendition keeps the
        // source's).
        let fmtp = v["videoFmtp"].as_str().unwrap_or_default();
        assert!(
            case.profile_idc
                .iter()
                .any(|idc| fmtp.contains(&format!("profile-level-id={idc}"))),
            "{}: sent as {fmtp}",
            case.name
        );
        assert!(v["audioSamples"].as_u64().unwrap_or(0) > 0, "audio: {v}");

        let rendition = format!("{}~webrtc", case.name);
        if has_bframes {
            let made = origin
                .stream(&rendition)
                .expect("the rendition, on the origin");
            assert_eq!(
                made["source"]["kind"], "bridge",
                "made where published: {made}"
            );
            assert_eq!(made["video"]["bframes"], false, "{made}");
            assert_eq!(made["audio"]["codec"], "opus", "{made}");
            for node in relays {
                let relayed = node
                    .stream(&rendition)
                    .unwrap_or_else(|| panic!("{} relays the rendition", node.name));
                assert_eq!(
                    relayed["source"]["kind"], "relay",
                    "not made again: {relayed}"
                );
            }
        } else {
            for node in std::iter::once(&origin).chain(relays) {
                assert!(
                    node.stream(&rendition).is_none(),
                    "{}: a stream without B-frames is not re-encoded",
                    node.name
                );
            }
        }
    }
}

#[test]
fn bframe_streams_play_in_chromium_from_the_node_they_are_published_to() {
    if !in_private_network("bframe_streams_play_in_chromium_from_the_node_they_are_published_to") {
        return;
    }
    let node = NodeProc::start(NodeSpec::standalone());
    every_case_plays(&node, &node, &[]);
}

#[test]
fn bframe_streams_play_in_chromium_from_an_edge_two_hops_away() {
    if !in_private_network("bframe_streams_play_in_chromium_from_an_edge_two_hops_away") {
        return;
    }
    let (a, b, edge) = start_two_origins_and_edge();
    every_case_plays(&a, &edge, &[&b, &edge]);
}

#[test]
fn bframe_streams_are_refused_with_the_reason_when_configured_so() {
    if !in_private_network("bframe_streams_are_refused_with_the_reason_when_configured_so") {
        return;
    }
    let mut spec = NodeSpec::standalone();
    spec.webrtc_extra = "bframes = \"refuse\"".into();
    let node = NodeProc::start(spec);
    let _publisher = publish(&node, &CASES[0]);
    let (_browser, v) = whep_in_chromium(&node, CASES[0].name, 3, "refused");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("status 406"), "{v}");
    assert!(
        error.contains("B-frames") && error.contains("-bf 0") && error.contains("transcode"),
        "the refusal says why and what to change: {error}"
    );
    assert!(
        node.stream("main-bf3~webrtc").is_none(),
        "nothing re-encoded"
    );
    // A stream without B-frames still plays.
    let _plain = publish(&node, &CASES[2]);
    let (_browser, v) = whep_in_chromium(&node, CASES[2].name, 5, "plain");
    assert!(v["framesDecoded"].as_u64().unwrap_or(0) > 30, "{v}");
}

#[test]
fn a_viewer_moves_to_the_rendition_when_its_stream_gains_bframes() {
    if !in_private_network("a_viewer_moves_to_the_rendition_when_its_stream_gains_bframes") {
        return;
    }
    let node = NodeProc::start(NodeSpec::standalone());
    // The publisher starts without B-frames (played as it is), then comes back within the
    // hold with B-frames, as an encoder restarted with other settings would.
    let plain = Case {
        name: "restarted",
        ..CASES[2]
    };
    let with_bframes = Case {
        name: "restarted",
        ..CASES[0]
    };
    let first = publish(&node, &plain);
    let v = std::thread::scope(|s| {
        let viewer = s.spawn(|| whep_in_chromium(&node, plain.name, 16, "moved viewer").1);
        std::thread::sleep(Duration::from_secs(5));
        assert!(node.stream("restarted~webrtc").is_none(), "played as it is");
        drop(first);
        let _second = publish(&node, &with_bframes);
        wait_until(Duration::from_secs(10), "viewer on the rendition", || {
            node.stream("restarted~webrtc")
                .is_some_and(|r| r["subscribers"].as_u64() == Some(1))
        });
        viewer.join().unwrap()
    });
    assert!(v["error"].is_null(), "page error: {v}");
    assert!(node
        .log()
        .contains("the stream has B-frames: moved to its WebRTC rendition"));
    // Decoding went on through the restart (a second or two without a publisher) and the
    // move. (Sent the B-frames as they are, Chromium decoded ~7 frames a second.)
    let fps = v["steadyFps"].as_f64().unwrap_or(0.0);
    assert!(
        fps >= 0.8 * SOURCE_FPS,
        "decoded {fps:.1} frames a second: {v}"
    );
}
