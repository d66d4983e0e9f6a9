//! One egress's task: waits for its stream, checks the destination can carry it, starts the
//! sink, pumps frames into the sink's bounded queue (dropping to the next keyframe when it
//! is full), and when the sink fails restarts it after an exponential backoff with jitter,
//! unless the failure is permanent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::retimer::Retimer;
use super::sink::{close, Item, SinkError, SinkHandle};
use super::spec::{self, EgressSpec, Target};
use super::status::{SharedStatus, State};
use super::{policy, record, rtmp_push};
use crate::hub::{Hub, HubEvent, StreamEvent, SubscribeError, Subscription, SubscriptionEnd};
use crate::media::{Codec, StreamConfig, StreamKey};

/// First and largest pause between attempts at a failing destination.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a waiting egress looks for its stream (also pulls it on an edge).
const WAIT_POLL: Duration = Duration::from_secs(1);
/// How often a waiting egress looks again at a stream whose codecs are not known yet.
const CONFIG_POLL: Duration = Duration::from_millis(100);

/// Exponential backoff with ±25% jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let jitter = rand::random_range(0.75..1.25);
        base.mul_f64(jitter)
    }
}

enum Why {
    /// The subscription ended: the publisher left.
    StreamEnded,
    /// The subscription was dropped (too slow): subscribe again.
    Resubscribe,
    /// The sink failed.
    SinkFailed(SinkError),
    Cancelled,
}

pub(super) struct EgressTask {
    pub(super) hub: Arc<Hub>,
    pub(super) key: StreamKey,
    pub(super) spec: EgressSpec,
    pub(super) shared: Arc<SharedStatus>,
    pub(super) cancel: CancellationToken,
    pub(super) recording_root: PathBuf,
    /// Recording stops when the disk has less free space than this.
    pub(super) min_free_bytes: u64,
    /// Where finished recording files are uploaded, if anywhere.
    pub(super) uploader: Option<Arc<super::upload::Uploader>>,
    /// Checked on every connect of an RTMP push (API-created egress only).
    pub(super) policy: Option<Arc<policy::DestinationPolicy>>,
}

impl EgressTask {
    pub(super) async fn run(self) -> State {
        let mut retimer = Retimer::default();
        let mut backoff = Backoff::new();
        let mut sink: Option<SinkHandle> = None;
        let mut seen_publish = false;
        let mut publisher_left = false;
        loop {
            // 1. The stream (with the audio this destination takes).
            let Some(sub) = self.wait_for_stream(seen_publish).await else {
                if let Some(s) = sink.take() {
                    close(s).await;
                }
                return if self.cancel.is_cancelled() {
                    State::Stopped
                } else {
                    State::Finished
                };
            };
            let publisher_returned = std::mem::take(&mut publisher_left);
            if publisher_returned {
                self.shared.status.lock().publisher_reconnects += 1;
            }
            seen_publish = true;
            let sub = match self.check_codecs(sub).await {
                Ok(sub) => sub,
                Err(why) => {
                    self.shared.error(&why);
                    self.shared.set_state(State::Refused);
                    warn!("{why}");
                    if let Some(s) = sink.take() {
                        close(s).await;
                    }
                    if self.wait_until_unpublished().await {
                        return State::Stopped;
                    }
                    continue;
                }
            };
            // 2. The sink (kept across publisher reconnects unless the policy says otherwise).
            if sink.as_ref().is_some_and(|s| s.tx.is_closed()) {
                sink = None;
            }
            let sink_ref = match sink.as_mut() {
                Some(s) => {
                    if publisher_returned
                        && self.spec.on_reconnect == spec::ReconnectPolicy::NewSegment
                    {
                        let _ = s.tx.send(Item::NewSegment).await;
                    }
                    s
                }
                None => {
                    self.shared.set_state(State::Connecting);
                    sink.insert(self.start_sink())
                }
            };
            // 3. Pump until something ends.
            retimer.new_session();
            let why = self.pump(sub, sink_ref, &mut retimer).await;
            match why {
                Why::Cancelled => {
                    if let Some(s) = sink.take() {
                        close(s).await;
                    }
                    return State::Stopped;
                }
                Why::StreamEnded => {
                    info!("stream ended; waiting for the publisher to come back");
                    publisher_left = true;
                    self.shared.set_state(State::Waiting);
                }
                Why::Resubscribe => {}
                Why::SinkFailed(e) => {
                    sink = None;
                    if e.is_permanent() {
                        warn!("egress failed for good: {e}");
                        self.shared.error(&e.to_string());
                        return State::Failed;
                    }
                    // A destination that worked for a while is retried soon again.
                    if self.shared.live_for() > Duration::from_secs(10) {
                        backoff.reset();
                    }
                    warn!("destination failed: {e}");
                    self.shared.error(&e.to_string());
                    self.shared.set_state(State::Backoff);
                    {
                        let mut s = self.shared.status.lock();
                        s.reconnects += 1;
                    }
                    self.hub.metrics().egress_reconnects.inc();
                    let pause = backoff.step();
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.cancel.cancelled() => return State::Stopped,
                    }
                    continue;
                }
            }
        }
    }

    fn start_sink(&self) -> SinkHandle {
        let (handle, rx, done) = SinkHandle::new();
        let shared = self.shared.clone();
        match &self.spec.target {
            Target::Rtmp(url) => {
                let url = spec::RtmpUrl::parse(url).expect("validated");
                let policy = self.policy.clone();
                tokio::spawn(
                    async move {
                        let r = rtmp_push::run(url, policy, rx, shared).await;
                        let _ = done.send(r);
                    }
                    .in_current_span(),
                );
            }
            Target::Record {
                format,
                template,
                segment,
                segment_bytes,
            } => {
                let job = record::Job {
                    min_free_bytes: self.min_free_bytes,
                    root: self.recording_root.clone(),
                    key: self.key.clone(),
                    format: *format,
                    template: template.clone(),
                    segment: *segment,
                    segment_bytes: *segment_bytes,
                    uploader: self.uploader.clone(),
                };
                let span = tracing::Span::current();
                std::thread::Builder::new()
                    .name("meshcast-record".into())
                    .spawn(move || {
                        let _g = span.enter();
                        let r = record::run(job, rx, shared);
                        let _ = done.send(r);
                    })
                    .expect("spawning a recording thread");
            }
        }
        handle
    }

    /// Subscribes once the stream is live, with its audio as this destination takes it.
    /// `None` when cancelled, or (rules) when the stream stayed away for the wait period.
    async fn wait_for_stream(&self, seen_before: bool) -> Option<Subscription> {
        let started = tokio::time::Instant::now();
        let mut events = self.hub.events();
        loop {
            match self.subscribe().await {
                // Once the publisher has said what it sends (codecs decide how we consume it).
                Ok(sub)
                    if sub
                        .initial_config()
                        .is_some_and(|c| c.video.is_some() || c.audio.is_some()) =>
                {
                    return Some(sub)
                }
                Ok(_) => {
                    tokio::select! {
                        _ = self.cancel.cancelled() => return None,
                        _ = tokio::time::sleep(CONFIG_POLL) => {}
                    }
                    continue;
                }
                Err(SubscribeError::NotFound(_)) | Err(SubscribeError::UpstreamTimeout(_)) => {}
            }
            if let Some(wait) = self.spec.wait {
                if seen_before && started.elapsed() >= wait {
                    info!("stream did not come back within {wait:?}");
                    return None;
                }
            }
            // Look again at the next poll (which also pulls it, on an edge), or as soon as it
            // is published here.
            let poll = tokio::time::sleep(WAIT_POLL);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    _ = self.cancel.cancelled() => return None,
                    _ = &mut poll => break,
                    ev = events.recv() => match ev {
                        Ok(HubEvent::Published(k)) if k == self.key => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            (&mut poll).await;
                            break;
                        }
                        _ => {}
                    },
                }
            }
        }
    }

    async fn subscribe(&self) -> Result<Subscription, SubscribeError> {
        match &self.spec.target {
            Target::Record { format, .. } if format.takes_opus() => {
                self.hub.subscribe(&self.key, crate::hub::Scope::Any).await
            }
            _ => crate::bridge::subscribe_with_audio(&self.hub, &self.key, Codec::Aac).await,
        }
    }

    /// Why the destination cannot carry this configuration's video as it is, if it cannot.
    fn unfit_video(&self, config: &StreamConfig) -> Option<String> {
        let video = config.video.as_ref()?;
        let (fits, what) = match &self.spec.target {
            Target::Rtmp(_) => (video.codec.fits_flv(), "RTMP".to_string()),
            Target::Record { format, .. } => (
                format.takes_video(video.codec),
                format!("{} recordings", format.extension()),
            ),
        };
        (!fits).then(|| {
            format!(
                "the stream's video is {:?}, which {what} cannot carry; set transcode_video to re-encode it to H.264",
                video.codec
            )
        })
    }

    /// The subscription if the destination can carry its video (possibly through the shared
    /// video transcoder), else why not.
    async fn check_codecs(&self, sub: Subscription) -> Result<Subscription, String> {
        let Some(why) = sub.initial_config().and_then(|c| self.unfit_video(&c)) else {
            return Ok(sub);
        };
        if !self.spec.transcode_video {
            return Err(why);
        }
        drop(sub);
        crate::bridge::subscribe_with_h264(&self.hub, &self.key)
            .await
            .map_err(|e| format!("video transcoding did not start: {e}"))
    }

    /// Waits for the current publish to end (after a refusal). Returns true when cancelled.
    async fn wait_until_unpublished(&self) -> bool {
        loop {
            let gone = self.hub.get(&self.key).is_none();
            if gone {
                return false;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return true,
                _ = tokio::time::sleep(WAIT_POLL) => {}
            }
        }
    }

    async fn pump(
        &self,
        mut sub: Subscription,
        sink: &mut SinkHandle,
        retimer: &mut Retimer,
    ) -> Why {
        let mut skipping = false;
        let mut has_video = false;
        let mut publishes = sub.publishes();
        loop {
            let ev = tokio::select! {
                ev = sub.next() => ev,
                r = &mut sink.done => {
                    return Why::SinkFailed(match r {
                        Ok(Err(e)) => e,
                        _ => SinkError::Gone,
                    });
                }
                _ = self.cancel.cancelled() => return Why::Cancelled,
            };
            let item = match ev {
                Ok(StreamEvent::Config(c)) => {
                    if self.unfit_video(&c).is_some() {
                        return Why::Resubscribe; // checked (and refused or bridged) there
                    }
                    has_video = c.video.is_some();
                    Item::Config(c)
                }
                Ok(StreamEvent::Frame(p)) => {
                    if sub.publishes() != publishes {
                        // The publisher came back to the stream held for it: the timeline
                        // goes on, so the subscription does too.
                        publishes = sub.publishes();
                        info!("the publisher came back");
                        self.shared.status.lock().publisher_reconnects += 1;
                        if self.spec.on_reconnect == spec::ReconnectPolicy::NewSegment {
                            let _ = sink.tx.send(Item::NewSegment).await;
                        }
                    }
                    if skipping {
                        if !p.frame.resumes_at(has_video) {
                            self.dropped(1);
                            continue;
                        }
                        skipping = false;
                    }
                    let Some((dts_ms, pts_ms)) =
                        retimer.map(p.frame.dts_ms(), p.frame.pts_ms(), p.frame.track())
                    else {
                        continue;
                    };
                    Item::Frame {
                        packet: p,
                        dts_ms,
                        pts_ms,
                    }
                }
                Ok(StreamEvent::Discontinuity) => {
                    self.dropped(1);
                    continue;
                }
                Err(SubscriptionEnd::Ended) => return Why::StreamEnded,
                Err(SubscriptionEnd::TooSlow) => return Why::Resubscribe,
                // Egress holds no viewer ticket: never kicked.
                Err(SubscriptionEnd::Kicked) => return Why::Cancelled,
            };
            let is_config = matches!(item, Item::Config(_));
            match sink.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    if is_config {
                        // Configuration must not be lost: wait for room.
                        if sink.tx.send(item).await.is_err() {
                            continue; // the sink died; `done` says why next turn
                        }
                    } else {
                        self.dropped(1);
                        skipping = true;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    fn dropped(&self, n: u64) {
        self.shared.status.lock().dropped_frames += n;
        self.hub.metrics().egress_dropped_frames.inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new();
        let first = b.step();
        assert!(first >= BACKOFF_MIN.mul_f64(0.75) && first <= BACKOFF_MIN.mul_f64(1.25));
        let mut last = first;
        for _ in 0..20 {
            last = b.step();
        }
        assert!(last <= BACKOFF_MAX.mul_f64(1.25) && last >= BACKOFF_MAX.mul_f64(0.75));
        b.reset();
        assert!(b.step() <= BACKOFF_MIN.mul_f64(1.25));
    }
}
