//! The hub's unit tests: publish, subscribe, overflow, holds, limits.

use bytes::Bytes;

use super::*;
use crate::media::{Codec, Frame, Timebase, VideoConfig};

fn hub(buffer: usize) -> Arc<Hub> {
    let limits = Limits {
        stream_buffer_frames: buffer,
        max_lag_events: 2,
        ..Limits::default()
    };
    Hub::new(limits, Arc::new(Metrics::new()))
}

fn hub_holding(publisher_hold: Duration) -> Arc<Hub> {
    let limits = Limits {
        publisher_hold,
        ..Limits::default()
    };
    Hub::new(limits, Arc::new(Metrics::new()))
}

fn key() -> StreamKey {
    StreamKey::new("live", "s").unwrap()
}

fn video(dts: i64, keyframe: bool) -> Arc<Packet> {
    Packet::new(Frame {
        codec: Codec::H264,
        dts,
        pts: dts,
        timebase: Timebase::MILLIS,
        keyframe,
        payload: Bytes::from_static(&[0, 0, 0, 1, 0x65]),
    })
}

fn config() -> StreamConfig {
    StreamConfig {
        video: Some(VideoConfig {
            codec: Codec::H264,
            record: Bytes::new(),
            width: 640,
            height: 360,
        }),
        ..Default::default()
    }
}

async fn next_frame_dts(sub: &mut Subscription) -> Result<i64, SubscriptionEnd> {
    loop {
        if let StreamEvent::Frame(p) = sub.next().await? {
            return Ok(p.frame.dts);
        }
    }
}

#[tokio::test]
async fn late_joiner_starts_at_cached_keyframe() {
    let hub = hub(64);
    let mut p = hub.publish(key()).unwrap();
    p.set_config(config());
    for i in 0..10 {
        p.push(video(i * 33, i % 4 == 0));
    }
    let mut sub = hub.subscribe(&key(), Scope::Any).await.unwrap();
    assert!(matches!(sub.next().await.unwrap(), StreamEvent::Config(_)));
    assert_eq!(next_frame_dts(&mut sub).await.unwrap(), 8 * 33);
    assert_eq!(next_frame_dts(&mut sub).await.unwrap(), 9 * 33);
    p.push(video(10 * 33, false));
    assert_eq!(next_frame_dts(&mut sub).await.unwrap(), 10 * 33);
}

#[tokio::test]
async fn second_publisher_of_a_live_name_is_refused() {
    let hub = hub(64);
    let _p = hub.publish(key()).unwrap();
    assert_eq!(
        hub.publish(key()).err(),
        Some(PublishError::AlreadyLive(key()))
    );
}

#[tokio::test]
async fn publisher_drop_ends_subscribers_and_frees_the_name_without_a_hold() {
    let hub = hub_holding(Duration::ZERO);
    let p = hub.publish(key()).unwrap();
    let mut sub = hub.subscribe(&key(), Scope::Any).await.unwrap();
    drop(p);
    assert!(matches!(sub.next().await, Ok(StreamEvent::Config(_))));
    assert_eq!(sub.next().await.err(), Some(SubscriptionEnd::Ended));
    assert!(hub.publish(key()).is_ok());
}

#[tokio::test]
async fn a_stream_nobody_consumes_or_whose_publisher_was_evicted_is_not_held() {
    let hub = hub(64);
    drop(hub.publish(key()).unwrap());
    assert!(hub.get(&key()).is_none(), "no consumer: ended at once");
    let p = hub.publish(key()).unwrap();
    let mut sub = hub.subscribe(&key(), Scope::Any).await.unwrap();
    assert!(hub.evict(&key(), "published elsewhere"));
    drop(p);
    assert!(matches!(sub.next().await, Ok(StreamEvent::Config(_))));
    assert_eq!(sub.next().await.err(), Some(SubscriptionEnd::Ended));
    // Evicting a stream already held ends it at once too.
    let p = hub.publish(key()).unwrap();
    let mut sub = hub.subscribe(&key(), Scope::Any).await.unwrap();
    drop(p);
    assert!(hub.get(&key()).unwrap().held());
    assert!(hub.evict(&key(), "published elsewhere"));
    assert!(matches!(sub.next().await, Ok(StreamEvent::Config(_))));
    assert_eq!(sub.next().await.err(), Some(SubscriptionEnd::Ended));
    assert!(hub.get(&key()).is_none());
}

#[tokio::test]
async fn a_publisher_that_comes_back_within_the_hold_keeps_its_viewers_on_one_timeline() {
    let hub = hub(64);
    let mut p = hub.publish(key()).unwrap();
    p.set_config(config());
    let mut sub = hub.subscribe(&key(), Scope::Any).await.unwrap();
    for i in 0..10 {
        p.push(video(i * 33, i == 0));
    }
    for i in 0..10 {
        assert_eq!(next_frame_dts(&mut sub).await.unwrap(), i * 33);
    }
    drop(p);
    let held = hub.get(&key()).unwrap();
    assert!(held.held());
    assert!(hub.list()[0].waiting_for_publisher);
    // The publisher reconnects: its timestamps start again from its own zero.
    let mut p = hub
        .publish(key())
        .expect("the publisher takes its held stream back");
    assert!(!held.held());
    p.set_config(config());
    p.push(video(0, false)); // not decodable on its own: dropped
    p.push(video(33, true));
    p.push(video(66, false));
    let first = next_frame_dts(&mut sub).await.unwrap();
    assert!(
        (297 + 30..=297 + 40).contains(&first),
        "one frame interval after the last frame sent: {first}"
    );
    assert_eq!(next_frame_dts(&mut sub).await.unwrap(), first + 33);
    assert_eq!(sub.publishes(), 2);
    assert_eq!(hub.list()[0].publishes, 2);
    // A viewer joining now starts at the new publisher's keyframe, on the same timeline.
    let mut late = hub.subscribe(&key(), Scope::Any).await.unwrap();
    assert_eq!(next_frame_dts(&mut late).await.unwrap(), first);
    // Another publisher is still refused while this one is live.
    assert!(matches!(
        hub.publish(key()),
        Err(PublishError::AlreadyLive(_))
    ));
}

#[tokio::test]
async fn a_held_stream_ends_when_its_publisher_does_not_come_back() {
    let hold = Duration::from_millis(300);
    let hub = hub_holding(hold);
    let mut events = hub.events();
    let p = hub.publish(key()).unwrap();
    let mut sub = hub.subscribe(&key(), Scope::Any).await.unwrap();
    let left = Instant::now();
    drop(p);
    assert!(matches!(sub.next().await, Ok(StreamEvent::Config(_))));
    assert_eq!(sub.next().await.err(), Some(SubscriptionEnd::Ended));
    assert!(left.elapsed() >= hold, "ended after {:?}", left.elapsed());
    assert!(hub.get(&key()).is_none());
    assert_eq!(events.recv().await.unwrap(), HubEvent::Published(key()));
    assert_eq!(events.recv().await.unwrap(), HubEvent::Unpublished(key()));
    assert_eq!(hub.publish(key()).unwrap().stream().publishes(), 1);
}

#[tokio::test]
async fn slow_consumer_skips_to_keyframe_then_is_dropped() {
    let hub = hub(16);
    let mut p = hub.publish(key()).unwrap();
    p.set_config(config());
    let mut slow = hub.subscribe(&key(), Scope::Any).await.unwrap();
    assert!(matches!(slow.next().await.unwrap(), StreamEvent::Config(_)));
    // 40 frames into a 16-slot ring: the consumer lags.
    for i in 0..40 {
        p.push(video(i, i % 10 == 0));
    }
    assert!(matches!(
        slow.next().await.unwrap(),
        StreamEvent::Discontinuity
    ));
    assert_eq!(next_frame_dts(&mut slow).await.unwrap(), 30);
    // Two more lags within the window exceed max_lag_events = 2.
    for round in 0..2 {
        for i in 0..40 {
            p.push(video(100 * (round + 1) + i, i % 10 == 0));
        }
        match slow.next().await {
            Ok(StreamEvent::Discontinuity) => {
                let _ = next_frame_dts(&mut slow).await;
            }
            Err(e) => {
                assert_eq!(e, SubscriptionEnd::TooSlow);
                return;
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    panic!("slow consumer was never disconnected");
}

#[tokio::test]
async fn keyframe_requests_from_many_consumers_reach_the_owner_merged() {
    let hub = hub(16);
    let p = hub.publish(key()).unwrap();
    let signal = p.keyframe_signal();
    let mut subs = vec![];
    for _ in 0..10 {
        subs.push(hub.subscribe(&key(), Scope::Any).await.unwrap());
    }
    for s in &subs {
        s.request_keyframe();
    }
    subs[0].keyframe_requester().request();
    // One wake-up for all of them...
    tokio::time::timeout(Duration::from_millis(100), signal.wanted())
        .await
        .expect("the owner is told");
    // ...and no second one.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), signal.wanted())
            .await
            .is_err(),
        "requests merged into one"
    );
}

#[tokio::test]
async fn unknown_stream_without_upstream_is_not_found_after_the_play_wait() {
    let hub = hub(16);
    let asked = Instant::now();
    assert!(matches!(
        hub.subscribe(&key(), Scope::Any).await,
        Err(SubscribeError::NotFound(_))
    ));
    let waited = asked.elapsed();
    assert!(waited >= hub.limits().play_wait, "waited {waited:?}");
    // Origins asking each other get their answer at once.
    let asked = Instant::now();
    assert!(matches!(
        hub.subscribe(&key(), Scope::LocalOnly).await,
        Err(SubscribeError::NotFound(_))
    ));
    assert!(asked.elapsed() < hub.limits().play_wait);
}

#[tokio::test]
async fn a_viewer_who_asks_just_before_the_publisher_arrives_plays() {
    let hub = hub(16);
    let viewer = tokio::spawn({
        let hub = hub.clone();
        async move { hub.subscribe(&key(), Scope::Any).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut p = hub.publish(key()).unwrap();
    p.set_config(config());
    p.push(video(0, true));
    let mut sub = viewer.await.unwrap().expect("the parked viewer plays");
    assert!(matches!(sub.next().await.unwrap(), StreamEvent::Config(_)));
    assert_eq!(next_frame_dts(&mut sub).await.unwrap(), 0);
}

struct FakeUpstream(Mutex<Vec<Publisher>>);
impl Upstream for FakeUpstream {
    fn can_pull(&self, _: &StreamKey) -> bool {
        true
    }
    fn pull(&self, relay: Publisher) {
        relay.set_live("up");
        self.0.lock().push(relay);
    }
}

#[tokio::test]
async fn relay_is_shared_and_released_after_grace() {
    let hub = hub(16);
    let up = Arc::new(FakeUpstream(Mutex::new(vec![])));
    hub.set_upstream(up.clone());
    let a = hub.subscribe(&key(), Scope::Any).await.unwrap();
    let b = hub.subscribe(&key(), Scope::Any).await.unwrap();
    assert_eq!(up.0.lock().len(), 1, "one pull for two consumers");
    assert!(hub.subscribe(&key(), Scope::LocalOnly).await.is_err());
    let relay = up.0.lock().pop().unwrap();
    assert_eq!(relay.subscribers(), 2);
    drop(a);
    drop(b);
    tokio::time::timeout(
        Duration::from_secs(2),
        relay.idle_waiter(Duration::from_millis(50)),
    )
    .await
    .expect("relay released");
    assert!(hub.get(&key()).is_none());
}

/// Makes every derived name it is asked for (a stand-in for the bridge's renditions).
struct FakeDeriver(Mutex<Vec<Publisher>>);
impl Deriver for FakeDeriver {
    fn derives(&self, key: &StreamKey, base_is_local: bool) -> Option<Source> {
        base_is_local.then(|| Source::Bridge {
            of: key.base().to_string(),
        })
    }
    fn start(&self, _: Arc<Hub>, mut publisher: Publisher) {
        publisher.set_config(config());
        publisher.set_derived_live();
        self.0.lock().push(publisher);
    }
}

#[tokio::test]
async fn a_rendition_is_made_only_where_its_stream_is_published_and_served_one_hop() {
    let hub = hub(16);
    let deriver = Arc::new(FakeDeriver(Mutex::new(vec![])));
    hub.set_deriver(deriver.clone());
    let rendition = key().webrtc_rendition();
    // No local publisher: nothing is made (another node's stream is pulled, not derived).
    assert!(hub.subscribe(&rendition, Scope::LocalOnly).await.is_err());
    assert!(deriver.0.lock().is_empty());

    let mut p = hub.publish(key()).unwrap();
    p.set_config(config());
    p.push(video(0, true));
    // Another origin asking (one hop, local streams only) gets it made here, once.
    let a = hub.subscribe(&rendition, Scope::LocalOnly).await.unwrap();
    let b = hub.subscribe(&rendition, Scope::Any).await.unwrap();
    let c = hub.subscribe(&rendition, Scope::LocalOnly).await.unwrap();
    assert_eq!(
        deriver.0.lock().len(),
        1,
        "one rendition for every consumer"
    );
    assert_eq!(hub.get(&rendition).unwrap().subscribers(), 3);
    drop((a, b, c));
}

#[tokio::test]
async fn bframes_are_told_from_the_hub_or_the_first_video_frames() {
    let hub = hub(64);
    let mut p = hub.publish(key()).unwrap();
    p.set_config(config());
    p.push(video(0, true));
    let mut plain = hub.subscribe(&key(), Scope::Any).await.unwrap();
    // One cached frame without reordering: it waits for a few more, then says no.
    let waiting = tokio::spawn(async move { plain.wait_bframes(Duration::from_millis(300)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.push(video(33, false));
    p.push(video(66, false));
    assert!(!waiting.await.unwrap());
    // Three video frames in order settle it for every later viewer, without waiting.
    let mut settled = hub.subscribe(&key(), Scope::Any).await.unwrap();
    assert!(!settled.wait_bframes(Duration::ZERO).await);

    let mut reordered = video(100, false).as_ref().frame.clone();
    reordered.pts = 166;
    let mut sub = hub.subscribe(&key(), Scope::Any).await.unwrap();
    p.push(Packet::new(reordered));
    assert!(sub.wait_bframes(Duration::from_millis(300)).await);
    // The frames looked at are still delivered, in order.
    assert!(matches!(sub.next().await.unwrap(), StreamEvent::Config(_)));
    let mut dts = vec![];
    while let Some(Ok(StreamEvent::Frame(f))) = sub.try_next() {
        dts.push(f.frame.dts);
    }
    assert_eq!(dts, [0, 33, 66, 100]);
    // From then on the hub knows.
    let mut later = hub.subscribe(&key(), Scope::Any).await.unwrap();
    assert!(later.wait_bframes(Duration::ZERO).await);
}

/// A hub whose namespace `t` allows 1 stream, 1 viewer and 100 kbit/s.
fn hub_with_namespace() -> Arc<Hub> {
    let c = crate::config::Config::parse(
        "[[namespace]]\nname = \"t\"\nlimits = { max_streams = 1, max_viewers = 1, max_bitrate_kbps = 100 }\n",
        "t.toml",
        std::path::Path::new("."),
    )
    .unwrap();
    let hub = Hub::new(Limits::default(), Arc::new(Metrics::new()));
    hub.reconfigure(Limits::default(), Arc::new(c.namespaces));
    hub
}

#[tokio::test]
async fn a_namespace_bounds_its_streams_and_viewers_and_no_one_elses() {
    let hub = hub_with_namespace();
    let client = "127.0.0.1:1".parse().unwrap();
    let t1 = StreamKey::new("t", "one").unwrap();
    let _p = hub.publish(t1.clone()).unwrap();
    let e = hub
        .publish(StreamKey::new("t", "two").unwrap())
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("namespace t is at its stream limit (1)"),
        "{e}"
    );
    let _other = hub.publish(StreamKey::new("live", "two").unwrap()).unwrap();
    let v = hub.admit_viewer(&t1, "flv", client).unwrap();
    let e = hub.admit_viewer(&t1, "flv", client).err().unwrap();
    assert!(e.contains("namespace t is at its viewer limit (1)"), "{e}");
    let _live = hub.admit_viewer(&key(), "flv", client).unwrap();
    drop(v);
    hub.admit_viewer(&t1, "flv", client).unwrap();
}

#[tokio::test]
async fn a_publisher_over_its_namespace_bitrate_is_evicted() {
    let hub = hub_with_namespace();
    let mut p = hub.publish(StreamKey::new("t", "one").unwrap()).unwrap();
    let evicted = p.evicted();
    p.set_config(config());
    // 100 kbit/s is 50 kB in a 4 s window: 60 frames of 1 kB pass...
    let frame = |dts: i64| {
        Packet::new(Frame {
            codec: Codec::H264,
            dts,
            pts: dts,
            timebase: Timebase::MILLIS,
            keyframe: dts == 0,
            payload: Bytes::from(vec![0u8; 1000]),
        })
    };
    for i in 0..40 {
        p.push(frame(i * 33));
    }
    assert!(hub.get(p.key()).unwrap().evicted.borrow().is_none());
    // ...and pushing on at once spends the window's budget.
    for i in 40..60 {
        p.push(frame(i * 33));
    }
    let reason = tokio::time::timeout(Duration::from_secs(1), evicted)
        .await
        .unwrap();
    assert!(reason.contains("100 kbit/s"), "{reason}");
}
