//! The meeting page (`examples/meeting.html`, served at `/meet`) in headless Chromium with
//! fake cameras and tones: three participants on two edges in two regions behind two
//! origins see and hear each other, whisper, survive the loss of one's edge (which rejoins
//! through the route API) and see a closed tab leave.

mod common;

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::browser::{in_private_network, serve_page, Browser};
use common::rooms::*;
use common::*;
use meshcast::transcode::mix::tone_power;
use serde_json::{json, Value};

const PAGE: &str = include_str!("../examples/meeting.html");

struct Participant {
    identity: &'static str,
    browser: Option<Browser>,
    reports: Receiver<String>,
    last: Value,
}

impl Participant {
    fn open(
        identity: &'static str,
        entry: &NodeProc,
        room: &str,
        token: &str,
        region: &str,
        extra: &str,
    ) -> Participant {
        let (port, reports) = serve_page(PAGE.to_string());
        let url = format!(
            "http://127.0.0.1:{port}/?node=http://{}&room={room}&token={token}&region={region}&join=1&report=/result&report_every=1{extra}",
            entry.http
        );
        Participant {
            identity,
            browser: Some(Browser::open(&url)),
            reports,
            last: Value::Null,
        }
    }

    /// The latest report (waits for the next one).
    fn report(&mut self) -> &Value {
        let r = self
            .reports
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{}'s page reported nothing for 20 s", self.identity));
        self.last = serde_json::from_str(&r).unwrap();
        while let Ok(r) = self.reports.try_recv() {
            self.last = serde_json::from_str(&r).unwrap();
        }
        &self.last
    }

    fn frames_of(&self, other: &str) -> u64 {
        self.last["remotes"][other]["framesDecoded"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The first `left` event about `who`, asserted to come within `ms` of `since` (unix ms).
    fn left_within(&self, who: &str, since: i64, ms: i64) -> Value {
        let left = self.events("left", who)[0].clone();
        let after = left["at"].as_i64().unwrap() - since;
        assert!(
            after < ms,
            "{} saw {who} leave {after} ms after",
            self.identity
        );
        left
    }

    fn events(&self, kind: &str, about: &str) -> Vec<Value> {
        self.last["events"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|e| {
                        e["type"] == kind
                            && (e["identity"] == about
                                || e["participant"]["identity"] == about
                                || e["from"] == about)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn wait_for(
    ps: &mut [&mut Participant],
    within: Duration,
    what: &str,
    ok: impl Fn(&Participant) -> bool,
) {
    let t = Instant::now();
    loop {
        let mut all = true;
        for p in ps.iter_mut() {
            p.report();
            all &= ok(p);
        }
        if all {
            return;
        }
        if t.elapsed() > within {
            for p in ps.iter() {
                eprintln!("{}: {}", p.identity, p.last);
            }
            panic!("not within {within:?}: {what}");
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn three_browsers_across_the_cluster_meet_whisper_lose_an_edge_and_leave() {
    if !in_private_network("three_browsers_across_the_cluster_meet_whisper_lose_an_edge_and_leave")
    {
        return;
    }
    let (a, b, edge_us, mut edge_eu) = cluster();
    let (status, page) = common::http::http_get(edge_us.http, "/meet").unwrap();
    assert!(
        status == 200 && page.contains("meshcast meeting"),
        "{status}"
    );
    let id = create_room(
        &a,
        &[&b, &edge_us, &edge_eu],
        json!({ "empty_timeout_s": 4 }),
    );
    let token = |who| join_token(&a, &id, who);
    // Alice and Carol in the us, Bob in the eu; each with a tone of its own.
    let mut alice = Participant::open(
        "alice",
        &edge_us,
        &id,
        &token("alice"),
        "us",
        "&tone=440&whisper=bob,carol&whisper_after=10",
    );
    let mut bob = Participant::open("bob", &edge_eu, &id, &token("bob"), "eu", "&tone=660");
    let mut carol = Participant::open("carol", &edge_us, &id, &token("carol"), "us", "&tone=880");

    // Everyone decodes the other two's video and receives their audio.
    let others = |p: &Participant| -> Vec<&'static str> {
        ["alice", "bob", "carol"]
            .into_iter()
            .filter(|o| *o != p.identity)
            .collect()
    };
    wait_for(
        &mut [&mut alice, &mut bob, &mut carol],
        Duration::from_secs(45),
        "each decodes the others",
        |p| {
            others(p).iter().all(|o| {
                let r = &p.last["remotes"][*o];
                r["framesDecoded"].as_u64().unwrap_or(0) >= 20
                    && r["audioPackets"].as_u64().unwrap_or(0) >= 50
            })
        },
    );
    for p in [&alice, &bob, &carol] {
        assert_eq!(p.last["errors"], json!([]), "{}: {}", p.identity, p.last);
        // Each is served by the node of its region.
        let node = p.last["node"].as_str().unwrap();
        let want = if p.identity == "bob" {
            edge_eu.http
        } else {
            edge_us.http
        };
        assert_eq!(node, format!("http://{want}"), "{}", p.identity);
    }
    // Their tones make one of them the active speaker (RFC 6464 levels from Chromium).
    wait_for(
        &mut [&mut alice, &mut bob, &mut carol],
        Duration::from_secs(10),
        "an active speaker",
        |p| p.last["speaker"].is_string(),
    );
    let speaker = alice.last["speaker"].clone();
    assert!(
        ["alice", "bob", "carol"].contains(&speaker.as_str().unwrap()),
        "{speaker}"
    );

    // Each learned of each other once: in its welcome, or by a join event.
    for p in [&alice, &bob, &carol] {
        for o in others(p) {
            let welcomed = p.last["events"][0]["participants"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["identity"] == o)
                .count();
            assert_eq!(
                welcomed + p.events("joined", o).len(),
                1,
                "{} of {o}",
                p.identity
            );
        }
    }

    // Alice's whispers (10 s after she joined) reach Bob (eu) and Carol (us) only.
    wait_for(
        &mut [&mut bob, &mut carol],
        Duration::from_secs(20),
        "the whispers arrive",
        |p| p.events("data", "alice").len() >= 2,
    );
    for p in [&bob, &carol] {
        let data = p.events("data", "alice");
        let whispers: Vec<&Value> = data.iter().filter(|e| e["whisper"] == true).collect();
        assert_eq!(whispers.len(), 1, "{}: {data:?}", p.identity);
        assert_eq!(
            whispers[0]["payload"],
            format!("from alice to {}", p.identity)
        );
        assert!(data
            .iter()
            .any(|e| e["whisper"] == false && e["payload"] == "hello from alice"));
    }
    alice.report();
    assert!(
        alice.events("data", "alice").is_empty(),
        "no echo to the sender"
    );

    // Bob's edge dies. Alice and Carol see him leave within 5 s and keep seeing each other;
    // his page rejoins through the route API and they see him come back.
    let (ac, ca) = (alice.frames_of("carol"), carol.frames_of("alice"));
    let killed = now_ms();
    edge_eu.signal("KILL");
    let _ = edge_eu.child.wait();
    wait_for(
        &mut [&mut alice, &mut carol],
        Duration::from_secs(10),
        "bob is seen leaving",
        |p| !p.events("left", "bob").is_empty(),
    );
    for p in [&alice, &carol] {
        // `lost` when his old session expired first, `rejoined` when his page came back
        // through another node before that.
        let left = p.left_within("bob", killed, 5000);
        assert!(
            left["reason"] == "lost" || left["reason"] == "rejoined",
            "{left}"
        );
    }
    wait_for(
        &mut [&mut alice, &mut carol, &mut bob],
        Duration::from_secs(20),
        "bob rejoins and is watched again",
        |p| {
            if p.identity == "bob" {
                p.last["joins"] == 2 && p.frames_of("alice") > 0 && p.frames_of("carol") > 0
            } else {
                p.events("joined", "bob")
                    .iter()
                    .any(|e| e["at"].as_i64().unwrap_or(0) > killed)
                    && p.frames_of("bob") > 0
            }
        },
    );
    assert!(
        alice.frames_of("carol") >= ac + 30,
        "alice kept decoding carol: {ac} → {}",
        alice.frames_of("carol")
    );
    assert!(
        carol.frames_of("alice") >= ca + 30,
        "carol kept decoding alice: {ca} → {}",
        carol.frames_of("alice")
    );
    assert!(alice.events("left", "carol").is_empty() && carol.events("left", "alice").is_empty());

    // Carol closes her tab: Alice and Bob are told within 5 s.
    let closed = now_ms();
    carol.browser.take();
    wait_for(
        &mut [&mut alice, &mut bob],
        Duration::from_secs(10),
        "carol is seen leaving",
        |p| !p.events("left", "carol").is_empty(),
    );
    for p in [&alice, &bob] {
        assert_eq!(p.left_within("carol", closed, 5000)["reason"], "left");
    }

    // Everyone leaves; the empty room is gone from every node after its timeout.
    alice.browser.take();
    bob.browser.take();
    for n in [&a, &b, &edge_us] {
        wait_until(Duration::from_secs(15), "the empty room closes", || {
            admin(n, "GET", &format!("/api/v1/rooms/{id}"), None).0 == 404
        });
    }
}

/// A child process killed when the test is done with it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The audio of `input` (a file or URL) for `seconds`, mono f32 at 16 kHz.
fn audio_of(input: &str, seconds: u32) -> Vec<f32> {
    let out = common::bounded::output_within(
        std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-i", input, "-t", &seconds.to_string()])
            .args(["-vn", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"]),
        Duration::from_secs(30),
    );
    out.stdout
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn a_room_is_recorded_and_pushed_as_one_mixed_stream() {
    if !in_private_network("a_room_is_recorded_and_pushed_as_one_mixed_stream") {
        return;
    }
    let nginx_dir = temp_dir("nginx");
    let nginx = common::nginx::Nginx::start(&nginx_dir, free_port());
    let node = NodeProc::start(NodeSpec {
        extra: "\n[recording]\nroot = \"rec\"\n".into(),
        ..NodeSpec::standalone()
    });
    let (status, room) =
        common::http::http_request(node.http, "POST", "/api/v1/rooms", Some("{}")).unwrap();
    assert_eq!(status, 201, "{room}");
    let room: Value = serde_json::from_str(&room).unwrap();
    let id = room["id"].as_str().unwrap().to_string();

    // Alice in a browser (VP8 + Opus, a 440 Hz tone); Bob from ffmpeg over RTMP (H.264 +
    // AAC, 1000 Hz), his presence held by an event channel of his own.
    let (port, reports) = serve_page(PAGE.to_string());
    let _alice = Browser::open(&format!(
        "http://127.0.0.1:{port}/?node=http://{}&room={id}&identity=alice&join=1&tone=440&report=/result&report_every=1",
        node.http
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bob_ws = format!("ws://{}/api/v1/rooms/{id}/events?identity=bob", node.http);
    let presence = rt.spawn(async move {
        use futures_util::StreamExt;
        let (mut ws, _) = tokio_tungstenite::connect_async(bob_ws).await.unwrap();
        while ws.next().await.is_some() {}
    });
    let bob = KillOnDrop(
        std::process::Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-re",
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=320x240:rate=15",
            ])
            .args(["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000"])
            .args([
                "-t",
                "40",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-tune",
                "zerolatency",
                "-g",
                "15",
            ])
            .args(["-c:a", "aac", "-f", "flv"])
            .arg(format!("rtmp://{}/room/{id}.bob", node.rtmp))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("ffmpeg"),
    );
    wait_until(Duration::from_secs(30), "both participants publish", || {
        let (_, text) = common::http::http_get(node.http, &format!("/api/v1/rooms/{id}")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        v["participants"]
            .as_array()
            .is_some_and(|ps| ps.len() == 2 && ps.iter().all(|p| p["track"].is_object()))
    });
    let alice_report: Value =
        serde_json::from_str(&reports.recv_timeout(Duration::from_secs(20)).unwrap()).unwrap();
    assert_eq!(alice_report["published"], true, "{alice_report}");

    // A grid recording and a speaker-view push to nginx-rtmp.
    let record = common::egress_api::start_egress(
        &node,
        json!({"room": id, "kind": "record", "layout": "grid", "template": "{ns}/mix.{ext}"}),
    );
    let push = common::egress_api::start_egress(
        &node,
        json!({"room": id, "kind": "rtmp", "layout": "speaker", "url": nginx.url("room")}),
    );
    wait_until(Duration::from_secs(20), "both egresses live", || {
        [&record, &push]
            .iter()
            .all(|e| common::egress_api::egress_status(&node, e)["state"] == "live")
    });
    // Each layout is mixed once, on this node.
    let streams = node.streams();
    for layout in ["grid", "speaker"] {
        let name = format!("room/{id}~mix.{layout}");
        assert_eq!(
            streams
                .iter()
                .filter(|s| s["name"] == name.as_str() || s["stream"] == name.as_str())
                .count(),
            1,
            "{streams:?}"
        );
    }
    // What nginx serves: H.264 and AAC, and both tones in the mixed audio.
    let probe = ffprobe(&nginx.url("room"), 4);
    assert_eq!(probe.stream_of("video").unwrap()["codec_name"], "h264");
    assert_eq!(probe.stream_of("audio").unwrap()["codec_name"], "aac");
    let pushed = audio_of(&nginx.url("room"), 4);
    let both = |pcm: &[f32], what: &str| {
        assert!(pcm.len() > 16_000, "{what}: {} samples", pcm.len());
        let (p440, p1000, p700) = (
            tone_power(pcm, 440.0, 16_000.0),
            tone_power(pcm, 1000.0, 16_000.0),
            tone_power(pcm, 700.0, 16_000.0),
        );
        assert!(
            p440 > 20.0 * p700 && p1000 > 20.0 * p700,
            "{what}: 440 Hz {p440}, 1000 Hz {p1000}, 700 Hz {p700}"
        );
    };
    both(&pushed, "pushed");

    std::thread::sleep(Duration::from_secs(3));
    let done = common::egress_api::delete_egress(&node, &record);
    let file = node
        .dir
        .join("rec")
        .join(done["files"][0].as_str().unwrap());
    let probe = ffprobe(file.to_str().unwrap(), 30);
    assert_eq!(probe.stream_of("video").unwrap()["codec_name"], "h264");
    assert_eq!(probe.stream_of("video").unwrap()["width"], 640);
    assert_eq!(probe.stream_of("audio").unwrap()["codec_name"], "aac");
    both(&audio_of(file.to_str().unwrap(), 30), "recorded");
    common::egress_api::delete_egress(&node, &push);
    presence.abort();
    drop(bob);
}
