//! Rooms on a node: the REST API, join tokens, the event channel (joins, leaves, tracks,
//! mutes, data messages and whispers), bounds on what a participant sends, and leaving by
//! closing, by going silent and by the room's empty timeout.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::http_raw;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::rooms::*;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(http: SocketAddr, room: &str, token: &str) -> Result<Ws, String> {
    let url = format!("ws://{http}/api/v1/rooms/{room}/events?token={token}");
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(format!(
            "{} {}",
            r.status(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The next JSON event, within `within`; `None` if none came (pings are skipped).
async fn next_event(ws: &mut Ws, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(c)))) => {
                return Some(json!({ "type": "socket_closed", "frame": format!("{c:?}") }))
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return Some(json!({ "type": "socket_closed" })),
            Err(_) => return None,
        }
    }
}

async fn expect(ws: &mut Ws, kind: &str) -> Value {
    let e = next_event(ws, Duration::from_secs(5)).await;
    let e = e.unwrap_or_else(|| panic!("no {kind} event within 5 s"));
    assert_eq!(e["type"], kind, "{e}");
    e
}

async fn expect_quiet(ws: &mut Ws, within: Duration) {
    if let Some(e) = next_event(ws, within).await {
        panic!("expected nothing, got {e}");
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

fn node_with_auth() -> NodeProc {
    NodeProc::start(NodeSpec {
        extra: format!(
            "\n[auth]\nsecrets = [\"{SECRET}\"]\n\n[rooms]\nmax_message_bytes = 1024\nmessages_per_s = 5\nmessage_burst = 10\n"
        ),
        ..NodeSpec::standalone()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_see_each_other_join_publish_mute_whisper_and_leave() {
    let node = node_with_auth();
    let (status, room) = admin(
        &node,
        "POST",
        "/api/v1/rooms",
        Some(json!({ "name": "standup", "max_participants": 4, "empty_timeout_s": 2 })),
    );
    assert_eq!(status, 201, "{room}");
    let id = room["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 22);
    assert_eq!(room["join"]["events"], format!("/api/v1/rooms/{id}/events"));

    let (ta, tb, tc) = (
        join_token(&node, &id, "alice"),
        join_token(&node, &id, "bob"),
        join_token(&node, &id, "carol"),
    );
    let mut alice = connect(node.http, &id, &ta).await.unwrap();
    let w = expect(&mut alice, "welcome").await;
    assert_eq!(w["you"]["identity"], "alice");
    assert_eq!(w["you"]["name"], "ALICE");
    assert_eq!(w["room"]["name"], "standup");
    assert_eq!(w["participants"], json!([]));

    let mut bob = connect(node.http, &id, &tb).await.unwrap();
    let w = expect(&mut bob, "welcome").await;
    assert_eq!(w["participants"][0]["identity"], "alice");
    assert_eq!(
        expect(&mut alice, "joined").await["participant"]["identity"],
        "bob"
    );

    let mut carol = connect(node.http, &id, &tc).await.unwrap();
    expect(&mut carol, "welcome").await;
    for ws in [&mut alice, &mut bob] {
        assert_eq!(
            expect(ws, "joined").await["participant"]["identity"],
            "carol"
        );
    }

    // Bob publishes his own stream (WHIP, with his join token): everyone is told.
    let udp = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (v, a) = (udp(), udp());
    let bob_path = format!("/whip/room/{id}.bob?token={tb}");
    let http = node.http;
    let publisher = tokio::spawn(async move {
        meshcast::webrtc::client::publish_rtp(
            http,
            &bob_path,
            tokio::net::UdpSocket::from_std({
                v.set_nonblocking(true).unwrap();
                v
            })
            .unwrap(),
            tokio::net::UdpSocket::from_std({
                a.set_nonblocking(true).unwrap();
                a
            })
            .unwrap(),
            Duration::from_secs(4),
        )
        .await
    });
    let stream = format!("room/{id}.bob");
    for ws in [&mut alice, &mut carol, &mut bob] {
        let e = expect(ws, "track_published").await;
        assert_eq!(
            (e["identity"].as_str(), e["stream"].as_str()),
            (Some("bob"), Some(stream.as_str()))
        );
    }
    // Nobody publishes as someone else, nor into a room with another room's token.
    let (status, _, body) = http_raw(
        node.http,
        "POST",
        &format!("/whip/room/{id}.alice?token={tb}"),
        "Content-Type: application/sdp\r\n",
        "v=0\r\n",
    )
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("only its own stream"), "{body}");
    let (status, _, body) = http_raw(
        node.http,
        "POST",
        &format!("/whep/live/x?token={tb}"),
        "Content-Type: application/sdp\r\n",
        "v=0\r\n",
    )
    .unwrap();
    assert_eq!(
        status, 403,
        "a join token plays nothing outside its room: {body}"
    );

    // Mutes are told to everyone else.
    send(
        &mut bob,
        json!({ "type": "mute", "kind": "audio", "muted": true }),
    )
    .await;
    for ws in [&mut alice, &mut carol] {
        let e = expect(ws, "muted").await;
        assert_eq!(
            (
                e["identity"].as_str(),
                e["kind"].as_str(),
                e["muted"].as_bool()
            ),
            (Some("bob"), Some("audio"), Some(true))
        );
    }

    // A whisper reaches its target only; a broadcast reaches everyone but the sender.
    send(
        &mut alice,
        json!({ "type": "data", "to": "bob", "payload": { "secret": 42 } }),
    )
    .await;
    let e = expect(&mut bob, "data").await;
    assert_eq!(
        (e["from"].as_str(), e["whisper"].as_bool()),
        (Some("alice"), Some(true))
    );
    assert_eq!(e["payload"]["secret"], 42);
    send(
        &mut alice,
        json!({ "type": "data", "payload": "hello all" }),
    )
    .await;
    let e = expect(&mut carol, "data").await;
    assert_eq!(
        (e["payload"].as_str(), e["whisper"].as_bool()),
        (Some("hello all"), Some(false)),
        "carol must not get the whisper"
    );
    assert_eq!(expect(&mut bob, "data").await["payload"], "hello all");
    expect_quiet(&mut alice, Duration::from_millis(300)).await;
    // A whisper to nobody is refused with a reason.
    send(
        &mut alice,
        json!({ "type": "data", "to": "mallory", "payload": 1 }),
    )
    .await;
    assert!(expect(&mut alice, "error").await["reason"]
        .as_str()
        .unwrap()
        .contains("no participant mallory"));

    // Bad input from carol: each refused with a reason, and nobody else is affected.
    send(
        &mut carol,
        json!({ "type": "data", "payload": "x".repeat(2000) }),
    )
    .await;
    let e = expect(&mut carol, "error").await;
    assert!(
        e["reason"].as_str().unwrap().contains("max_message_bytes"),
        "{e}"
    );
    carol.send(Message::Text("{not json".into())).await.unwrap();
    assert!(expect(&mut carol, "error").await["reason"]
        .as_str()
        .unwrap()
        .contains("malformed"));
    carol
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    expect(&mut carol, "error").await;
    send(&mut carol, json!({ "type": "kick", "who": "alice" })).await;
    expect(&mut carol, "error").await;
    // A flood: the burst passes, the rest is refused for its rate.
    for i in 0..30 {
        send(&mut carol, json!({ "type": "data", "payload": i })).await;
    }
    let mut passed = 0;
    let mut refused = 0;
    while let Some(e) = next_event(&mut carol, Duration::from_millis(500)).await {
        assert_eq!(e["type"], "error", "{e}");
        assert!(
            e["reason"].as_str().unwrap().contains("messages_per_s"),
            "{e}"
        );
        refused += 1;
    }
    while let Some(e) = next_event(&mut alice, Duration::from_millis(300)).await {
        assert_eq!(
            (e["type"].as_str(), e["from"].as_str()),
            (Some("data"), Some("carol"))
        );
        passed += 1;
    }
    assert!(
        (5..=12).contains(&passed) && passed + refused == 30,
        "passed {passed}, refused {refused}"
    );
    // Bob's whisper still reaches alice.
    while next_event(&mut bob, Duration::from_millis(200))
        .await
        .is_some()
    {}
    send(
        &mut bob,
        json!({ "type": "data", "to": "alice", "payload": "still here" }),
    )
    .await;
    assert_eq!(expect(&mut alice, "data").await["payload"], "still here");

    // A token for another room is refused before the upgrade.
    let (status, other) = admin(&node, "POST", "/api/v1/rooms", None);
    assert_eq!(status, 201);
    let other_token = join_token(&node, other["id"].as_str().unwrap(), "alice");
    let e = connect(node.http, &id, &other_token).await.unwrap_err();
    assert!(e.starts_with("403") && e.contains("another room"), "{e}");
    let e = connect(node.http, &id, "garbage").await.unwrap_err();
    assert!(e.starts_with("401"), "{e}");

    // The API lists the room and its participants.
    let (status, v) = admin(&node, "GET", &format!("/api/v1/rooms/{id}"), None);
    assert_eq!(status, 200);
    let mut who: Vec<&str> = v["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["identity"].as_str().unwrap())
        .collect();
    who.sort();
    assert_eq!(who, ["alice", "bob", "carol"]);
    let bob_entry = v["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["identity"] == "bob")
        .unwrap();
    assert_eq!(bob_entry["track"]["stream"], stream.as_str());
    assert_eq!(bob_entry["audio_muted"], true);

    // Carol closes her tab: the others are told at once.
    let t = Instant::now();
    carol.close(None).await.unwrap();
    for ws in [&mut alice, &mut bob] {
        let e = expect(ws, "left").await;
        assert_eq!(
            (e["identity"].as_str(), e["reason"].as_str()),
            (Some("carol"), Some("left"))
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5));

    // Bob's network goes silent (he stops reading, so he answers no ping): gone within 5 s
    // of the last frame he sent (his track ends too, when his publisher stops).
    let t = Instant::now();
    let silent = bob;
    loop {
        let e = next_event(&mut alice, Duration::from_secs(8))
            .await
            .expect("bob's leave");
        if e["type"] == "track_unpublished" {
            continue;
        }
        assert_eq!(e["type"], "left", "{e}");
        assert_eq!(
            (e["identity"].as_str(), e["reason"].as_str()),
            (Some("bob"), Some("lost"))
        );
        break;
    }
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    drop(silent);
    let _ = publisher.await;

    // Alice leaves; the empty room is gone after its 2 s timeout.
    drop(alice);
    wait_until(Duration::from_secs(8), "the empty room closes", || {
        admin(&node, "GET", &format!("/api/v1/rooms/{id}"), None).0 == 404
    });
    let (_, list) = admin(&node, "GET", "/api/v1/rooms", None);
    assert!(list["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["id"] != id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spans_the_cluster_and_survives_the_loss_of_a_participants_edge() {
    let (a, b, edge_us, mut edge_eu) = cluster();
    // Made on origin A; every node learns it.
    let id = create_room(
        &a,
        &[&b, &edge_us, &edge_eu],
        json!({ "empty_timeout_s": 30 }),
    );
    // Alice and Carol in the us (edge-us, origin-a), Bob in the eu (edge-eu).
    let mut alice = connect(edge_us.http, &id, &join_token(&a, &id, "alice"))
        .await
        .unwrap();
    expect(&mut alice, "welcome").await;
    let tb = join_token(&a, &id, "bob");
    let mut bob = connect(edge_eu.http, &id, &tb).await.unwrap();
    let w = expect(&mut bob, "welcome").await;
    // Alice's join may still be on its way to edge-eu: then it follows the welcome.
    if w["participants"].as_array().unwrap().is_empty() {
        assert_eq!(
            expect(&mut bob, "joined").await["participant"]["identity"],
            "alice"
        );
    }
    assert_eq!(
        expect(&mut alice, "joined").await["participant"]["identity"],
        "bob"
    );
    let mut carol = connect(a.http, &id, &join_token(&a, &id, "carol"))
        .await
        .unwrap();
    let w = expect(&mut carol, "welcome").await;
    let mut present: Vec<&str> = w["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["identity"].as_str().unwrap())
        .collect();
    present.sort();
    assert_eq!(present, ["alice", "bob"], "{w}");
    for ws in [&mut alice, &mut bob] {
        let e = expect(ws, "joined").await;
        assert_eq!(e["participant"]["identity"], "carol");
        assert_eq!(e["participant"]["node"], "origin-a");
    }

    // Bob publishes on origin B (where an edge's WHIP would be sent): everyone sees it.
    let udp = || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        tokio::net::UdpSocket::from_std(s).unwrap()
    };
    let (bhttp, path) = (b.http, format!("/whip/room/{id}.bob?token={tb}"));
    let publisher = tokio::spawn(async move {
        meshcast::webrtc::client::publish_rtp(bhttp, &path, udp(), udp(), Duration::from_secs(3))
            .await
    });
    for ws in [&mut alice, &mut carol, &mut bob] {
        let e = expect(ws, "track_published").await;
        assert_eq!(e["identity"], "bob");
    }

    // Whispers across regions (alice → bob) and within one (alice → carol), each reaching
    // its target only; a broadcast reaches everyone else.
    send(
        &mut alice,
        json!({ "type": "data", "to": "bob", "payload": "to bob" }),
    )
    .await;
    send(
        &mut alice,
        json!({ "type": "data", "to": "carol", "payload": "to carol" }),
    )
    .await;
    send(&mut alice, json!({ "type": "data", "payload": "to all" })).await;
    for (ws, mine) in [(&mut bob, "to bob"), (&mut carol, "to carol")] {
        let e = expect(ws, "data").await;
        assert_eq!(
            (
                e["payload"].as_str(),
                e["whisper"].as_bool(),
                e["from"].as_str()
            ),
            (Some(mine), Some(true), Some("alice"))
        );
        let e = expect(ws, "data").await;
        assert_eq!(
            (e["payload"].as_str(), e["whisper"].as_bool()),
            (Some("to all"), Some(false))
        );
    }
    expect_quiet(&mut alice, Duration::from_millis(500)).await;
    expect_quiet(&mut bob, Duration::from_millis(300)).await;
    let _ = publisher.await;
    // The operator ends Bob's stream; everyone is told.
    let kick = admin(
        &b,
        "DELETE",
        &format!("/api/v1/streams/room/{id}.bob"),
        None,
    );
    assert!(kick.0 < 300, "{kick:?}");
    // (Read together: a socket nobody reads answers no ping and would be dropped as lost.)
    let long = Duration::from_secs(12);
    let (x, y, z) = tokio::join!(
        expect_within(&mut alice, "track_unpublished", long),
        expect_within(&mut carol, "track_unpublished", long),
        expect_within(&mut bob, "track_unpublished", long)
    );
    for e in [x, y, z] {
        assert_eq!(e["identity"], "bob");
    }

    // Bob's edge dies: Alice and Carol keep each other and see Bob leave, within 5 s.
    let killed = Instant::now();
    edge_eu.signal("KILL");
    let six = Duration::from_secs(6);
    let (x, y) = tokio::join!(
        expect_within(&mut alice, "left", six),
        expect_within(&mut carol, "left", six)
    );
    for e in [x, y] {
        assert_eq!(
            (e["identity"].as_str(), e["reason"].as_str()),
            (Some("bob"), Some("lost"))
        );
    }
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "{:?}",
        killed.elapsed()
    );
    send(
        &mut carol,
        json!({ "type": "data", "to": "alice", "payload": "still here" }),
    )
    .await;
    assert_eq!(expect(&mut alice, "data").await["payload"], "still here");
    let _ = edge_eu.child.wait();

    // Bob comes back through another node with the same identity: the others see him join.
    let mut bob = connect(b.http, &id, &tb).await.unwrap();
    let w = expect(&mut bob, "welcome").await;
    assert_eq!(w["participants"].as_array().unwrap().len(), 2, "{w}");
    for ws in [&mut alice, &mut carol] {
        let e = expect(ws, "joined").await;
        assert_eq!(
            (
                e["participant"]["identity"].as_str(),
                e["participant"]["node"].as_str()
            ),
            (Some("bob"), Some("origin-b"))
        );
    }
    // Carol closes her tab: Alice (us) and Bob (eu) are told.
    carol.close(None).await.unwrap();
    for ws in [&mut alice, &mut bob] {
        let e = expect(ws, "left").await;
        assert_eq!(
            (e["identity"].as_str(), e["reason"].as_str()),
            (Some("carol"), Some("left"))
        );
    }
    // Closing the room on origin B disconnects Alice on edge-us.
    assert_eq!(
        admin(&b, "DELETE", &format!("/api/v1/rooms/{id}"), None).0,
        204
    );
    assert_eq!(expect(&mut alice, "closed").await["type"], "closed");
    for n in [&a, &edge_us] {
        wait_until(
            Duration::from_secs(5),
            "the room is gone everywhere",
            || admin(n, "GET", &format!("/api/v1/rooms/{id}"), None).0 == 404,
        );
    }
}

async fn expect_within(ws: &mut Ws, kind: &str, within: Duration) -> Value {
    let e = next_event(ws, within).await;
    let e = e.unwrap_or_else(|| panic!("no {kind} event within {within:?}"));
    assert_eq!(e["type"], kind, "{e}");
    e
}
