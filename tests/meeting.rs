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
