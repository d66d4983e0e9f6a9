//! Claiming a name for a local publisher, and the [`Publisher`] handle: the single writer
//! of a stream.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::rate::RateGuard;
use super::{Hub, HubEvent, PublishError, Source, Status, Stream, StreamEvent};
use crate::media::splice::Splicer;
use crate::media::{Packet, StreamConfig, StreamKey, TrackKind};
use crate::metrics::Metrics;

impl Hub {
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
                p.rate = self.rate_guard(&key);
                p.has_video = st.config.video.is_some();
                p.splice = Some(Splicer::continuing(held.timeline(), st.last_ns));
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
            let _ = self.events.send(HubEvent::Published(key.clone()));
            stream
        };
        self.metrics.local_streams.inc();
        let mut p = Publisher::new(self.clone(), stream);
        p.rate = self.rate_guard(&key);
        Ok(p)
    }

    /// The bitrate bound of `key`'s namespace, if it has one (simulcast layers and derived
    /// streams are not bounded: their publisher's own stream is).
    fn rate_guard(&self, key: &StreamKey) -> Option<RateGuard> {
        if key.is_derived() {
            return None;
        }
        let namespaces = self.namespaces();
        let kbps = namespaces.get(key.namespace())?.limits.max_bitrate_kbps?;
        Some(RateGuard::new(kbps))
    }

    /// Refuses a new local publish past `limits.max_streams` (node) or
    /// `limits.max_streams_per_namespace`. Called under the streams map lock.
    pub(super) fn check_stream_limits(
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
        let limits = self.limits();
        if total >= limits.max_streams {
            return Err(PublishError::Limit(format!(
                "this node is at its stream limit ({})",
                limits.max_streams
            )));
        }
        // A declared namespace's own bound replaces `max_streams_per_namespace`.
        let ns_max = self
            .namespaces()
            .get(key.namespace())
            .and_then(|n| n.limits.max_streams)
            .unwrap_or(limits.max_streams_per_namespace);
        if in_ns >= ns_max {
            return Err(PublishError::Limit(format!(
                "namespace {} is at its stream limit ({ns_max})",
                key.namespace(),
            )));
        }
        Ok(())
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
    /// Video frames pushed, counted up to [`ORDER_SETTLED_AFTER`].
    video_frames: u8,
    /// The namespace's bitrate bound, if it has one.
    rate: Option<RateGuard>,
}

/// Video frames in decode order after which a stream is known to have no B-frames (an
/// encoder with B-frames shifts every frame's decode time, so the first shows it already).
const ORDER_SETTLED_AFTER: u8 = 3;

impl Publisher {
    pub(super) fn new(hub: Arc<Hub>, stream: Arc<Stream>) -> Publisher {
        Publisher {
            hub,
            stream,
            has_video: false,
            splice: None,
            splice_begun: false,
            video_frames: 0,
            rate: None,
        }
    }

    /// An audio level the publisher reported (RFC 6464, -dBov); the loudest of a window is
    /// kept for [`Stream::take_audio_level`].
    pub fn note_audio_level(&self, dbov: u8) {
        self.stream
            .audio_level
            .fetch_min(dbov.min(127), std::sync::atomic::Ordering::Relaxed);
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
        if let Some(rate) = &mut self.rate {
            if let Some(reason) = rate.add(packet.frame.payload.len(), Instant::now()) {
                tracing::warn!(stream = %self.stream.key, "{reason}: publish ended");
                self.hub.metrics.count_refused("publish", "bitrate");
                self.hub.evict(&self.stream.key, &reason);
            }
        }
        let f = &packet.frame;
        if f.track() == TrackKind::Video {
            if f.pts != f.dts {
                // One relaxed store, only on reordered frames.
                self.stream.bframes.store(true, Ordering::Relaxed);
            }
            if self.video_frames < ORDER_SETTLED_AFTER {
                self.video_frames += 1;
                if self.video_frames == ORDER_SETTLED_AFTER {
                    self.stream.order_settled.store(true, Ordering::Relaxed);
                }
            }
        }
        if let Some(splice) = &mut self.splice {
            if !self.splice_begun {
                // Any timeline other than the one `continuing` was given: a new one.
                splice.begin(self.stream.timeline().wrapping_add(1), self.has_video);
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

    /// Names the timeline consumers get from now on (a relay: its upstream's).
    pub fn set_timeline(&self, timeline: u64) {
        self.stream.timeline.store(timeline, Ordering::Release);
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
