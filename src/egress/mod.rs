//! Egress: pushing streams to RTMP destinations and recording them to files.
//!
//! Every egress is one task that owns a [`Subscription`] to its stream and feeds a *sink*
//! through a bounded queue: an RTMP push connection ([`rtmp_push`]) or a file writer thread
//! ([`record`]). The queue decouples them, so a slow or dead destination never slows the
//! stream or the other egresses: when the queue is full the egress drops frames until the
//! next keyframe (counted), and when a sink fails it is restarted with exponential backoff
//! and jitter (counted, with the last error) while the stream goes on.
//!
//! Timestamps given to sinks are rewritten by a [`Retimer`]: they start near zero and stay
//! monotonic across publisher reconnects, with one offset per subscription applied to audio
//! and video alike, so their relation (A/V sync) is exactly the input's.
//!
//! Audio: RTMP, FLV and MP4 take AAC, so an Opus stream is consumed through the shared
//! `~aac` bridge ([`crate::bridge`]), transcoded once per stream per node while any consumer
//! needs it. Video is remuxed, never re-encoded — unless the egress asks for
//! `transcode_video` and the destination cannot carry the codec (VP8 → H.264, shared the
//! same way through a `~h264` bridge).

pub mod policy;
pub mod record;
pub mod retention;
pub mod rtmp_push;
pub use crate::config::egress_spec as spec;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::hub::{Hub, HubEvent, StreamEvent, SubscribeError, Subscription, SubscriptionEnd};
use crate::media::Packet;
use crate::media::{Codec, StreamConfig, StreamKey, TrackKind};
use crate::metrics::Metrics;
pub use spec::{EgressRequest, EgressSpec, FieldError, StreamMatch, Target};

/// Items queued between an egress and its sink.
const SINK_QUEUE: usize = 512;
/// First and largest pause between attempts at a failing destination.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a waiting egress looks for its stream (also pulls it on an edge).
const WAIT_POLL: Duration = Duration::from_secs(1);
/// How often a waiting egress looks again at a stream whose codecs are not known yet.
const CONFIG_POLL: Duration = Duration::from_millis(100);
/// Gap inserted between the last frame before a publisher reconnect and the first after.
const RECONNECT_GAP_MS: i64 = 40;

/// What a sink receives.
#[derive(Clone, Debug)]
pub enum Item {
    /// Codec configuration; always before the frames it applies to.
    Config(Arc<StreamConfig>),
    /// A frame with output timestamps (milliseconds from the egress's start).
    Frame {
        packet: Arc<Packet>,
        dts_ms: i64,
        pts_ms: i64,
    },
    /// The publisher came back and the policy is `new_segment`: finish the file/publish.
    NewSegment,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for the stream to be live.
    Waiting,
    /// Opening the destination (connecting, handshaking, opening a file).
    Connecting,
    /// Sending.
    Live,
    /// The destination failed; retrying after a pause.
    Backoff,
    /// The stream cannot go to this destination (e.g. VP8 into RTMP); waiting for a new publish.
    Refused,
    /// The stream stayed away longer than the rule's `wait_seconds`.
    Finished,
    /// Deleted through the API or the node shut down.
    Stopped,
    /// The destination can take no more (the disk reached `recording.min_free_mb`); nothing
    /// more is written until the egress is created again. `last_error` says why.
    Failed,
}

/// What the API shows of one egress.
#[derive(Clone, Debug, Serialize)]
pub struct EgressStatus {
    pub id: String,
    pub stream: String,
    pub kind: &'static str,
    /// The RTMP URL (stream key hidden) or the recording format.
    pub destination: String,
    /// `api` or `config`.
    pub created_by: &'static str,
    pub state: State,
    pub started_unix_ms: u64,
    pub bytes: u64,
    pub frames: u64,
    /// Frames dropped because the destination could not keep up (or was down).
    pub dropped_frames: u64,
    /// Destination (re)connections after the first.
    pub reconnects: u64,
    /// Times the publisher came back while this egress ran.
    pub publisher_reconnects: u64,
    pub last_error: Option<String>,
    /// Recordings: the file being written (relative to the recording root) and all files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_file: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

/// Shared between an egress task, its sink and the API.
pub struct Shared {
    status: Mutex<EgressStatus>,
    live_since: Mutex<Option<std::time::Instant>>,
    metrics: Arc<Metrics>,
    /// Set by a sink that must not be restarted (the reason).
    fatal: Mutex<Option<String>>,
}

impl Shared {
    /// Marks the failure the sink is about to report as final: the egress turns
    /// [`State::Failed`] instead of retrying.
    pub fn fail_permanently(&self, why: &str) {
        *self.fatal.lock() = Some(why.to_string());
    }

    pub fn set_state(&self, state: State) {
        self.status.lock().state = state;
        *self.live_since.lock() = (state == State::Live).then(std::time::Instant::now);
    }

    /// How long the current sink has been live.
    fn live_for(&self) -> Duration {
        self.live_since
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Counts what a sink wrote.
    pub fn sent(&self, bytes: u64, frames: u64) {
        let mut s = self.status.lock();
        s.bytes += bytes;
        s.frames += frames;
        self.metrics.egress_bytes.inc_by(bytes);
    }

    fn error(&self, e: &str) {
        self.status.lock().last_error = Some(e.to_string());
    }

    pub fn file_opened(&self, relative: String) {
        let mut s = self.status.lock();
        s.current_file = Some(relative.clone());
        s.files.push(relative);
    }

    pub fn file_closed(&self) {
        self.status.lock().current_file = None;
    }

    fn snapshot(&self) -> EgressStatus {
        self.status.lock().clone()
    }
}

/// Where sinks write and how they start.
#[derive(Clone, Debug)]
pub struct EgressSettings {
    /// Recordings go under this directory.
    pub recording_root: PathBuf,
    /// Static rules from the config file.
    pub rules: Vec<EgressSpec>,
    /// Where API-created pushes may go.
    pub policy: Arc<policy::DestinationPolicy>,
    /// API-created and rule egress at most.
    pub max_jobs: usize,
    /// Signs the tokens an edge's forwards present to origins.
    pub auth: Arc<crate::auth::Auth>,
    /// Recordings stop when the disk holding them has less free space than this.
    pub min_free_bytes: u64,
}

/// Why an egress was not created.
#[derive(Debug)]
pub enum CreateError {
    /// Fields of the request are invalid (400).
    Invalid(Vec<FieldError>),
    /// The destination policy refuses it (403).
    Forbidden(String),
    /// `max_jobs` egress already run (429).
    TooMany(usize),
}

struct Entry {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    done: tokio::sync::watch::Receiver<bool>,
}

/// Every egress of this node.
pub struct Egress {
    hub: Arc<Hub>,
    settings: EgressSettings,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    shutdown: CancellationToken,
}

impl Egress {
    /// Starts the manager and the config rules.
    pub fn start(
        hub: Arc<Hub>,
        settings: EgressSettings,
        shutdown: CancellationToken,
    ) -> Arc<Egress> {
        let egress = Arc::new(Egress {
            hub,
            settings,
            entries: Mutex::new(HashMap::new()),
            shutdown,
        });
        if !egress.settings.rules.is_empty() {
            tokio::spawn(egress.clone().run_rules());
        }
        egress
    }

    /// Starts an egress from an API request, under the destination policy and the job cap.
    pub async fn create(
        self: &Arc<Self>,
        req: &EgressRequest,
    ) -> Result<EgressStatus, CreateError> {
        let spec = req.validate(false).map_err(CreateError::Invalid)?;
        let jobs = self
            .entries
            .lock()
            .values()
            .filter(|e| e.shared.status.lock().created_by != "forward")
            .count();
        if jobs >= self.settings.max_jobs {
            return Err(CreateError::TooMany(self.settings.max_jobs));
        }
        if let Target::Rtmp(url) = &spec.target {
            let policy = &self.settings.policy;
            policy.check_url(url).map_err(CreateError::Forbidden)?;
            let parsed = spec::RtmpUrl::parse(url).map_err(CreateError::Forbidden)?;
            policy
                .resolve(&parsed.host, parsed.port)
                .await
                .map_err(CreateError::Forbidden)?;
        }
        Ok(self.spawn(spec, "api"))
    }

    /// Starts an edge's forward of a local publish to an origin: a cluster-internal push
    /// that the destination policy does not apply to (origins are often on private
    /// addresses) and that does not count against `max_jobs`.
    ///
    /// Under `[auth]` the push presents a publish token for exactly this stream, signed with
    /// the node's first secret (a day long: a forward lives as long as its publish).
    pub fn create_forward(
        self: &Arc<Self>,
        req: &EgressRequest,
    ) -> Result<EgressStatus, Vec<FieldError>> {
        let mut req = req.clone();
        if let (Some(keys), Some(url)) = (self.settings.auth.keys(), req.url.as_mut()) {
            let claims = crate::auth::Claims {
                act: crate::auth::token::OneOrMany::One(crate::auth::Action::Publish),
                streams: vec![req.stream.clone()],
                exp: crate::auth::token::now_s() + 86_400,
                nbf: None,
                iat: Some(crate::auth::token::now_s()),
                sub: Some("edge-forward".into()),
            };
            match keys.mint(&claims) {
                Ok(t) => url.push_str(&format!("?token={t}")),
                Err(e) => warn!("cannot sign a forward's token: {e}"),
            }
        }
        let spec = req.validate(false)?;
        Ok(self.spawn(spec, "forward"))
    }

    pub fn list(&self) -> Vec<EgressStatus> {
        let mut v: Vec<_> = self
            .entries
            .lock()
            .values()
            .map(|e| e.shared.snapshot())
            .collect();
        v.sort_by(|a, b| (a.started_unix_ms, &a.id).cmp(&(b.started_unix_ms, &b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Option<EgressStatus> {
        self.entries.lock().get(id).map(|e| e.shared.snapshot())
    }

    /// Stops an egress, waits (briefly) for its sink to close cleanly, and returns its last
    /// status.
    pub async fn stop(&self, id: &str) -> Option<EgressStatus> {
        let entry = self.entries.lock().remove(id)?;
        entry.cancel.cancel();
        let mut done = entry.done.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d)).await;
        Some(entry.shared.snapshot())
    }

    /// Stops every egress (files finished, publishes ended), waiting a few seconds at most.
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.entries.lock().keys().cloned().collect();
        futures_util::future::join_all(ids.iter().map(|id| self.stop(id))).await;
    }

    fn spawn(self: &Arc<Self>, spec: EgressSpec, created_by: &'static str) -> EgressStatus {
        let id = format!("eg_{:012x}", rand::random::<u64>() >> 16);
        let StreamMatch::Exact(key) = spec.stream.clone() else {
            unreachable!("egresses are spawned for one stream");
        };
        let destination = match &spec.target {
            Target::Rtmp(url) => spec::RtmpUrl::parse(url)
                .map(|u| u.redacted())
                .unwrap_or_default(),
            Target::Record { format, .. } => format.extension().to_string(),
        };
        let shared = Arc::new(Shared {
            status: Mutex::new(EgressStatus {
                id: id.clone(),
                stream: key.to_string(),
                kind: spec.kind(),
                destination,
                created_by,
                state: State::Waiting,
                started_unix_ms: crate::clock::unix_ms(),
                bytes: 0,
                frames: 0,
                dropped_frames: 0,
                reconnects: 0,
                publisher_reconnects: 0,
                last_error: None,
                current_file: None,
                files: vec![],
            }),
            live_since: Mutex::new(None),
            metrics: self.hub.metrics().clone(),
            fatal: Mutex::new(None),
        });
        let cancel = self.shutdown.child_token();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let entry = Arc::new(Entry {
            shared: shared.clone(),
            cancel: cancel.clone(),
            done,
        });
        self.entries.lock().insert(id.clone(), entry);
        let status = shared.snapshot();
        let me = self.clone();
        let span = tracing::info_span!("egress", %id, stream = %key, kind = spec.kind());
        tokio::spawn(
            async move {
                me.hub.metrics().egress_active.inc();
                let task = Task {
                    hub: me.hub.clone(),
                    key,
                    spec,
                    shared: shared.clone(),
                    cancel,
                    recording_root: me.settings.recording_root.clone(),
                    min_free_bytes: me.settings.min_free_bytes,
                    policy: (created_by == "api").then(|| me.settings.policy.clone()),
                };
                let end = task.run().await;
                shared.set_state(end);
                me.hub.metrics().egress_active.dec();
                info!(state = ?end, "egress ended");
                let _ = done_tx.send(true);
                if end == State::Finished {
                    me.entries.lock().remove(&id);
                }
            }
            .instrument(span),
        );
        status
    }

    /// Starts rule egresses: exact-name rules at once (they wait for their stream, pulling
    /// it on an edge), pattern rules whenever a matching stream is published on this node.
    async fn run_rules(self: Arc<Self>) {
        let mut events = self.hub.events();
        let rules = self.settings.rules.clone();
        let mut running: HashMap<(usize, StreamKey), String> = HashMap::new();
        let mut start = |me: &Arc<Egress>, i: usize, key: &StreamKey| {
            // Forget finished egresses; one still running means the publisher came back
            // within its wait.
            running.retain(|_, id| me.entries.lock().contains_key(id));
            let slot = (i, key.clone());
            if running.contains_key(&slot) {
                return;
            }
            let status = me.spawn(rules[i].for_stream(key), "config");
            running.insert(slot, status.id);
        };
        for (i, rule) in rules.iter().enumerate() {
            if let StreamMatch::Exact(key) = &rule.stream {
                start(&self, i, key);
            }
        }
        let mut pending: Vec<StreamKey> = self.hub.local_streams();
        loop {
            // Simulcast layers are parts of a stream, not streams a rule should take.
            for key in pending.drain(..).filter(|k| !k.is_derived()) {
                for (i, rule) in rules.iter().enumerate() {
                    if matches!(rule.stream, StreamMatch::Pattern { .. })
                        && rule.stream.matches(&key)
                    {
                        start(&self, i, &key);
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                ev = events.recv() => match ev {
                    Ok(HubEvent::Published(key)) => pending.push(key),
                    Ok(HubEvent::Unpublished(_)) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => pending = self.hub.local_streams(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

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

/// Output timestamps: zero-based, monotonic per track, continuous across new subscriptions.
#[derive(Default)]
pub struct Retimer {
    offset: Option<i64>,
    last_out: Option<i64>,
    last_track: [Option<i64>; 2],
}

impl Retimer {
    /// The next frame starts a new input timeline (a new subscription).
    pub fn new_session(&mut self) {
        self.offset = None;
    }

    /// Output (dts, pts) in ms, or `None` for a frame that would go backwards on its track.
    pub fn map(&mut self, dts_ms: i64, pts_ms: i64, track: TrackKind) -> Option<(i64, i64)> {
        let last_out = self.last_out;
        let offset = *self.offset.get_or_insert_with(|| match last_out {
            Some(l) => l + RECONNECT_GAP_MS - dts_ms,
            None => -dts_ms,
        });
        let out = dts_ms + offset;
        let t = match track {
            TrackKind::Video => 0,
            TrackKind::Audio => 1,
        };
        if out < 0 || self.last_track[t].is_some_and(|l| out < l) {
            return None;
        }
        self.last_track[t] = Some(out);
        self.last_out = Some(self.last_out.map_or(out, |l| l.max(out)));
        Some((out, pts_ms + offset))
    }
}

/// A running sink: its queue and how it ended.
pub struct SinkHandle {
    tx: mpsc::Sender<Item>,
    done: tokio::sync::oneshot::Receiver<Result<(), String>>,
}

impl SinkHandle {
    pub fn new() -> (
        SinkHandle,
        mpsc::Receiver<Item>,
        tokio::sync::oneshot::Sender<Result<(), String>>,
    ) {
        let (tx, rx) = mpsc::channel(SINK_QUEUE);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        (SinkHandle { tx, done }, rx, done_tx)
    }
}

enum Why {
    /// The subscription ended: the publisher left.
    StreamEnded,
    /// The subscription was dropped (too slow): subscribe again.
    Resubscribe,
    /// The sink failed.
    SinkFailed(String),
    Cancelled,
}

struct Task {
    hub: Arc<Hub>,
    key: StreamKey,
    spec: EgressSpec,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    recording_root: PathBuf,
    /// Recording stops when the disk has less free space than this.
    min_free_bytes: u64,
    /// Checked on every connect of an RTMP push (API-created egress only).
    policy: Option<Arc<policy::DestinationPolicy>>,
}

impl Task {
    async fn run(self) -> State {
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
                    if let Some(why) = self.shared.fatal.lock().clone() {
                        warn!("egress failed for good: {why}");
                        self.shared.error(&why);
                        return State::Failed;
                    }
                    // A destination that worked for a while is retried soon again.
                    if self.shared.live_for() > Duration::from_secs(10) {
                        backoff.reset();
                    }
                    warn!("destination failed: {e}");
                    self.shared.error(&e);
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
                        _ => "the destination closed".into(),
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

/// Closes a sink cleanly (its queue ends; it finishes the file or unpublishes).
async fn close(sink: SinkHandle) {
    let SinkHandle { tx, done } = sink;
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retimer_keeps_av_relation_across_sessions() {
        let mut r = Retimer::default();
        // First publish starts at 5000 ms (a mid-stream join): output starts at 0.
        assert_eq!(r.map(5000, 5066, TrackKind::Video), Some((0, 66)));
        assert_eq!(r.map(5010, 5010, TrackKind::Audio), Some((10, 10)));
        assert_eq!(r.map(5033, 5100, TrackKind::Video), Some((33, 100)));
        // Publisher reconnects; its clock restarts at 0.
        r.new_session();
        assert_eq!(
            r.map(0, 0, TrackKind::Video),
            Some((33 + RECONNECT_GAP_MS, 33 + RECONNECT_GAP_MS))
        );
        // Audio 20 ms after video in the input stays 20 ms after in the output.
        let (a, _) = r.map(20, 20, TrackKind::Audio).unwrap();
        assert_eq!(a, 33 + RECONNECT_GAP_MS + 20);
        // A frame that would go backwards on its track is dropped.
        assert_eq!(r.map(-100, -100, TrackKind::Audio), None);
    }

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
