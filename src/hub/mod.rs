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
//!
//! Files: `registry` (the map of streams, listings, a stream's end), `stream` (one stream's
//! shared state), `publisher` (claiming a name; the writer), `subscription` (attaching
//! consumers; the overflow policy), `viewers` (viewer admission and the kick list). The hub
//! knows frames, not protocols: it imports `media`, `metrics` and `config` only; what
//! a protocol needs of a frame it caches on the [`Packet`] itself (`media::packet`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::{broadcast, watch, Notify};

use crate::config::{Limits, NamespacesConfig};
use crate::media::gop::GopCache;
use crate::media::{Packet, StreamConfig, StreamKey};
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

/// Makes derived streams that consumers ask for by name: the WebRTC rendition, on the node
/// where the stream it derives from is published (so it is made once in the cluster and
/// relayed from there), and a room's mix, on the node that asks for it. Implemented above
/// the hub (the bridge, the rooms) and installed at start.
pub trait Deriver: Send + Sync {
    /// The source to list if this node makes `key`, a derived name (`base_is_local`: its
    /// base stream is published here); `None` if it does not make it.
    fn derives(&self, key: &StreamKey, base_is_local: bool) -> Option<Source>;
    /// Starts feeding `publisher`, the derived stream just created (pending until its owner
    /// sets it live).
    fn start(&self, hub: Arc<Hub>, publisher: Publisher);
}

pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

pub struct Hub {
    streams: Mutex<HashMap<StreamKey, Arc<Stream>>>,
    upstream: OnceLock<Arc<dyn Upstream>>,
    deriver: OnceLock<Arc<dyn Deriver>>,
    limits: RwLock<Arc<Limits>>,
    /// The declared namespaces: their limits and whether they relay.
    namespaces: RwLock<Arc<NamespacesConfig>>,
    events: broadcast::Sender<HubEvent>,
    metrics: Arc<Metrics>,
    viewers: Mutex<ViewerCounts>,
}

impl Hub {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Hub> {
        Arc::new(Hub {
            streams: Mutex::new(HashMap::new()),
            upstream: OnceLock::new(),
            deriver: OnceLock::new(),
            limits: RwLock::new(Arc::new(limits)),
            namespaces: RwLock::new(Arc::default()),
            events: broadcast::channel(1024).0,
            metrics,
            viewers: Mutex::new(ViewerCounts::default()),
        })
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The limits in force (a reload may replace them; what started under the old ones
    /// keeps its place).
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.read().clone()
    }

    /// The declared namespaces in force.
    pub fn namespaces(&self) -> Arc<NamespacesConfig> {
        self.namespaces.read().clone()
    }

    /// Applies new limits and namespaces (at start, and on a reload). Streams and viewers
    /// already admitted stay; the new bounds apply to the next publish, viewer and frame
    /// ring.
    pub fn reconfigure(&self, limits: Limits, namespaces: Arc<NamespacesConfig>) {
        *self.limits.write() = Arc::new(limits);
        *self.namespaces.write() = namespaces;
    }

    /// Whether a node of region `peer_region` may pull `key` from this one (region
    /// `own_region`): a namespace with `relay = false` stays in its region.
    pub fn may_relay(&self, key: &StreamKey, own_region: &str, peer_region: &str) -> bool {
        own_region == peer_region || self.namespaces.read().relays(key.namespace())
    }

    /// Installs the upstream used to pull streams this node lacks (set once at start).
    pub fn set_upstream(&self, upstream: Arc<dyn Upstream>) {
        let _ = self.upstream.set(upstream);
    }

    /// Installs what makes derived streams on demand (set once at start).
    pub fn set_deriver(&self, deriver: Arc<dyn Deriver>) {
        let _ = self.deriver.set(deriver);
    }

    /// Local stream starts and ends.
    pub fn events(&self) -> broadcast::Receiver<HubEvent> {
        self.events.subscribe()
    }
    fn new_stream(&self, key: StreamKey, source: Source, status: Status) -> Arc<Stream> {
        let limits = self.limits();
        Arc::new(Stream {
            key,
            source: Mutex::new(source),
            state: Mutex::new(StreamState {
                config: Arc::new(StreamConfig::default()),
                gop: GopCache::new(limits.gop_cache_max_bytes),
                tx: Some(broadcast::channel(limits.stream_buffer_frames).0),
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
            bframes: AtomicBool::new(false),
            audio_level: AtomicU8::new(127),
            order_settled: AtomicBool::new(false),
            started: Instant::now(),
            started_ms: crate::clock::unix_ms(),
            evicted: watch::channel(None).0,
            timeline: AtomicU64::new(rand::random()),
            publishes: AtomicU64::new(1),
        })
    }
}

mod publisher;
mod rate;
mod registry;
mod stream;
mod subscription;
#[cfg(test)]
mod tests;
mod viewers;

pub use publisher::{KeyframeSignal, Publisher};
use stream::StreamState;
pub use stream::{Stream, StreamInfo, TrackInfo};
pub use subscription::{FrameSignal, KeyframeRequester, Subscription};
use viewers::ViewerCounts;
pub use viewers::{ViewerInfo, ViewerTicket};
