//! Egress against real peers: pushes into nginx-rtmp (Debian `libnginx-mod-rtmp`) read back
//! with ffprobe/ffmpeg, and recordings checked with ffprobe after clean stops and SIGKILL.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::egress_api::{delete_egress, egress_status, post_egress};
use common::nginx::Nginx;
use common::*;
use serde_json::{json, Value};

/// ffprobe of a file: its streams and its format (duration...).
fn probe_file(path: &Path) -> (Vec<Value>, Value) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-of",
            "json",
            "-show_streams",
            "-show_format",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffprobe {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["streams"].as_array().cloned().unwrap_or_default(),
        v["format"].clone(),
    )
}

fn codec_of(streams: &[Value], kind: &str) -> String {
    streams
        .iter()
        .find(|s| s["codec_type"] == kind)
        .map(|s| s["codec_name"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn duration(format: &Value) -> f64 {
    format["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Asserts that every A/V offset measured on an output is within 40 ms of the input's.
fn assert_sync_kept(input: &[f64], output: &[f64], what: &str) {
    assert!(input.len() >= 3, "too few marks in the input: {input:?}");
    assert!(output.len() >= 3, "too few marks in {what}: {output:?}");
    let reference = mean(input);
    for o in output {
        assert!(
            (o - reference).abs() <= 0.040,
            "{what}: A/V offset {o:.3}s vs the input's {reference:.3}s (all: {output:?})"
        );
    }
}

#[test]
fn push_to_nginx_keeps_codecs_and_sync_while_a_dead_destination_retries() {
    let nginx_dir = temp_dir("nginx");
    let nginx = Nginx::start(&nginx_dir, free_port());
    // A blackhole: the kernel accepts the TCP connection, nobody ever answers.
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!(
        "rtmp://127.0.0.1:{}/live/nowhere",
        blackhole.local_addr().unwrap().port()
    );
    let node = NodeProc::start(NodeSpec::standalone());
    let opts = PublishOpts {
        seconds: 40,
        sync_marks: true,
        ..Default::default()
    };
    let _p = publish_and_wait(&node.rtmp_url("sync"), &node, "sync", opts);

    let (status, live) = post_egress(
        &node,
        json!({"stream": "live/sync", "kind": "rtmp", "url": nginx.url("pushed")}),
    );
    assert_eq!(status, 201, "{live}");
    let live_id = live["id"].as_str().unwrap().to_string();
    let (status, dead) = post_egress(
        &node,
        json!({"stream": "live/sync", "kind": "rtmp", "url": dead_url}),
    );
    assert_eq!(status, 201, "{dead}");
    let dead_id = dead["id"].as_str().unwrap().to_string();
    assert_eq!(
        dead["destination"],
        format!(
            "rtmp://127.0.0.1:{}/live/no***",
            blackhole.local_addr().unwrap().port()
        )
    );

    wait_until(Duration::from_secs(10), "push live", || {
        egress_status(&node, &live_id)["state"] == "live"
    });
    // What nginx serves: H.264 + AAC at the source's rate, timestamps sane.
    let probe = ffprobe(&nginx.url("pushed"), 5);
    assert_eq!(probe.stream_of("video").unwrap()["codec_name"], "h264");
    assert_eq!(probe.stream_of("audio").unwrap()["codec_name"], "aac");
    let frames = probe.packets_of("video").len();
    assert!(
        (120..=180).contains(&frames),
        "{frames} video frames in 5 s"
    );
    assert!(probe.packets_of("audio").len() >= 150);
    probe.assert_timestamps_sane();

    // A/V sync through the push equals the input's (measured on the decoded media).
    let input = av_offsets(&node.flv_url("sync"), 6);
    let output = av_offsets(&nginx.url("pushed"), 6);
    assert_sync_kept(&input, &output, "nginx-rtmp");

    // The dead destination retried meanwhile, visibly; the live one never reconnected.
    wait_until(Duration::from_secs(25), "dead destination retried", || {
        egress_status(&node, &dead_id)["reconnects"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    let d = egress_status(&node, &dead_id);
    assert!(
        d["last_error"].as_str().unwrap_or("").contains("no answer"),
        "{d}"
    );
    assert!(
        ["backoff", "connecting"].contains(&d["state"].as_str().unwrap()),
        "{d}"
    );
    assert!(node.metric("meshcast_egress_reconnects_total") >= 1.0);
    let l = egress_status(&node, &live_id);
    assert_eq!(l["state"], "live", "{l}");
    assert_eq!(l["reconnects"], 0, "{l}");
    // (The marks stream is black video and mostly silence: small.)
    assert!(l["bytes"].as_u64().unwrap() > 20_000, "{l}");
    assert!(l["frames"].as_u64().unwrap() > 500, "{l}");
    assert_eq!(l["dropped_frames"], 0, "{l}");

    let (_, list) = http_get(node.http, "/api/v1/egress").unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["egress"].as_array().unwrap().len(), 2);
    let stopped = delete_egress(&node, &live_id);
    assert_eq!(stopped["state"], "stopped");
    delete_egress(&node, &dead_id);
    let (status, _) = http_get(node.http, &format!("/api/v1/egress/{live_id}")).unwrap();
    assert_eq!(status, 404);
}

#[test]
fn fragmented_mp4_rotates_and_stays_playable_after_sigkill() {
    let root = temp_dir("rec");
    let nginx_dir = temp_dir("nginx");
    let nginx = Nginx::start(&nginx_dir, free_port());
    // Three rules for every stream of `live`: fMP4 cut by time, Matroska cut by size, and a
    // push to nginx-rtmp under the same name.
    let spec = NodeSpec {
        extra: format!(
            "\n[recording]\nroot = \"{}\"\n\n[[egress]]\nstream = \"live/*\"\nkind = \"record\"\nsegment_seconds = 3\ntemplate = \"{{ns}}/{{stream}}/{{seq}}.{{ext}}\"\n\n[[egress]]\nstream = \"live/*\"\nkind = \"record\"\nformat = \"mkv\"\nsegment_mb = 1\ntemplate = \"{{ns}}/{{stream}}-by-size/{{seq}}.{{ext}}\"\n\n[[egress]]\nstream = \"live/*\"\nkind = \"rtmp\"\nurl = \"rtmp://127.0.0.1:{}/live/{{stream}}\"\n",
            root.display(),
            nginx.port
        ),
        ..NodeSpec::standalone()
    };
    let mut node = NodeProc::start(spec);
    let _p = publish_and_wait(
        &node.rtmp_url("cam"),
        &node,
        "cam",
        PublishOpts {
            seconds: 30,
            ..Default::default()
        },
    );
    // The push rule: nginx-rtmp has the stream under its name.
    let probe = ffprobe(&nginx.url("cam"), 2);
    assert_eq!(probe.stream_of("video").unwrap()["codec_name"], "h264");
    assert_eq!(probe.stream_of("audio").unwrap()["codec_name"], "aac");
    wait_until(
        Duration::from_secs(25),
        "files cut by time and by size",
        || {
            files_under(&root.join("live/cam")).len() >= 3
                && files_under(&root.join("live/cam-by-size")).len() >= 2
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    node.signal("KILL");
    let _ = node.child.wait();

    // Size rotation: every finished Matroska file is a little over 1 MiB (cut at the first
    // keyframe after it; GOP 1 s).
    let by_size = files_under(&root.join("live/cam-by-size"));
    for f in &by_size[..by_size.len() - 1] {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(
            (1 << 20..3 << 20).contains(&len),
            "{}: {len} bytes",
            f.display()
        );
        let (streams, _) = probe_file(f);
        assert_eq!(codec_of(&streams, "video"), "h264");
    }
    let files = files_under(&root.join("live/cam"));
    assert!(files.len() >= 3, "{files:?}");
    for (i, f) in files.iter().enumerate() {
        let (streams, format) = probe_file(f);
        assert_eq!(codec_of(&streams, "video"), "h264", "{}", f.display());
        assert_eq!(codec_of(&streams, "audio"), "aac", "{}", f.display());
        let d = duration(&format);
        if i + 1 < files.len() {
            // Finished segments: ~3 s each (cut at the first keyframe after 3 s; GOP 1 s).
            assert!((2.5..=4.5).contains(&d), "{}: {d} s", f.display());
        } else {
            // The file being written at SIGKILL: playable up to its last fragment.
            assert!(d >= 0.5, "{}: {d} s after SIGKILL", f.display());
        }
        // Every packet decodes (no truncated fragment in the middle).
        let out = Command::new("ffmpeg")
            .args(["-v", "error", "-i"])
            .arg(f)
            .args(["-f", "null", "-"])
            .output()
            .unwrap();
        let errors = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && errors.trim().is_empty(),
            "{}: {errors}",
            f.display()
        );
    }
}

#[test]
fn recordings_continue_across_a_publisher_reconnect_in_sync() {
    let node = NodeProc::start(NodeSpec {
        extra: "\n[recording]\nroot = \"rec\"\n".into(),
        ..NodeSpec::standalone()
    });
    let opts = || PublishOpts {
        seconds: 7,
        sync_marks: true,
        ..Default::default()
    };
    let first = publish_and_wait(&node.rtmp_url("talk"), &node, "talk", opts());
    let mut ids = vec![];
    for format in ["mp4", "mkv", "flv"] {
        let (status, e) = post_egress(
            &node,
            json!({"stream": "live/talk", "kind": "record", "format": format,
                   "template": format!("{{ns}}/{{stream}}-{format}.{{ext}}")}),
        );
        assert_eq!(status, 201, "{e}");
        ids.push(e["id"].as_str().unwrap().to_string());
    }
    let input = av_offsets(&node.flv_url("talk"), 5);
    let (ok, err) = first.wait(Duration::from_secs(20));
    assert!(ok, "{err}");
    // The publisher comes back (same name) a moment later.
    std::thread::sleep(Duration::from_secs(1));
    let second = publish_and_wait(&node.rtmp_url("talk"), &node, "talk", opts());
    let (ok, err) = second.wait(Duration::from_secs(20));
    assert!(ok, "{err}");
    let mut statuses = vec![];
    for id in &ids {
        let e = egress_status(&node, id);
        assert_eq!(e["publisher_reconnects"], 1, "{e}");
        statuses.push(delete_egress(&node, id));
    }
    for (status, format) in statuses.iter().zip(["mp4", "mkv", "flv"]) {
        let files = status["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "one file across the reconnect: {status}");
        let path = node.dir.join("rec").join(files[0].as_str().unwrap());
        assert!(
            path.ends_with(format!("talk-{format}.{format}")),
            "{}",
            path.display()
        );
        let (streams, fmt) = probe_file(&path);
        assert_eq!(codec_of(&streams, "video"), "h264");
        assert_eq!(codec_of(&streams, "audio"), "aac");
        // Both publishes (~7 s each, minus the join) in one file, timestamps continuous.
        let d = duration(&fmt);
        assert!((10.0..=15.5).contains(&d), "{format}: {d} s");
        let output = av_offsets(path.to_str().unwrap(), 20);
        assert!(
            output.len() >= 9,
            "{format}: marks from both publishes: {output:?}"
        );
        assert_sync_kept(&input, &output, format);
    }
}

#[test]
fn egress_requests_are_validated_and_paths_confined() {
    let node = NodeProc::start(NodeSpec::standalone());
    for (body, field) in [
        (
            json!({"stream": "live/x", "kind": "record", "template": "../../etc/x.mp4"}),
            "template",
        ),
        (
            json!({"stream": "live/x", "kind": "record", "template": "/tmp/x.mp4"}),
            "template",
        ),
        (
            json!({"stream": "../etc/passwd", "kind": "record"}),
            "stream",
        ),
        (json!({"stream": "live/x\u{1}", "kind": "record"}), "stream"),
        (json!({"stream": "live/*", "kind": "record"}), "stream"),
        (
            json!({"stream": "live/x", "kind": "rtmp", "url": "http://x/a/b"}),
            "url",
        ),
        (json!({"stream": "live/x", "kind": "rtmp"}), "url"),
        (
            json!({"stream": "live/x", "kind": "record", "format": "avi"}),
            "format",
        ),
        (
            json!({"stream": "live/x", "kind": "carrier-pigeon"}),
            "kind",
        ),
    ] {
        let (status, v) = post_egress(&node, body.clone());
        assert_eq!(status, 400, "{body} → {v}");
        assert!(
            v["fields"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["field"] == field),
            "{body} → {v}"
        );
    }
    let (status, v) = post_egress(
        &node,
        json!({"stream": "live/x", "kind": "record", "bogus": 1}),
    );
    assert_eq!(status, 400, "{v}");
    let (_, list) = http_get(node.http, "/api/v1/egress").unwrap();
    assert_eq!(list.trim(), r#"{"egress":[]}"#);

    // The same rules apply to the config file, reported by `check-config`.
    let dir = temp_dir("egress-config");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[[egress]]\nstream = \"live/*\"\nkind = \"record\"\ntemplate = \"../{stream}.mp4\"\n\n[[egress]]\nstream = \"live/a\"\nkind = \"rtmp\"\nurl = \"rtmps://cdn/app/key\"\n",
    )
    .unwrap();
    let out = Command::new(&*BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("egress[0].template"), "{err}");
    assert!(err.contains("egress[1].url"), "{err}");
}

#[test]
fn an_edge_records_a_stream_it_pulls_and_new_segment_splits_at_a_reconnect() {
    let origin = NodeProc::start(NodeSpec::origin("o1"));
    let edge = NodeProc::start(NodeSpec {
        extra: "\n[recording]\nroot = \"rec\"\n".into(),
        ..NodeSpec::edge("e1", vec![origin.quic])
    });
    edge.wait_for_link_count(1);
    // The egress is created before the stream exists: it waits, then pulls it from upstream.
    let (status, e) = post_egress(
        &edge,
        json!({"stream": "live/far", "kind": "record", "on_reconnect": "new_segment"}),
    );
    assert_eq!(status, 201, "{e}");
    assert_eq!(e["state"], "waiting");
    let id = e["id"].as_str().unwrap().to_string();
    let opts = || PublishOpts {
        seconds: 5,
        ..Default::default()
    };
    let first = publish_and_wait(&origin.rtmp_url("far"), &origin, "far", opts());
    wait_until(Duration::from_secs(15), "edge recording", || {
        egress_status(&edge, &id)["state"] == "live"
    });
    assert!(edge
        .stream("far")
        .is_some_and(|s| s["source"]["kind"] == "relay"));
    assert!(first.wait(Duration::from_secs(20)).0);
    std::thread::sleep(Duration::from_secs(1));
    let second = publish_and_wait(&origin.rtmp_url("far"), &origin, "far", opts());
    assert!(second.wait(Duration::from_secs(20)).0);
    wait_until(Duration::from_secs(10), "two files", || {
        egress_status(&edge, &id)["files"].as_array().unwrap().len() == 2
    });
    let status = delete_egress(&edge, &id);
    assert_eq!(status["publisher_reconnects"], 1, "{status}");
    for f in status["files"].as_array().unwrap() {
        let path = edge.dir.join("rec").join(f.as_str().unwrap());
        let (streams, format) = probe_file(&path);
        assert_eq!(codec_of(&streams, "video"), "h264");
        assert_eq!(codec_of(&streams, "audio"), "aac");
        let d = duration(&format);
        assert!((2.5..=6.0).contains(&d), "{}: {d} s", path.display());
    }
}
