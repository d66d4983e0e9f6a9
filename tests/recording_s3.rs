//! Recordings to object storage, against a real S3-compatible server: moto's server mode
//! (from PyPI; `.ci/test` installs it into `target/test-peers/moto`). Finished segments
//! are uploaded and then deleted locally, uploads are retried while the server is down,
//! outcomes show in the job's status and in metrics, and files left by a crash are uploaded
//! when the node starts again.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::egress_api::{delete_egress, egress_status, start_egress};
use common::http::{http_get, http_raw};
use common::*;
use serde_json::{json, Value};

const BUCKET: &str = "recordings";

/// moto's S3 server on `port`, killed on drop.
struct Moto(Child);

impl Moto {
    fn start(port: u16) -> Moto {
        let bin = std::env::var("MESHCAST_MOTO_SERVER").unwrap_or_else(|_| {
            format!(
                "{}/target/test-peers/moto/bin/moto_server",
                env!("CARGO_MANIFEST_DIR")
            )
        });
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (run .ci/test, which installs moto)"));
        let addr = ([127, 0, 0, 1], port).into();
        wait_until(Duration::from_secs(30), "moto up", || {
            http_get(addr, "/").is_ok()
        });
        // A fresh moto holds nothing: make the bucket.
        let (status, _, body) = http_raw(addr, "PUT", &format!("/{BUCKET}"), "", "").unwrap();
        assert_eq!(status, 200, "create bucket: {body}");
        Moto(child)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bucket's object keys.
fn keys(port: u16) -> Vec<String> {
    let (status, body) = http_get(
        ([127, 0, 0, 1], port).into(),
        &format!("/{BUCKET}?list-type=2"),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    body.split("<Key>")
        .skip(1)
        .filter_map(|k| k.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

fn local_recordings(node: &NodeProc) -> Vec<std::path::PathBuf> {
    files_under(&node.dir.join("recordings"))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "mp4"))
        .collect()
}

fn record(node: &NodeProc, seconds: u64) -> Value {
    let id = start_egress(
        node,
        json!({"stream": "live/cam", "kind": "record", "format": "mp4", "segment_seconds": 2}),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let last = delete_egress(node, &id);
    assert!(last["files"].as_array().unwrap().len() >= 2, "{last}");
    last
}

#[test]
fn finished_segments_go_to_the_bucket_retried_until_it_answers_and_after_a_crash() {
    let port = free_port();
    let mut node = NodeProc::start(NodeSpec {
        extra: format!(
            "\n[recording.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"http://127.0.0.1:{port}\"\n\
             prefix = \"node-a/\"\naccess_key_id = \"test\"\nsecret_access_key = \"test-secret\"\n"
        ),
        ..NodeSpec::standalone()
    });
    let _publisher = publish_and_wait(&node.rtmp_url("cam"), &node, "cam", PublishOpts::default());

    // The server is not up yet: the first segments' uploads fail and wait on disk.
    let id = start_egress(
        &node,
        json!({"stream": "live/cam", "kind": "record", "format": "mp4", "segment_seconds": 2}),
    );
    wait_until(Duration::from_secs(20), "a failed upload", || {
        egress_status(&node, &id)["uploads"]["failed_attempts"].as_u64() >= Some(1)
    });
    assert!(!local_recordings(&node).is_empty());
    let moto = Moto::start(port);
    // The job shows its uploads catching up while it records.
    wait_until(Duration::from_secs(60), "uploads caught up", || {
        let u = &egress_status(&node, &id)["uploads"];
        u["uploaded"].as_u64() >= Some(2) && u["pending"].as_u64() == Some(0)
    });
    let status = egress_status(&node, &id);
    for k in status["uploads"]["keys"].as_array().unwrap() {
        let k = k.as_str().unwrap();
        assert!(k.starts_with("node-a/live/") && k.ends_with(".mp4"), "{k}");
    }
    let last = delete_egress(&node, &id);
    let files = last["files"].as_array().unwrap().len() as u64;
    // Every file ends up in the bucket (the last one once the job is over), and only there.
    wait_until(Duration::from_secs(60), "every file uploaded", || {
        keys(port).len() as u64 == files && node.metric("meshcast_recording_uploads_pending") == 0.0
    });
    let stored = keys(port);
    for f in last["files"].as_array().unwrap() {
        let key = format!("node-a/{}", f.as_str().unwrap());
        assert!(stored.contains(&key), "{key} not in {stored:?}");
    }
    assert!(
        local_recordings(&node).is_empty(),
        "{:?}",
        local_recordings(&node)
    );
    assert_eq!(
        node.metric("meshcast_recording_uploads_total"),
        files as f64
    );
    assert!(node.metric("meshcast_recording_upload_failures_total") >= 1.0);
    assert_eq!(node.metric("meshcast_recording_uploads_pending"), 0.0);

    // What went up is a recording: ffprobe reads a segment back from the bucket.
    let copy = node.dir.join("downloaded.mp4");
    std::fs::write(&copy, download(port, &stored[0])).unwrap();
    let probe = ffprobe_json(&copy.display().to_string());
    let video = probe["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["codec_type"] == "video")
        .cloned()
        .unwrap_or_default();
    assert_eq!(video["codec_name"], "h264", "{probe}");
    let duration: f64 = probe["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    assert!(duration > 1.0, "{probe}");

    // The server goes away, a recording finishes, the node crashes before the upload...
    drop(moto);
    let before = record(&node, 5);
    let left = local_recordings(&node);
    assert!(!left.is_empty(), "{before}");
    node.signal("KILL");
    let _ = node.child.wait();
    // ...and when both are back, what it left is uploaded and deleted.
    let _moto = Moto::start(port);
    node.child = spawn_node(&node.dir.join("node.toml"), &node.dir);
    wait_until(Duration::from_secs(60), "the leftovers uploaded", || {
        local_recordings(&node).is_empty()
    });
    let stored = keys(port);
    for f in &left {
        let rel = f.strip_prefix(node.dir.join("recordings")).unwrap();
        let key = format!("node-a/{}", rel.display());
        assert!(stored.contains(&key), "{key} not in {stored:?}");
    }
}

/// An object's bytes, read back over the S3 API (signed, as moto wants).
fn download(port: u16, key: &str) -> Vec<u8> {
    use object_store::{ObjectStore, ObjectStoreExt};
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test-secret")
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store: &dyn ObjectStore = &store;
        let got = store
            .get(&object_store::path::Path::from(key))
            .await
            .unwrap();
        got.bytes().await.unwrap().to_vec()
    })
}

fn ffprobe_json(url: &str) -> Value {
    let out = bounded::output_within(
        Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_streams",
                "-show_format",
                "-of",
                "json",
                url,
            ])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}
