//! A WHEP viewer: frames from a hub subscription out as RTP (str0m, RTP mode).
//!
//! Frames are packetized once per frame per node ([`super::h264`], [`super::vp8`]) and the
//! payloads shared by all viewers; each viewer adds only its RTP header (own SSRC, sequence
//! numbers and timestamps starting at random values) and SRTP. A simulcast viewer's video
//! comes from the layer its bandwidth fits: [`super::layers::LayerSwitch`] decides, this
//! peer subscribes and sends.
//!
//! A viewer is a state machine its shard drives ([`super::shard`]): the shard feeds it
//! datagrams and timeouts and calls [`WhepPeer::step`] when one of its streams has new
//! frames; the viewer reads its subscriptions without waiting and writes what str0m sends
//! into its thread's send batch, which the shard sends for all its viewers at once. It owns
//! its `Rtc` and its subscriptions (no lock per packet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use str0m::bwe::{Bitrate, BweKind};
use str0m::format::Codec as RtcCodec;
use str0m::media::MediaKind;
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::io::{Datagram, Io};
use super::layers::{LayerAction, LayerSwitch};
use super::offer::{negotiated, negotiated_video, VideoFormat};
use super::rtp_out::{bound_rtx_cache, packetize, write_packets, RtpState, TrackOut, RTP_PAYLOADS};
use super::sessions::{SessionEnd, VIEWER_CONNECT_TIMEOUT};
use crate::hub::{Hub, Scope, StreamEvent, Subscription, SubscriptionEnd};
use crate::media::packet::Packet;
use crate::media::{Codec, StreamConfig, StreamKey, Timebase, TrackKind};
use crate::metrics::{Proto, ProtoCounters, Seat};

const VIDEO_CLOCK: Timebase = Timebase(90_000);
const OPUS_CLOCK: Timebase = Timebase(48_000);
/// A frame's packets are handed to str0m this many at a time (see `WhepPeer::send_queued`).
const SEND_CHUNK: usize = 8;
/// Events a viewer takes from one subscription in one step (a GOP's worth: a joining
/// viewer's cached frames go out together); more wait for the next step.
const EVENTS_PER_STEP: usize = 1024;

/// How far behind the stream a rendition's first keyframe may be and the viewer's times
/// move on by that much (it runs behind by its encoding: tens of ms).
const MAX_RENDITION_BEHIND_MS: i64 = 5_000;

/// A viewer of a stream as it is, should the stream gain B-frames (a publisher that comes
/// back with another encoder setting): it moves to the stream's WebRTC rendition, which a
/// browser decodes (see [`crate::bridge`]).
enum Rendition {
    /// Not for this viewer (`webrtc.bframes = "refuse"`, a derived stream, moved already).
    Off,
    /// Watching for B-frames.
    Watch,
    /// Subscribing to the rendition (on another task, like a layer).
    Opening(oneshot::Receiver<Option<Subscription>>),
    /// Subscribed: its frames are skipped until a video keyframe, where the viewer moves.
    Joining(LayerFeed),
}

/// One simulcast layer's subscription, as the viewer's [`LayerSwitch`] holds it.
pub(super) struct LayerFeed {
    sub: Subscription,
    config: Option<Arc<StreamConfig>>,
}

pub(super) struct WhepPeer {
    /// The stream's video codec (and H.264 profile), which the viewer's video m-line must
    /// carry.
    video_codec: VideoFormat,
    /// Boxed, like the peer's future in [`super::sessions::Sessions::spawn`]: an async fn
    /// keeps its arguments and its locals apart, so a ~10 KB `Rtc` held by value was
    /// stored several times over in each viewer's task.
    rtc: Box<Rtc>,
    sub: Subscription,
    hub: Arc<Hub>,
    stream: StreamKey,
    layers: LayerSwitch<LayerFeed>,
    /// A layer subscription being made (on an edge it may pull the layer first).
    opening: Option<oneshot::Receiver<Option<Subscription>>>,
    rendition: Rendition,
    /// The latest presentation times sent (ms), video and audio: where a move to the
    /// rendition resumes.
    sent_video_ms: Option<i64>,
    sent_audio_ms: Option<i64>,
    /// After a move, audio up to this time was sent from the stream before.
    resume_audio_after: Option<i64>,
    /// Wakes the shard when a layer subscription is made.
    wake: Arc<Notify>,
    /// A layer subscription was made since the shard last asked.
    subscribed: bool,
    /// The stream's configuration, from the main subscription.
    config: Option<Arc<StreamConfig>>,
    /// The session's DELETE (or the node's shutdown).
    cancel: CancellationToken,
    started: Instant,
    /// When str0m wants to be woken.
    timeout: Instant,
    io: Arc<Io>,
    local_addr: SocketAddr,
    video: Option<TrackOut>,
    audio: Option<TrackOut>,
    connected: bool,
    video_rtp: RtpState,
    audio_rtp: RtpState,
    /// An error met while sending a frame, returned by the next [`Self::drain`].
    failed: Option<str0m::RtcError>,
    /// The `webrtc` series this viewer counts in.
    counters: ProtoCounters,
    /// This viewer in the `viewers` gauge, from its offer's answer to its end.
    _seat: Seat,
    packets_out: prometheus_client::metrics::counter::Counter,
    /// Bytes handed to the socket since the last [`Self::drain`] (counted there, once).
    unsent_bytes: u64,
}

impl WhepPeer {
    /// A viewer of `stream` fed by `sub`, whose negotiated `rtc` talks through `io`; it ends
    /// when `cancel` is cancelled, and its layer subscriptions, made on other tasks, notify
    /// `wake`. With `bframes_to_rendition`, B-frames appearing in the stream move the viewer
    /// to its rendition.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        rtc: Rtc,
        video_codec: VideoFormat,
        sub: Subscription,
        hub: Arc<Hub>,
        stream: StreamKey,
        io: Arc<Io>,
        local_addr: SocketAddr,
        cancel: CancellationToken,
        wake: Arc<Notify>,
        bframes_to_rendition: bool,
    ) -> WhepPeer {
        let now = Instant::now();
        let metrics = hub.metrics();
        let counters = metrics.proto(Proto::WebRtc);
        let packets_out = metrics.packets_out(Proto::WebRtc);
        let rendition = match bframes_to_rendition && !stream.is_derived() {
            true => Rendition::Watch,
            false => Rendition::Off,
        };
        WhepPeer {
            _seat: Seat::take(&counters.viewers),
            video_codec,
            rtc: Box::new(rtc),
            sub,
            hub,
            stream,
            layers: LayerSwitch::default(),
            opening: None,
            rendition,
            sent_video_ms: None,
            sent_audio_ms: None,
            resume_audio_after: None,
            wake,
            subscribed: false,
            config: None,
            cancel,
            started: now,
            timeout: now,
            io,
            local_addr,
            video: None,
            audio: None,
            connected: false,
            video_rtp: RtpState::new(),
            audio_rtp: RtpState::new(),
            failed: None,
            counters,
            packets_out,
            unsent_bytes: 0,
        }
    }

    /// Feeds a datagram from the viewer; an error ends the viewer.
    pub(super) fn receive(&mut self, d: &Datagram) -> Result<(), str0m::RtcError> {
        d.feed(&mut self.rtc, self.local_addr)
    }

    /// When str0m wants [`Self::handle_timeout`] (as of the last step).
    pub(super) fn timeout(&self) -> Instant {
        self.timeout
    }

    pub(super) fn handle_timeout(&mut self, now: Instant) -> Result<(), str0m::RtcError> {
        self.rtc.handle_input(Input::Timeout(now))
    }

    /// Whether this viewer reads the stream `stream_id` ([`Subscription::stream_id`]).
    pub(super) fn reads(&self, stream_id: usize) -> bool {
        self.subscriptions().any(|s| s.stream_id() == stream_id)
    }

    /// The subscriptions this viewer reads: the stream's, and its simulcast layers'.
    pub(super) fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        let layers = [self.layers.current(), self.layers.joining()];
        let rendition = match &self.rendition {
            Rendition::Joining(feed) => Some(&feed.sub),
            _ => None,
        };
        std::iter::once(&self.sub)
            .chain(layers.into_iter().flatten().map(|l| &l.feed.sub))
            .chain(rendition)
    }

    /// Whether the viewer is connected and receiving (its cached GOP sent by the step that
    /// found it so).
    pub(super) fn is_live(&self) -> bool {
        self.connected && self.video.is_some()
    }

    /// Makes layer subscriptions wake another shard (the viewer moved there).
    pub(super) fn set_wake(&mut self, wake: Arc<Notify>) {
        self.wake = wake;
    }

    /// Whether a subscription was added since the last call (the shard then listens to its
    /// stream).
    pub(super) fn take_subscribed(&mut self) -> bool {
        std::mem::take(&mut self.subscribed)
    }

    /// Whether something other than media or datagrams wants a [`Self::step`]: a DELETE, the
    /// connect deadline, a layer subscription made.
    pub(super) fn needs_step(&self) -> bool {
        self.cancel.is_cancelled()
            || self.opening.is_some()
            || matches!(self.rendition, Rendition::Opening(_))
            || (!self.connected && self.started.elapsed() > VIEWER_CONNECT_TIMEOUT)
    }

    /// Brings the viewer up to date without waiting: hands str0m's output to the send
    /// batch, takes the events its subscriptions have ready and sends their frames. Returns
    /// why the viewer ended, if it did.
    pub(super) fn step(&mut self) -> Option<SessionEnd> {
        if let Err(e) = self.drain() {
            return Some(Err(e));
        }
        if self.cancel.is_cancelled() {
            self.rtc.disconnect();
            let _ = self.drain();
            return Some(Ok("deleted"));
        }
        if !self.rtc.is_alive() {
            return Some(Ok("peer closed"));
        }
        if !self.connected && self.started.elapsed() > VIEWER_CONNECT_TIMEOUT {
            return Some(Ok("ICE did not connect in time"));
        }
        self.take_opened();
        self.take_rendition();
        if !(self.connected && self.video.is_some()) {
            return None;
        }
        self.steer_layers();
        if let Err(end) = self.pump() {
            self.rtc.disconnect();
            let _ = self.drain();
            return Some(Ok(match end {
                SubscriptionEnd::Ended => "stream ended",
                SubscriptionEnd::Kicked => "disconnected by the operator",
                SubscriptionEnd::TooSlow => "viewer too slow",
            }));
        }
        self.drain().err().map(Err)
    }

    /// Takes the events the subscriptions have ready and sends their frames. Each frame
    /// leaves str0m's send queue before the next is written (see [`Self::send_queued`]):
    /// a joining viewer's cached GOP goes out in one step.
    fn pump(&mut self) -> Result<(), SubscriptionEnd> {
        for i in 0..EVENTS_PER_STEP {
            let Some(ev) = self.sub.try_next() else { break };
            let ev = ev?;
            self.between_events(i);
            self.on_stream_event(ev);
        }
        self.pump_layer(false);
        self.pump_layer(true);
        self.pump_rendition();
        Ok(())
    }

    /// Takes the rendition's events while the viewer joins it: skips them until a video
    /// keyframe, and moves there. The rendition runs behind the stream by its encoding, so
    /// its keyframe may be older than frames already sent: the tracks' RTP times then move
    /// on by the difference (both by the same, keeping them in sync), so that the viewer's
    /// times never go back, and the audio already sent is not sent again.
    fn pump_rendition(&mut self) {
        for i in 0..EVENTS_PER_STEP {
            let Rendition::Joining(feed) = &mut self.rendition else {
                return;
            };
            let ev = match feed.sub.try_next() {
                None => return,
                Some(Ok(ev)) => ev,
                Some(Err(end)) => {
                    debug!("rendition ended before the move: {end:?}");
                    self.rendition = Rendition::Off;
                    return;
                }
            };
            match ev {
                StreamEvent::Config(c) => feed.config = Some(c),
                StreamEvent::Frame(p)
                    if p.frame.keyframe
                        && p.frame.track() == TrackKind::Video
                        && feed.config.is_some() =>
                {
                    let Rendition::Joining(feed) =
                        std::mem::replace(&mut self.rendition, Rendition::Off)
                    else {
                        return;
                    };
                    self.move_to_rendition(feed, &p);
                    self.between_events(i);
                    self.on_stream_event(StreamEvent::Frame(p));
                    return;
                }
                StreamEvent::Frame(_) | StreamEvent::Discontinuity => {}
            }
        }
    }

    /// Makes the rendition the viewer's stream, from its keyframe `p` on (see
    /// [`Self::pump_rendition`]).
    fn move_to_rendition(&mut self, feed: LayerFeed, p: &Packet) {
        // A frame's time after the last one sent (a frame at 30 fps); bounded,
        // whatever times a publisher sends.
        let behind = self.sent_video_ms.map_or(0, |t| {
            t.saturating_add(33)
                .saturating_sub(p.frame.pts_ms())
                .clamp(0, MAX_RENDITION_BEHIND_MS)
        });
        info!(
            behind_ms = behind,
            "the stream has B-frames: moved to its WebRTC rendition"
        );
        self.video_rtp
            .shift(Timebase::MILLIS.rescale(behind, VIDEO_CLOCK) as u32);
        self.audio_rtp
            .shift(Timebase::MILLIS.rescale(behind, OPUS_CLOCK) as u32);
        self.sub = feed.sub;
        self.config = feed.config;
        self.resume_audio_after = self.sent_audio_ms.map(|t| t.saturating_sub(behind));
        self.sent_video_ms = None;
        self.sent_audio_ms = None;
    }

    /// The rendition's subscription, once it is made (or failed).
    fn take_rendition(&mut self) {
        let Rendition::Opening(rx) = &mut self.rendition else {
            return;
        };
        self.rendition = match rx.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => return,
            Ok(Some(sub)) => {
                sub.request_keyframe();
                self.subscribed = true;
                Rendition::Joining(LayerFeed { sub, config: None })
            }
            Ok(None) | Err(oneshot::error::TryRecvError::Closed) => Rendition::Off,
        };
    }

    /// Subscribes to `key` on another task (on an edge it may pull the stream first); the
    /// shard is woken when the subscription is made or has failed.
    fn subscribe_later(&self, key: StreamKey) -> oneshot::Receiver<Option<Subscription>> {
        let (tx, rx) = oneshot::channel();
        let (hub, wake) = (self.hub.clone(), self.wake.clone());
        tokio::spawn(async move {
            match hub.subscribe(&key, Scope::Any).await {
                Ok(sub) => {
                    let _ = tx.send(Some(sub));
                }
                Err(e) => debug!("{key}: {e}"),
            }
            wake.notify_one();
        });
        rx
    }

    /// [`Self::pump`] for the current (or the joining) simulcast layer.
    fn pump_layer(&mut self, joining: bool) {
        for i in 0..EVENTS_PER_STEP {
            let layer = match joining {
                false => self.layers.current_mut(),
                true => self.layers.joining_mut(),
            };
            let Some(ev) = layer.and_then(|l| l.feed.sub.try_next()) else {
                break;
            };
            self.between_events(i);
            match joining {
                false => self.on_layer_event(ev),
                true => self.on_joining_event(ev),
            }
        }
    }

    /// Before a step's `i`th event of a subscription: empties str0m's send queue after the
    /// one before (the step's last one is emptied by the step's drain).
    fn between_events(&mut self, i: usize) {
        if i > 0 {
            self.send_queued();
        }
    }

    fn on_stream_event(&mut self, ev: StreamEvent) {
        match ev {
            StreamEvent::Config(c) => {
                self.layers.set_layers(&c.simulcast);
                self.config = Some(c);
            }
            StreamEvent::Frame(p) => {
                // With simulcast, video comes from the viewer's layer.
                let video = p.frame.track() == TrackKind::Video;
                if self.layers.is_layered() && video {
                    return;
                }
                if video && p.frame.pts != p.frame.dts && matches!(self.rendition, Rendition::Watch)
                {
                    let key = self.stream.base().webrtc_rendition();
                    self.rendition = Rendition::Opening(self.subscribe_later(key));
                }
                if !video
                    && self
                        .resume_audio_after
                        .is_some_and(|t| p.frame.pts_ms() <= t)
                {
                    return; // sent already, from the stream before the move
                }
                if let Some(c) = self.config.take() {
                    self.send_frame(&p, &c);
                    self.config = Some(c);
                }
            }
            StreamEvent::Discontinuity => {}
        }
    }

    /// A layer subscription asked for by [`LayerAction::Open`], once it is made (or failed).
    fn take_opened(&mut self) {
        let Some(rx) = &mut self.opening else { return };
        let sub = match rx.try_recv() {
            Ok(sub) => sub,
            Err(oneshot::error::TryRecvError::Empty) => return,
            Err(oneshot::error::TryRecvError::Closed) => None,
        };
        self.opening = None;
        self.subscribed |= sub.is_some();
        let feed = sub.map(|sub| LayerFeed { sub, config: None });
        if self.layers.opened(Instant::now(), feed) {
            if let Some(l) = self.layers.joining_mut() {
                l.feed.sub.request_keyframe();
            }
        }
    }

    /// Does what the layer switch asks: probing, keyframe requests, subscribing.
    fn steer_layers(&mut self) {
        while let Some(action) = self.layers.poll(Instant::now()) {
            match action {
                LayerAction::Probe(bps) => {
                    self.rtc.bwe().set_bitrate(Bitrate::ZERO, Bitrate::bps(bps));
                }
                LayerAction::RequestJoinKeyframe => {
                    if let Some(l) = self.layers.joining_mut() {
                        l.feed.sub.request_keyframe();
                    }
                }
                LayerAction::Open(rid) => {
                    self.opening = Some(self.subscribe_later(self.stream.layer(&rid)));
                }
            }
        }
    }

    fn on_layer_event(&mut self, ev: Result<StreamEvent, SubscriptionEnd>) {
        match ev {
            Ok(StreamEvent::Config(c)) => {
                if let Some(cur) = self.layers.current_mut() {
                    cur.feed.config = Some(c);
                }
            }
            Ok(StreamEvent::Frame(p)) => self.send_layer_frame(&p),
            Ok(StreamEvent::Discontinuity) => {}
            Err(_) => self.layers.current_ended(),
        }
    }

    /// Events of the layer being joined: it becomes the sent layer where the switch says.
    fn on_joining_event(&mut self, ev: Result<StreamEvent, SubscriptionEnd>) {
        match ev {
            Ok(StreamEvent::Config(c)) => {
                if let Some(l) = self.layers.joining_mut() {
                    l.feed.config = Some(c);
                }
            }
            Ok(StreamEvent::Frame(p)) => {
                let pts = p.frame.timebase.rescale(p.frame.pts, VIDEO_CLOCK);
                let configured = self
                    .layers
                    .joining_mut()
                    .is_some_and(|l| l.feed.config.is_some());
                let keyframe = p.frame.is_video_keyframe();
                let now = Instant::now();
                if let Some(step) = self.layers.joining_frame(now, pts, keyframe, configured) {
                    self.video_rtp.shift(step);
                    self.send_layer_frame(&p);
                }
            }
            Ok(StreamEvent::Discontinuity) => {}
            Err(_) => self.layers.joining_ended(),
        }
    }

    fn send_layer_frame(&mut self, p: &Arc<Packet>) {
        let Some(config) = self.layers.current().and_then(|c| c.feed.config.clone()) else {
            return;
        };
        if p.frame.track() != TrackKind::Video {
            return;
        }
        let bytes = self.send_frame(p, &config);
        let pts = p.frame.timebase.rescale(p.frame.pts, VIDEO_CLOCK);
        self.layers.sent(Instant::now(), pts, bytes);
    }

    /// Hands what str0m has to send to the send batch (the shard sends it) and handles its
    /// events; notes its next timeout.
    fn drain(&mut self) -> Result<(), str0m::RtcError> {
        let next = self.poll();
        let sent = std::mem::take(&mut self.unsent_bytes);
        if sent > 0 {
            self.counters.bytes_out.inc_by(sent);
        }
        self.timeout = next?;
        Ok(())
    }

    /// Hands str0m's output to the send batch and handles its events until str0m waits;
    /// returns when it wants to be woken.
    fn poll(&mut self) -> Result<Instant, str0m::RtcError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        // str0m often asks for a timeout that is already due (its send queues want a
        // fresh look right after media was written): handling it here rather than through
        // the runtime's timer saves a wake-up per frame. A few rounds at most.
        let mut due_rounds = 0;
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) if due_rounds < 4 && t <= Instant::now() => {
                    due_rounds += 1;
                    self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    self.unsent_bytes += t.contents.len() as u64;
                    self.io.transmit(&t);
                }
                Output::Event(ev) => self.on_event(ev),
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected => {
                info!("connected");
                self.connected = true;
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                info!("ICE disconnected");
                self.rtc.disconnect();
            }
            Event::MediaAdded(m) if m.kind == MediaKind::Video && self.video.is_none() => {
                let ssrc = bound_rtx_cache(&mut self.rtc, m.mid);
                match (negotiated_video(&self.rtc, m.mid, self.video_codec), ssrc) {
                    (Some(pt), Some(ssrc)) => self.video = Some(TrackOut::new(ssrc, &pt)),
                    _ => warn!(
                        "viewer offered no {:?} for the stream's video",
                        self.video_codec
                    ),
                }
            }
            Event::MediaAdded(m) if m.kind == MediaKind::Audio && self.audio.is_none() => {
                let ssrc = bound_rtx_cache(&mut self.rtc, m.mid);
                self.audio = negotiated(&self.rtc, m.mid, RtcCodec::Opus)
                    .zip(ssrc)
                    .map(|(pt, ssrc)| TrackOut::new(ssrc, &pt));
            }
            Event::KeyframeRequest(r) => {
                debug!(kind = ?r.kind, "keyframe request from viewer");
                match self.layers.current() {
                    Some(layer) => layer.feed.sub.request_keyframe(),
                    None => self.sub.request_keyframe(),
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                debug!(%estimate, "viewer bandwidth estimate");
                self.layers.estimate(Instant::now(), estimate.as_u64());
            }
            _ => {}
        }
    }

    /// Sends one frame; returns the payload bytes sent.
    fn send_frame(&mut self, p: &Arc<Packet>, config: &StreamConfig) -> usize {
        let (track, rtp, clock) = match p.frame.codec {
            Codec::H264 | Codec::Vp8 => (self.video, &mut self.video_rtp, VIDEO_CLOCK),
            Codec::Opus => (self.audio, &mut self.audio_rtp, OPUS_CLOCK),
            // AAC reaches WebRTC viewers bridged to Opus (crate::bridge).
            Codec::Aac => return 0,
        };
        let Some(track) = track else { return 0 };
        let sent = match p.frame.track() {
            TrackKind::Video => &mut self.sent_video_ms,
            TrackKind::Audio => &mut self.sent_audio_ms,
        };
        *sent = Some(sent.map_or(p.frame.pts_ms(), |t| t.max(p.frame.pts_ms())));
        let payloads = RTP_PAYLOADS.get(p, |p| packetize(p, config));
        let time = rtp.timestamp(p.frame.timebase.rescale(p.frame.pts, clock));
        let mut seq = rtp.seq;
        rtp.seq += payloads.len() as u64;
        self.counters.frames_out.inc();
        self.packets_out.inc_by(payloads.len() as u64);
        let mut chunks = payloads.chunks(SEND_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            let last_chunk = chunks.peek().is_none();
            write_packets(&mut self.rtc, track, seq, time, chunk, last_chunk);
            seq += chunk.len() as u64;
            if !last_chunk {
                self.send_queued();
            }
        }
        payloads.iter().map(|p| p.len()).sum()
    }

    /// Moves the packets written so far into the send batch, so that str0m's send queue
    /// holds [`SEND_CHUNK`] packets at most instead of a keyframe's worth: each queued
    /// packet is ~400 bytes of str0m state, and the queue keeps its largest size for the
    /// viewer's lifetime. The rest of the frame goes out in [`Self::drain`], which also
    /// returns an error met here.
    fn send_queued(&mut self) {
        if let Err(e) = self.poll() {
            self.failed = Some(e);
        }
    }
}
