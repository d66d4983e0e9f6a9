//! The in-process stream registry and fan-out.
//!
//! Each live stream has exactly one writer, its [`Publisher`] handle: an RTMP ingest session
//! for a local stream, or a backbone puller for a relayed one. Dropping the handle ends the
//! stream for every consumer. Consumers hold a [`Subscription`]: the GOP cache snapshot plus a
//! receiver on the stream's bounded fan-out ring, where each entry is an `Arc` shared by all.
//!
//! Overflow policy (the ring is the only queue, so memory never grows with a slow consumer):
//! a consumer that falls more than `stream_buffer_frames` behind skips to the next video
//! keyframe (a [`StreamEvent::Discontinuity`] tells it so); one that falls behind more than
//! `max_lag_events` times in a minute is ended with [`SubscriptionEnd::TooSlow`].
//!
//! Streams this node does not have are pulled through an [`Upstream`] (the backbone) when the
//! first consumer asks, shared by all consumers, and dropped a grace period after the last
//! one leaves. Locks here guard tiny sections and are never held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, watch, Notify};
use tracing::info;

use crate::config::Limits;
use crate::media::gop::GopCache;
use crate::media::splice::Splicer;
use crate::media::{Codec, Packet, SimulcastLayer, StreamConfig, StreamKey};
use crate::metrics::Metrics;

/// How long a consumer waits for an upstream pull to deliver the stream's configuration.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a consumer waiting for an unpublished name looks again (`limits.play_wait`).
const PLAY_WAIT_POLL: Duration = Duration::from_millis(50);
/// The window in which `max_lag_events` lag events disconnect a consumer.
const LAG_WINDOW: Duration = Duration::from_secs(60);

/// What a consumer receives, in order.
#[derive(Clone, Debug)]
pub enum StreamEvent {
    /// The stream's codec configuration changed (always comes before the frames it applies to).
    Config(Arc<StreamConfig>),
    Frame(Arc<Packet>),
    /// The consumer fell behind; frames were skipped and the next frame is a video keyframe.
    Discontinuity,
}

/// Why a subscription stopped delivering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionEnd {
    #[error("the stream ended")]
    Ended,
    #[error("the consumer stayed too far behind the stream")]
    TooSlow,
    #[error("the viewer was disconnected by the operator")]
    Kicked,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("stream {0} is already being published")]
    AlreadyLive(StreamKey),
    #[error("{0}")]
    Limit(String),
    #[error("stream {key} is already published on {node}")]
    PublishedElsewhere { key: StreamKey, node: String },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("stream {0} is not live")]
    NotFound(StreamKey),
    #[error("stream {0}: upstream did not deliver it in time")]
    UpstreamTimeout(StreamKey),
}

/// Where a stream's frames come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// A publisher connected to this node.
    Local,
    /// Pulled over the backbone from `node`.
    Relay { node: String },
    /// Derived on this node from stream `of` (e.g. its audio transcoded).
    Bridge { of: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A relay waiting for its upstream to answer.
    Pending,
    Live,
    Ended,
}

/// Which streams a subscriber may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Any stream, pulling it from upstream if needed (viewers, edges).
    Any,
    /// Only streams published on this node (other origins: one hop at most).
    LocalOnly,
}

/// Published by the hub when a local stream starts or ends (feeds the backbone's announces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubEvent {
    Published(StreamKey),
    Unpublished(StreamKey),
}

/// Pulls streams this node does not have (implemented by the backbone).
pub trait Upstream: Send + Sync {
    /// Whether some upstream may have `key`.
    fn can_pull(&self, key: &StreamKey) -> bool;
    /// Starts feeding `relay` from upstream. The implementation marks it live once configured,
    /// keeps it fed, and drops it when upstream ends or when it has been idle long enough
    /// ([`Publisher::wait_idle`]).
    fn pull(&self, relay: Publisher);
    /// The live node that publishes `key`, when it is another one (a new local publisher of
    /// the name is then refused). May take up to a link timeout to tell a dead node.
    fn published_elsewhere(&self, _key: &StreamKey) -> BoxFuture<Option<String>> {
        Box::pin(std::future::ready(None))
    }
}

pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

struct StreamState {
    config: Arc<StreamConfig>,
    gop: GopCache<Arc<Packet>>,
    tx: Option<broadcast::Sender<StreamEvent>>,
    /// The newest dts sent per track (ns; video, audio): where a returning publisher's
    /// timeline is spliced on.
    last_ns: [Option<i64>; 2],
    /// While the local publisher is gone and the stream is held for it
    /// (`limits.publisher_hold`): the publish count when it left.
    held: Option<u64>,
}

/// One live stream on this node.
pub struct Stream {
    key: StreamKey,
    source: Mutex<Source>,
    state: Mutex<StreamState>,
    status: watch::Sender<Status>,
    subscribers: AtomicUsize,
    idle: Notify,
    /// Consumers asking for a keyframe; merged (one permit) until the owner looks.
    keyframe_wanted: Notify,
    /// Counts those requests (`meshcast_keyframe_requests_received_total`).
    keyframe_requests: prometheus_client::metrics::counter::Counter,
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    started: Instant,
    /// When the stream started, in unix milliseconds (ranks rival publishers of one name).
    started_ms: u64,
    /// Set when a local publisher is told to stop because the name belongs to another
    /// node: why.
    evicted: watch::Sender<Option<String>>,
    /// Identity of the timeline consumers get: random per local publish; a relay serves its
    /// upstream's (see `media::splice`). A publisher coming back to its held stream is
    /// spliced onto it, so the timeline and its session stay.
    session: AtomicU64,
    /// How many publishers this stream has had (more than one after a publisher came back
    /// within the hold).
    publishes: AtomicU64,
}

impl Stream {
    pub fn session(&self) -> u64 {
        self.session.load(Ordering::Acquire)
    }

    pub fn key(&self) -> &StreamKey {
        &self.key
    }

    pub fn source(&self) -> Source {
        self.source.lock().clone()
    }

    pub fn is_local(&self) -> bool {
        *self.source.lock() == Source::Local
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }

    fn want_keyframe(&self) {
        self.keyframe_requests.inc();
        self.keyframe_wanted.notify_one();
    }

    /// When the stream started, in unix milliseconds.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Why the stream's publisher was evicted, if it was.
    pub fn evicted(&self) -> Option<String> {
        self.evicted.borrow().clone()
    }

    /// How many publishers this stream has had.
    pub fn publishes(&self) -> u64 {
        self.publishes.load(Ordering::Acquire)
    }

    /// Whether its publisher left and it is held for it to come back.
    pub fn held(&self) -> bool {
        self.state.lock().held.is_some()
    }
}

/// A snapshot of a stream for the API.
#[derive(Clone, Debug, Serialize)]
pub struct StreamInfo {
    pub stream: StreamKey,
    pub source: Source,
    pub subscribers: usize,
    pub video: Option<TrackInfo>,
    pub audio: Option<TrackInfo>,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub uptime_ms: u64,
    pub gop_cache_frames: usize,
    /// Simulcast layers (each also listed as the stream `name~sim.RID`), smallest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub simulcast: Vec<SimulcastLayer>,
    /// The publisher left and the stream is held for it (`limits.publisher_hold_ms`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waiting_for_publisher: bool,
    /// Publishers the stream has had: more than 1 when one came back within the hold.
    pub publishes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrackInfo {
    pub codec: Codec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<u8>,
}

pub struct Hub {
    streams: Mutex<HashMap<StreamKey, Arc<Stream>>>,
    upstream: OnceLock<Arc<dyn Upstream>>,
    limits: Limits,
    events: broadcast::Sender<HubEvent>,
    metrics: Arc<Metrics>,
    viewers: Mutex<ViewerCounts>,
}

impl Hub {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Hub> {
        Arc::new(Hub {
            streams: Mutex::new(HashMap::new()),
            upstream: OnceLock::new(),
            limits,
            events: broadcast::channel(1024).0,
            metrics,
            viewers: Mutex::new(ViewerCounts::default()),
        })
    }

    /// Admits a viewer of `key` (RTMP, HTTP-FLV, WHEP) under `limits.max_viewers` and
    /// `limits.max_viewers_per_stream`, or says which limit is reached. Derived streams
    /// (`demo~opus`) count as their original. Internal consumers (egress, bridges, other
    /// nodes' pulls) are not viewers.
    pub fn admit_viewer(
        self: &Arc<Self>,
        key: &StreamKey,
        protocol: &'static str,
        client: std::net::SocketAddr,
    ) -> Result<ViewerTicket, String> {
        let base = key.base();
        let mut v = self.viewers.lock();
        if v.total >= self.limits.max_viewers {
            return Err(format!(
                "this node is at its viewer limit ({})",
                self.limits.max_viewers
            ));
        }
        let n = v.per_stream.get(&base).copied().unwrap_or(0);
        if n >= self.limits.max_viewers_per_stream {
            return Err(format!(
                "{base} is at its viewer limit ({})",
                self.limits.max_viewers_per_stream
            ));
        }
        v.total += 1;
        *v.per_stream.entry(base.clone()).or_insert(0) += 1;
        let id = rand::random::<u64>() >> 12;
        let kicked = Arc::new(AtomicBool::new(false));
        v.listed.insert(
            id,
            ViewerInfo {
                id: format!("v_{id:013x}"),
                stream: base.to_string(),
                protocol,
                client: client.to_string(),
                since_unix_ms: crate::clock::unix_ms(),
                kicked: kicked.clone(),
            },
        );
        Ok(ViewerTicket {
            hub: Arc::downgrade(self),
            base,
            id,
            kicked,
            on_release: None,
        })
    }

    /// The viewers (RTMP, HTTP-FLV, WHEP) watching now.
    pub fn viewers(&self) -> Vec<ViewerInfo> {
        let mut out: Vec<ViewerInfo> = self.viewers.lock().listed.values().cloned().collect();
        out.sort_by(|a, b| (a.since_unix_ms, &a.id).cmp(&(b.since_unix_ms, &b.id)));
        out
    }

    /// Disconnects viewer `id` (as [`viewers`](Self::viewers) names it): its subscription
    /// ends at its next frame. `false` if there is no such viewer.
    pub fn kick_viewer(&self, id: &str) -> bool {
        let v = self.viewers.lock();
        match v.listed.values().find(|i| i.id == id) {
            Some(info) => {
                info.kicked.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Refuses a new local publish past `limits.max_streams` (node) or
    /// `limits.max_streams_per_namespace`. Called under the streams map lock.
    fn check_stream_limits(
        &self,
        map: &HashMap<StreamKey, Arc<Stream>>,
        key: &StreamKey,
    ) -> Result<(), PublishError> {
        let (mut total, mut in_ns) = (0, 0);
        for s in map.values().filter(|s| s.is_local() && !s.key.is_derived()) {
            total += 1;
            if s.key.namespace() == key.namespace() {
                in_ns += 1;
            }
        }
        if total >= self.limits.max_streams {
            return Err(PublishError::Limit(format!(
                "this node is at its stream limit ({})",
                self.limits.max_streams
            )));
        }
        if in_ns >= self.limits.max_streams_per_namespace {
            return Err(PublishError::Limit(format!(
                "namespace {} is at its stream limit ({})",
                key.namespace(),
                self.limits.max_streams_per_namespace
            )));
        }
        Ok(())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Installs the upstream used to pull streams this node lacks (set once at start).
    pub fn set_upstream(&self, upstream: Arc<dyn Upstream>) {
        let _ = self.upstream.set(upstream);
    }

    /// Local stream starts and ends.
    pub fn events(&self) -> broadcast::Receiver<HubEvent> {
        self.events.subscribe()
    }

    fn new_stream(&self, key: StreamKey, source: Source, status: Status) -> Arc<Stream> {
        Arc::new(Stream {
            key,
            source: Mutex::new(source),
            state: Mutex::new(StreamState {
                config: Arc::new(StreamConfig::default()),
                gop: GopCache::new(self.limits.gop_cache_max_bytes),
                tx: Some(broadcast::channel(self.limits.stream_buffer_frames).0),
                last_ns: [None; 2],
                held: None,
            }),
            status: watch::channel(status).0,
            subscribers: AtomicUsize::new(0),
            idle: Notify::new(),
            keyframe_wanted: Notify::new(),
            keyframe_requests: self.metrics.keyframe_requests_received.clone(),
            frames_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            started: Instant::now(),
            started_ms: crate::clock::unix_ms(),
            evicted: watch::channel(None).0,
            session: AtomicU64::new(rand::random()),
            publishes: AtomicU64::new(1),
        })
    }

    /// Claims `key` for a local publisher, as [`Hub::publish`], after asking the backbone
    /// whether another live origin publishes it: then it is refused.
    pub async fn publish_checked(
        self: &Arc<Self>,
        key: StreamKey,
    ) -> Result<Publisher, PublishError> {
        if let Some(up) = self.upstream.get() {
            if let Some(node) = up.published_elsewhere(&key).await {
                return Err(PublishError::PublishedElsewhere { key, node });
            }
        }
        self.publish(key)
    }

    /// Claims `key` for a local publisher. Refused while the name is published on this
    /// node. A stream held for its publisher ([`Limits::publisher_hold`]) is taken over:
    /// its consumers carry on, the new publish spliced onto their timeline at its first
    /// keyframe. A relay of the name (pulled from an origin that is gone, or the caller
    /// would have been refused by [`Hub::publish_checked`]) gives the name up: its pull
    /// feeds its viewers from this publish from then on (see `Backbone::run_pull`).
    pub fn publish(self: &Arc<Self>, key: StreamKey) -> Result<Publisher, PublishError> {
        let stream = {
            let mut map = self.streams.lock();
            if let Some(held) = map.get(&key).filter(|s| s.is_local()) {
                let mut st = held.state.lock();
                if st.held.take().is_none() {
                    return Err(PublishError::AlreadyLive(key));
                }
                // Joiners wait for the new publisher's first keyframe.
                st.gop.clear();
                let n = held.publishes.fetch_add(1, Ordering::AcqRel) + 1;
                info!(stream = %key, publishes = n, "the publisher came back; its viewers carry on");
                let mut p = Publisher::new(self.clone(), held.clone());
                p.has_video = st.config.video.is_some();
                p.splice = Some(Splicer::continuing(held.session(), st.last_ns));
                return Ok(p);
            }
            if map
                .get(&key)
                .is_some_and(|s| !matches!(*s.source.lock(), Source::Relay { .. }))
            {
                return Err(PublishError::AlreadyLive(key));
            }
            if !key.is_derived() {
                self.check_stream_limits(&map, &key)?;
            }
            let stream = self.new_stream(key.clone(), Source::Local, Status::Live);
            map.insert(key.clone(), stream.clone());
            // Sent under the map lock, as `Unpublished` is: listeners (announces to other
            // origins, edge forwards) see a name's publishes and unpublishes in order.
            let _ = self.events.send(HubEvent::Published(key));
            stream
        };
        self.metrics.local_streams.inc();
        Ok(Publisher::new(self.clone(), stream))
    }

    /// Attaches a consumer to `key`, pulling it from upstream first if allowed and needed.
    pub async fn subscribe(
        self: &Arc<Self>,
        key: &StreamKey,
        scope: Scope,
    ) -> Result<Subscription, SubscribeError> {
        self.attach(key, scope, None).await
    }

    /// Subscribes to a stream this node derives from another (e.g. with its audio
    /// transcoded). If it does not exist yet it is created with `source` and `start` is
    /// handed its [`Publisher`]; like a relay, it is shared by every consumer and its owner
    /// drops it when idle ([`Publisher::idle_waiter`]).
    pub async fn subscribe_derived(
        self: &Arc<Self>,
        key: &StreamKey,
        source: Source,
        start: impl FnOnce(Publisher) + Send + 'static,
    ) -> Result<Subscription, SubscribeError> {
        self.attach(key, Scope::Any, Some((source, Box::new(start))))
            .await
    }

    /// The stream `key` for a new consumer: the existing one, or one created to be derived
    /// or pulled from upstream. `None` if there is no such stream and no way to get it.
    #[allow(clippy::type_complexity)]
    fn find_or_create(
        self: &Arc<Self>,
        key: &StreamKey,
        scope: Scope,
        derive: &mut Option<(Source, DeriveStart)>,
    ) -> Result<
        Option<(
            Arc<Stream>,
            SubscriberGuard,
            Option<(Producer, Arc<Stream>)>,
        )>,
        SubscribeError,
    > {
        let mut map = self.streams.lock();
        match map.get(key) {
            Some(s) if scope == Scope::LocalOnly && !s.is_local() => {
                Err(SubscribeError::NotFound(key.clone()))
            }
            Some(s) => Ok(Some((s.clone(), SubscriberGuard::new(s.clone()), None))),
            None => {
                let (source, producer) = match (derive.take(), scope, self.upstream.get()) {
                    (Some((source, start)), _, _) => (source, Producer::Derived(start)),
                    (None, Scope::Any, Some(u)) if u.can_pull(key) => (
                        Source::Relay {
                            node: String::new(),
                        },
                        Producer::Upstream(u.clone()),
                    ),
                    _ => return Ok(None),
                };
                let s = self.new_stream(key.clone(), source, Status::Pending);
                map.insert(key.clone(), s.clone());
                let guard = SubscriberGuard::new(s.clone());
                Ok(Some((s.clone(), guard, Some((producer, s)))))
            }
        }
    }

    async fn attach(
        self: &Arc<Self>,
        key: &StreamKey,
        scope: Scope,
        derive: Option<(Source, DeriveStart)>,
    ) -> Result<Subscription, SubscribeError> {
        let mut derive = derive;
        // A name nobody publishes yet is waited for a little (`limits.play_wait`): a player
        // started just before its publisher, or a viewer whose node has not yet heard the
        // origin's announce, then plays instead of getting a 404. Origins asking each other
        // (`LocalOnly`) are answered at once: they chose from their directory and re-home
        // on a refusal.
        let deadline = tokio::time::Instant::now() + self.limits.play_wait;
        let mut events: Option<broadcast::Receiver<HubEvent>> = None;
        let (stream, guard, created) = loop {
            if let Some(found) = self.find_or_create(key, scope, &mut derive)? {
                break found;
            }
            let now = tokio::time::Instant::now();
            if scope != Scope::Any || now >= deadline {
                return Err(SubscribeError::NotFound(key.clone()));
            }
            let events = events.get_or_insert_with(|| self.events.subscribe());
            // A local publish wakes it at once; an announce heard from another node is
            // noticed by the next look.
            tokio::select! {
                _ = events.recv() => {}
                _ = tokio::time::sleep_until(deadline.min(now + PLAY_WAIT_POLL)) => {}
            }
        };
        match created {
            Some((Producer::Upstream(upstream), s)) => {
                self.metrics.relayed_streams.inc();
                upstream.pull(Publisher::new(self.clone(), s));
            }
            Some((Producer::Derived(start), s)) => start(Publisher::new(self.clone(), s)),
            None => {}
        }
        let mut status = stream.status.subscribe();
        match tokio::time::timeout(PULL_TIMEOUT, status.wait_for(|s| *s != Status::Pending)).await {
            Ok(Ok(s)) if *s == Status::Live => {}
            Ok(_) => return Err(SubscribeError::NotFound(key.clone())),
            Err(_) => return Err(SubscribeError::UpstreamTimeout(key.clone())),
        }
        let st = stream.state.lock();
        let Some(tx) = st.tx.as_ref() else {
            return Err(SubscribeError::NotFound(key.clone()));
        };
        let mut backlog = VecDeque::with_capacity(st.gop.len() + 1);
        backlog.push_back(StreamEvent::Config(st.config.clone()));
        backlog.extend(st.gop.snapshot().into_iter().map(StreamEvent::Frame));
        let rx = tx.subscribe();
        drop(st);
        Ok(Subscription {
            rx,
            backlog,
            skipping: false,
            has_video: false,
            lag_events: VecDeque::new(),
            max_lag_events: self.limits.max_lag_events,
            _guard: guard,
            _ticket: None,
        })
    }

    pub fn get(&self, key: &StreamKey) -> Option<Arc<Stream>> {
        self.streams.lock().get(key).cloned()
    }

    /// Announces local stream `key` again (to origins that may not know it won a rivalry).
    pub fn reannounce(&self, key: &StreamKey) {
        let map = self.streams.lock();
        if map.get(key).is_some_and(|s| s.is_local()) {
            let _ = self.events.send(HubEvent::Published(key.clone()));
        }
    }

    /// Tells the local publisher of `key` to stop (the name belongs to another node); its
    /// ingest ends the session with `reason`. A stream held for its publisher ends at
    /// once. `false` if `key` has no local publisher.
    pub fn evict(&self, key: &StreamKey, reason: &str) -> bool {
        let Some(stream) = self.get(key).filter(|s| s.is_local()) else {
            return false;
        };
        stream.evicted.send_replace(Some(reason.to_string()));
        self.metrics.publishers_evicted.inc();
        let held = stream.state.lock().held;
        if let Some(generation) = held {
            self.end(&stream, Some(generation));
        }
        true
    }

    /// Streams published on this node.
    pub fn local_streams(&self) -> Vec<StreamKey> {
        self.streams
            .lock()
            .values()
            .filter(|s| s.is_local())
            .map(|s| s.key.clone())
            .collect()
    }

    pub fn list(&self) -> Vec<StreamInfo> {
        let streams: Vec<Arc<Stream>> = self.streams.lock().values().cloned().collect();
        let mut out: Vec<StreamInfo> = streams
            .iter()
            .filter(|s| *s.status.borrow() == Status::Live)
            .map(|s| {
                let st = s.state.lock();
                StreamInfo {
                    stream: s.key.clone(),
                    source: s.source(),
                    subscribers: s.subscribers(),
                    video: st.config.video.as_ref().map(|v| TrackInfo {
                        codec: v.codec,
                        width: Some(v.width),
                        height: Some(v.height),
                        sample_rate: None,
                        channels: None,
                    }),
                    audio: st.config.audio.as_ref().map(|a| TrackInfo {
                        codec: a.codec,
                        width: None,
                        height: None,
                        sample_rate: Some(a.sample_rate),
                        channels: Some(a.channels),
                    }),
                    frames_in: s.frames_in.load(Ordering::Relaxed),
                    bytes_in: s.bytes_in.load(Ordering::Relaxed),
                    uptime_ms: s.started.elapsed().as_millis() as u64,
                    gop_cache_frames: st.gop.len(),
                    simulcast: st.config.simulcast.clone(),
                    waiting_for_publisher: st.held.is_some(),
                    publishes: s.publishes(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.stream.cmp(&b.stream));
        out
    }

    /// A local publisher left: keeps its stream (viewers, egress, other nodes' pulls) for
    /// `limits.publisher_hold`, for it to come back ([`Hub::publish`]). `false` when it is
    /// not held: no hold configured, nobody consuming, or the publisher was evicted.
    fn hold(self: &Arc<Self>, stream: &Arc<Stream>) -> bool {
        let hold = self.limits.publisher_hold;
        if hold.is_zero()
            || !stream.is_local()
            || stream.subscribers() == 0
            || stream.evicted().is_some()
        {
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let generation = stream.publishes();
        {
            let map = self.streams.lock();
            if !map.get(&stream.key).is_some_and(|s| Arc::ptr_eq(s, stream)) {
                return false;
            }
            stream.state.lock().held = Some(generation);
        }
        info!(
            stream = %stream.key,
            "the publisher left; the stream is held {} ms for it to come back",
            hold.as_millis()
        );
        let hub = self.clone();
        let stream = stream.clone();
        runtime.spawn(async move {
            tokio::time::sleep(hold).await;
            hub.end(&stream, Some(generation));
        });
        true
    }

    /// Ends `stream`: unregisters it (if it still holds its name; a local stream's end is
    /// announced under the map lock, so a publish of the same name that follows is
    /// reported after it) and tells its consumers. With `held`, only if the stream is still
    /// held since that publish count (its publisher did not come back).
    fn end(&self, stream: &Arc<Stream>, held: Option<u64>) {
        let source = stream.source();
        {
            let mut map = self.streams.lock();
            if let Some(generation) = held {
                let mut st = stream.state.lock();
                if st.held != Some(generation) {
                    return;
                }
                st.held = None;
                info!(stream = %stream.key, "the publisher did not come back; the stream ends");
            }
            if map.get(&stream.key).is_some_and(|s| Arc::ptr_eq(s, stream)) {
                map.remove(&stream.key);
            }
            if source == Source::Local {
                let _ = self.events.send(HubEvent::Unpublished(stream.key.clone()));
            }
        }
        stream.state.lock().tx = None;
        stream.status.send_replace(Status::Ended);
        match source {
            Source::Local => {
                self.metrics.local_streams.dec();
            }
            Source::Relay { .. } => {
                self.metrics.relayed_streams.dec();
            }
            Source::Bridge { .. } => {}
        }
    }

    /// Removes an idle relay, atomically with respect to new subscribers.
    fn remove_if_idle(&self, stream: &Arc<Stream>) -> bool {
        let mut map = self.streams.lock();
        if stream.subscribers() != 0 {
            return false;
        }
        if map.get(&stream.key).is_some_and(|s| Arc::ptr_eq(s, stream)) {
            map.remove(&stream.key);
        }
        true
    }
}

type DeriveStart = Box<dyn FnOnce(Publisher) + Send>;

/// Who feeds a stream created on demand.
enum Producer {
    Upstream(Arc<dyn Upstream>),
    Derived(DeriveStart),
}

/// A viewer admitted under `limits.max_viewers` and `max_viewers_per_stream`, listed for
/// the admin API until it leaves; it gives its place back when dropped (it rides on the
/// viewer's [`Subscription`], so it lives exactly as long as the viewer).
pub struct ViewerTicket {
    hub: std::sync::Weak<Hub>,
    base: StreamKey,
    id: u64,
    kicked: Arc<AtomicBool>,
    on_release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl ViewerTicket {
    /// Runs `f` when the viewer leaves (the event hook's `stop`).
    pub fn on_release(&mut self, f: impl FnOnce() + Send + Sync + 'static) {
        self.on_release = Some(Box::new(f));
    }
}

impl Drop for ViewerTicket {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            let mut v = hub.viewers.lock();
            v.total = v.total.saturating_sub(1);
            v.listed.remove(&self.id);
            if let Some(n) = v.per_stream.get_mut(&self.base) {
                *n -= 1;
                if *n == 0 {
                    v.per_stream.remove(&self.base);
                }
            }
        }
        if let Some(f) = self.on_release.take() {
            f();
        }
    }
}

/// One viewer as the admin API lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ViewerInfo {
    pub id: String,
    pub stream: String,
    pub protocol: &'static str,
    pub client: String,
    pub since_unix_ms: u64,
    #[serde(skip)]
    kicked: Arc<AtomicBool>,
}

/// Viewers admitted, node-wide and per stream (derived streams count as their original).
#[derive(Default)]
struct ViewerCounts {
    total: usize,
    per_stream: HashMap<StreamKey, usize>,
    listed: HashMap<u64, ViewerInfo>,
}

/// Counts a stream's consumers; the count reaching zero wakes the relay's idle timer.
struct SubscriberGuard(Arc<Stream>);

impl SubscriberGuard {
    /// Must be created under the hub's map lock (see [`Hub::remove_if_idle`]).
    fn new(stream: Arc<Stream>) -> Self {
        stream.subscribers.fetch_add(1, Ordering::AcqRel);
        SubscriberGuard(stream)
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        if self.0.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// Lets a consumer (or a downstream node's request arriving over the backbone) ask the
/// stream's owner for a keyframe. Requests merge until the owner looks.
#[derive(Clone)]
pub struct KeyframeRequester(Arc<Stream>);

impl KeyframeRequester {
    pub fn request(&self) {
        self.0.want_keyframe();
    }
}

/// The owner's side of keyframe requests.
#[derive(Clone)]
pub struct KeyframeSignal(Arc<Stream>);

impl KeyframeSignal {
    /// Completes when some consumer asked for a keyframe since the last call.
    pub async fn wanted(&self) {
        self.0.keyframe_wanted.notified().await
    }
}

/// The single writer of a stream. Dropping it ends the stream everywhere.
pub struct Publisher {
    hub: Arc<Hub>,
    stream: Arc<Stream>,
    has_video: bool,
    /// A publisher that came back to its held stream: its frames are retimed onto the
    /// stream's timeline (`bool`: whether the splice has begun).
    splice: Option<Splicer>,
    splice_begun: bool,
}

impl Publisher {
    fn new(hub: Arc<Hub>, stream: Arc<Stream>) -> Publisher {
        Publisher {
            hub,
            stream,
            has_video: false,
            splice: None,
            splice_begun: false,
        }
    }

    pub fn key(&self) -> &StreamKey {
        &self.stream.key
    }

    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    pub fn config(&self) -> Arc<StreamConfig> {
        self.stream.state.lock().config.clone()
    }

    /// Publishes simulcast layer `rid` of this stream as its own local stream
    /// ([`StreamKey::layer`]).
    pub fn publish_layer(&self, rid: &str) -> Result<Publisher, PublishError> {
        self.hub.publish(self.stream.key.layer(rid))
    }

    /// Replaces the stream configuration; consumers see it before any later frame.
    pub fn set_config(&mut self, config: StreamConfig) {
        let mut st = self.stream.state.lock();
        self.has_video = config.video.is_some();
        if *st.config == config {
            return;
        }
        let config = Arc::new(config);
        st.config = config.clone();
        if let Some(tx) = &st.tx {
            let _ = tx.send(StreamEvent::Config(config));
        }
    }

    /// Fans one frame out to every consumer and the GOP cache.
    pub fn push(&mut self, mut packet: Arc<Packet>) {
        self.stream.frames_in.fetch_add(1, Ordering::Relaxed);
        self.stream
            .bytes_in
            .fetch_add(packet.frame.payload.len() as u64, Ordering::Relaxed);
        if let Some(splice) = &mut self.splice {
            if !self.splice_begun {
                // Any session other than the one `continuing` was given: a new timeline.
                splice.begin(self.stream.session().wrapping_add(1), self.has_video);
                self.splice_begun = true;
            }
            let Some(frame) = splice.frame(packet.frame.clone()) else {
                return;
            };
            if frame.dts != packet.frame.dts {
                packet = packet.retimed(frame);
            }
        }
        let (track, dts_ns) = Splicer::position(&packet.frame);
        let mut st = self.stream.state.lock();
        st.last_ns[track] = Some(st.last_ns[track].map_or(dts_ns, |l| l.max(dts_ns)));
        st.gop.push(packet.clone(), self.has_video);
        if let Some(tx) = &st.tx {
            // No receivers is fine: the GOP cache still serves the next joiner.
            let _ = tx.send(StreamEvent::Frame(packet));
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.hub.metrics
    }

    /// Completes with the reason when this publisher is evicted ([`Hub::evict`]); the
    /// ingest then ends its session.
    pub fn evicted(&self) -> impl std::future::Future<Output = String> + 'static {
        let mut rx = self.stream.evicted.subscribe();
        async move {
            loop {
                if let Some(reason) = rx.borrow_and_update().clone() {
                    return reason;
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Marks a relay live (upstream answered with its configuration), naming its source.
    pub fn set_live(&self, upstream_node: &str) {
        *self.stream.source.lock() = Source::Relay {
            node: upstream_node.to_string(),
        };
        self.stream.status.send_replace(Status::Live);
    }

    /// A relay: the number of publishers its upstream's stream has had (see
    /// [`Subscription::publishes`]).
    pub fn set_publishes(&self, n: u64) {
        self.stream.publishes.store(n, Ordering::Release);
    }

    /// Names the timeline consumers get from now on (a relay: its upstream's session).
    pub fn set_session(&self, session: u64) {
        self.stream.session.store(session, Ordering::Release);
    }

    /// Marks a derived stream live (its first configuration is set).
    pub fn set_derived_live(&self) {
        self.stream.status.send_replace(Status::Live);
    }

    pub fn subscribers(&self) -> usize {
        self.stream.subscribers()
    }

    /// Where consumers' keyframe requests arrive (merged).
    pub fn keyframe_signal(&self) -> KeyframeSignal {
        KeyframeSignal(self.stream.clone())
    }

    /// A future that completes once the stream has had no consumer for `grace`; the stream
    /// is then already unregistered, so a new consumer starts a new pull. Owns what it needs,
    /// so the caller can keep pushing frames while it waits.
    pub fn idle_waiter(&self, grace: Duration) -> impl std::future::Future<Output = ()> + 'static {
        let hub = self.hub.clone();
        let stream = self.stream.clone();
        async move {
            loop {
                if stream.subscribers() == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(grace) => {
                            if hub.remove_if_idle(&stream) {
                                return;
                            }
                        }
                        _ = stream.idle.notified() => {}
                    }
                } else {
                    stream.idle.notified().await;
                }
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if !self.hub.hold(&self.stream) {
            self.hub.end(&self.stream, None);
        }
    }
}

/// A consumer's view of a stream: the cached GOP, then the live ring.
pub struct Subscription {
    rx: broadcast::Receiver<StreamEvent>,
    backlog: VecDeque<StreamEvent>,
    skipping: bool,
    has_video: bool,
    lag_events: VecDeque<Instant>,
    max_lag_events: u32,
    _guard: SubscriberGuard,
    /// A viewer's place under the viewer limits, given back with the subscription.
    _ticket: Option<Box<ViewerTicket>>,
}

impl Subscription {
    /// Keeps `ticket` for as long as this subscription lives.
    pub fn hold(&mut self, ticket: ViewerTicket) {
        self._ticket = Some(Box::new(ticket));
    }

    /// Ends a viewer the operator kicked (one atomic load per frame).
    fn check_kicked(&self) -> Result<(), SubscriptionEnd> {
        match &self._ticket {
            Some(t) if t.kicked.load(Ordering::Acquire) => Err(SubscriptionEnd::Kicked),
            _ => Ok(()),
        }
    }

    /// Why the stream's publisher was evicted, if it was: the stream lives on elsewhere.
    pub fn evicted(&self) -> Option<String> {
        self._guard.0.evicted()
    }

    /// The timeline this subscription's frames are on (see [`Stream::session`]).
    pub fn session(&self) -> u64 {
        self._guard.0.session()
    }

    /// How many publishers the stream has had: it grows when one comes back to the
    /// stream held for it (the timeline goes on; an egress may start a new segment).
    pub fn publishes(&self) -> u64 {
        self._guard.0.publishes()
    }

    /// The stream's configuration as of subscribing (before any event is taken).
    pub fn initial_config(&self) -> Option<Arc<StreamConfig>> {
        match self.backlog.front() {
            Some(StreamEvent::Config(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// The stream's configuration; when it has none yet (a relay whose upstream has not
    /// sent it), waits up to `within` for it. Whatever arrives stays queued for `next`.
    pub async fn wait_config(&mut self, within: Duration) -> Option<Arc<StreamConfig>> {
        if let Some(c) = self.initial_config() {
            return Some(c);
        }
        if !self.backlog.is_empty() {
            return None;
        }
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Ok(ev)) => {
                let config = match &ev {
                    StreamEvent::Config(c) => Some(c.clone()),
                    _ => None,
                };
                self.backlog.push_back(ev);
                config
            }
            _ => None,
        }
    }

    /// Asks the stream's owner for a keyframe (merged with other requests).
    pub fn request_keyframe(&self) {
        self._guard.0.want_keyframe();
    }

    /// A handle that can ask for keyframes for this subscription from another task.
    pub fn keyframe_requester(&self) -> KeyframeRequester {
        KeyframeRequester(self._guard.0.clone())
    }

    /// The next event. Cancel-safe.
    pub async fn next(&mut self) -> Result<StreamEvent, SubscriptionEnd> {
        self.check_kicked()?;
        if let Some(ev) = self.backlog.pop_front() {
            return Ok(self.observe(ev));
        }
        loop {
            match self.rx.recv().await {
                Ok(ev) => {
                    if let Some(ev) = self.filter(ev) {
                        return Ok(ev);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.on_lag()?;
                    return Ok(StreamEvent::Discontinuity);
                }
                Err(broadcast::error::RecvError::Closed) => return Err(SubscriptionEnd::Ended),
            }
        }
    }

    /// The next event if one is ready now, without waiting (to batch writes).
    pub fn try_next(&mut self) -> Option<Result<StreamEvent, SubscriptionEnd>> {
        if let Err(e) = self.check_kicked() {
            return Some(Err(e));
        }
        if let Some(ev) = self.backlog.pop_front() {
            return Some(Ok(self.observe(ev)));
        }
        loop {
            match self.rx.try_recv() {
                Ok(ev) => {
                    if let Some(ev) = self.filter(ev) {
                        return Some(Ok(ev));
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    return Some(self.on_lag().map(|_| StreamEvent::Discontinuity));
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Some(Err(SubscriptionEnd::Ended))
                }
            }
        }
    }

    fn observe(&mut self, ev: StreamEvent) -> StreamEvent {
        if let StreamEvent::Config(c) = &ev {
            self.has_video = c.video.is_some();
        }
        ev
    }

    /// Drops frames while skipping to the next keyframe.
    fn filter(&mut self, ev: StreamEvent) -> Option<StreamEvent> {
        if self.skipping {
            if let StreamEvent::Frame(p) = &ev {
                if !p.frame.resumes_at(self.has_video) {
                    return None;
                }
                self.skipping = false;
            }
        }
        Some(self.observe(ev))
    }

    fn on_lag(&mut self) -> Result<(), SubscriptionEnd> {
        let now = Instant::now();
        while self
            .lag_events
            .front()
            .is_some_and(|t| now.duration_since(*t) > LAG_WINDOW)
        {
            self.lag_events.pop_front();
        }
        self.lag_events.push_back(now);
        self.skipping = true;
        if self.lag_events.len() > self.max_lag_events as usize {
            return Err(SubscriptionEnd::TooSlow);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Frame, Timebase, VideoConfig};
    use bytes::Bytes;

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
}
