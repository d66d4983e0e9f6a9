//! The backbone against a misbehaving peer: a fake origin (quinn + meshcast's own sans-IO
//! session) that answers a real edge process with malformed media streams.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use meshcast::backbone::session::{ControlSession, PeerInfo, SessionEvent};
use meshcast::backbone::wire::{GroupHeader, MediaItem};
use meshcast::config::Role;
use meshcast::media::{Codec, StreamConfig, VideoConfig};

async fn read_events(
    session: &mut ControlSession,
    recv: &mut quinn::RecvStream,
    send: &mut quinn::SendStream,
) -> Vec<SessionEvent> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(15), recv.read(&mut buf))
        .await
        .expect("edge talks")
        .unwrap()
        .expect("control stream open");
    let events = session.handle_input(&buf[..n]).unwrap();
    while let Some(b) = session.poll_transmit() {
        send.write_all(&b).await.unwrap();
    }
    events
}

/// The first event `pick` takes, within 20 s. Events come batched with others (node-state
/// records arrive every second, and under load share a read with what is awaited), so
/// every event of every read is looked at.
async fn next_event<T>(
    session: &mut ControlSession,
    recv: &mut quinn::RecvStream,
    send: &mut quinn::SendStream,
    what: &str,
    pick: impl Fn(&SessionEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        let events = read_events(session, recv, send).await;
        if let Some(found) = events.iter().find_map(&pick) {
            return found;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_media_from_upstream_is_dropped_and_the_edge_keeps_serving() {
    let cfg = meshcast::config::Config::standalone_default();
    let server = meshcast::backbone::tls::server_config(&cfg.backbone).unwrap();
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let fake_origin = endpoint.local_addr().unwrap();
    let edge = tokio::task::spawn_blocking(move || {
        NodeProc::start(NodeSpec::edge("edge-1", vec![fake_origin]))
    })
    .await
    .unwrap();

    let within = Duration::from_secs(15);
    let conn = tokio::time::timeout(within, async {
        endpoint.accept().await.unwrap().await.unwrap()
    })
    .await
    .expect("the edge connects");
    let (mut send, mut recv) = tokio::time::timeout(within, conn.accept_bi())
        .await
        .expect("the edge opens its control stream")
        .unwrap();
    let mut session = ControlSession::acceptor(
        PeerInfo {
            node_id: "fake-origin".into(),
            role: Role::Origin,
            region: "r".into(),
        },
        TEST_TOKEN,
        rand::random(),
        meshcast::backbone::channel_binding(&conn).unwrap(),
    );
    next_event(
        &mut session,
        &mut recv,
        &mut send,
        "the session is ready",
        |e| matches!(e, SessionEvent::Ready(_)).then_some(()),
    )
    .await;

    // Once the edge has taken the welcome, a viewer asks it for a stream: the edge
    // subscribes upstream.
    wait_until_async(|| edge.links().len() == 1).await;
    let http = edge.http;
    let viewer = tokio::task::spawn_blocking(move || http_get(http, "/live/x.flv"));
    let id = next_event(
        &mut session,
        &mut recv,
        &mut send,
        "the edge subscribes upstream",
        |e| match e {
            SessionEvent::SubscribeRequested { id, .. } => Some(*id),
            _ => None,
        },
    )
    .await;
    session.accept(id, 1).unwrap();
    while let Some(b) = session.poll_transmit() {
        send.write_all(&b).await.unwrap();
    }

    // Group 0: a valid configuration, so the relay goes live.
    let mut g0 = BytesMut::new();
    GroupHeader {
        subscription: id,
        sequence: 0,
    }
    .encode(&mut g0);
    MediaItem::Config(StreamConfig {
        video: Some(VideoConfig {
            codec: Codec::H264,
            record: bytes::Bytes::from_static(&[1, 0x64, 0, 0x1f, 0xff, 0xe0, 0]),
            width: 16,
            height: 16,
        }),
        ..Default::default()
    })
    .encode(&mut g0);
    let mut s0 = conn.open_uni().await.unwrap();
    s0.write_all(&g0).await.unwrap();
    wait_until_async(|| edge.stream("x").is_some()).await;

    // Bad magic.
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(b"XXgarbage-garbage-garbage").await.unwrap();
    let _ = s.finish();
    // Valid header, then an item claiming 4 GiB.
    let mut b = BytesMut::new();
    GroupHeader {
        subscription: id,
        sequence: 1,
    }
    .encode(&mut b);
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 2]);
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&b).await.unwrap();
    let _ = s.finish();
    // Valid header, then a frame with an unknown codec and a truncated body.
    let mut b = BytesMut::new();
    GroupHeader {
        subscription: id,
        sequence: 2,
    }
    .encode(&mut b);
    b.extend_from_slice(&[0, 0, 0, 4, 2, 99, 0, 0]);
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&b).await.unwrap();
    let _ = s.finish();

    wait_until_async(|| {
        let log = edge.log();
        log.contains("bad group stream") && log.contains("malformed media item")
    })
    .await;
    // The edge is still healthy and answers.
    let (status, _) = http_get(edge.http, "/healthz").unwrap();
    assert_eq!(status, 200);
    assert!(edge.log().matches("panicked").count() == 0);

    // The fake origin disappears: the pull ends and the viewer's response ends.
    conn.close(0u32.into(), b"bye");
    let (status, _) = viewer.await.unwrap().unwrap();
    assert_eq!(status, 200);
    wait_until_async(|| edge.stream("x").is_none()).await;
}

async fn wait_until_async(mut f: impl FnMut() -> bool) {
    for _ in 0..150 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not met within 15 s");
}
