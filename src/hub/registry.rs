//! The map of streams: lookups, listings, eviction, and the end of a stream (held for a
//! returning publisher, or removed).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;

use super::{Hub, HubEvent, Source, Status, Stream, StreamInfo, TrackInfo};
use crate::media::StreamKey;

impl Hub {
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
                        bframes: Some(s.bframes.load(Ordering::Relaxed)),
                    }),
                    audio: st.config.audio.as_ref().map(|a| TrackInfo {
                        codec: a.codec,
                        width: None,
                        height: None,
                        sample_rate: Some(a.sample_rate),
                        channels: Some(a.channels),
                        bframes: None,
                    }),
                    frames_in: s.frames_in.load(Ordering::Relaxed),
                    bytes_in: s.bytes_in.load(Ordering::Relaxed),
                    uptime_ms: s.started.elapsed().as_millis() as u64,
                    gop_cache_frames: st.gop.len(),
                    simulcast: st.config.simulcast.clone(),
                    waiting_for_publisher: st.held.is_some(),
                    publishes: s.publishes(),
                    bframes: s.bframes.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_by(|a, b| a.stream.cmp(&b.stream));
        out
    }

    /// A local publisher left: keeps its stream (viewers, egress, other nodes' pulls) for
    /// `limits.publisher_hold`, for it to come back ([`Hub::publish`]). `false` when it is
    /// not held: no hold configured, nobody consuming, or the publisher was evicted.
    pub(super) fn hold(self: &Arc<Self>, stream: &Arc<Stream>) -> bool {
        let hold = self.limits().publisher_hold;
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
    pub(super) fn end(&self, stream: &Arc<Stream>, held: Option<u64>) {
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
    pub(super) fn remove_if_idle(&self, stream: &Arc<Stream>) -> bool {
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
