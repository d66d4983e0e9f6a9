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
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::format::Codec as RtcCodec;
use str0m::media::{MediaKind, Mid};
use str0m::rtp::{RtpWrite, SeqNo, Ssrc};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::io::{Datagram, Io};
use super::layers::{LayerAction, LayerSwitch};
use super::offer::{negotiated, negotiated_video, VideoFormat};
use super::sessions::{SessionEnd, VIEWER_CONNECT_TIMEOUT};
use super::{h264, vp8};
use crate::hub::{Hub, Scope, StreamEvent, Subscription, SubscriptionEnd};
use crate::media::packet::{Encoding, Packet};
use crate::media::{avc, Codec, StreamConfig, StreamKey, Timebase, TrackKind};
use crate::metrics::{Proto, ProtoCounters, Seat};

/// RTP payload bytes per packet (leaves room for RTP header, extensions and SRTP tag).
const RTP_MTU: usize = 1100;
const VIDEO_CLOCK: Timebase = Timebase(90_000);
const OPUS_CLOCK: Timebase = Timebase(48_000);
/// Packets each viewer stream keeps for NACK resends.
const RTX_CACHE_PACKETS: usize = 128;
/// A frame's packets are handed to str0m this many at a time (see `WhepPeer::send_queued`).
const SEND_CHUNK: usize = 8;
/// Events a viewer takes from one subscription in one step (a GOP's worth: a joining
/// viewer's cached frames go out together); more wait for the next step.
const EVENTS_PER_STEP: usize = 1024;

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
    /// `wake`.
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
    ) -> WhepPeer {
        let now = Instant::now();
        let metrics = hub.metrics();
        let counters = metrics.proto(Proto::WebRtc);
        let packets_out = metrics.packets_out(Proto::WebRtc);
        WhepPeer {
            _seat: Seat::take(&counters.viewers),
            video_codec,
            rtc: Box::new(rtc),
            sub,
            hub,
            stream,
            layers: LayerSwitch::default(),
            opening: None,
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
        std::iter::once(&self.sub).chain(layers.into_iter().flatten().map(|l| &l.feed.sub))
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
        Ok(())
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
                let layered = self.layers.is_layered() && (p.frame.track() == TrackKind::Video);
                if layered {
                    return;
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
                    let (tx, rx) = oneshot::channel();
                    let (hub, key) = (self.hub.clone(), self.stream.layer(&rid));
                    let wake = self.wake.clone();
                    tokio::spawn(async move {
                        match hub.subscribe(&key, Scope::Any).await {
                            Ok(sub) => {
                                let _ = tx.send(Some(sub));
                            }
                            Err(e) => debug!("layer {key}: {e}"),
                        }
                        wake.notify_one();
                    });
                    self.opening = Some(rx);
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
                    let rtp = &mut self.video_rtp;
                    rtp.ts_offset = rtp.ts_offset.wrapping_add(step);
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

/// A frame's RTP payloads, shared by every viewer.
static RTP_PAYLOADS: Encoding<Vec<Arc<[u8]>>> = Encoding::new("rtp payloads");

/// A frame's RTP payloads, per codec (built once per frame per node).
fn packetize(p: &Packet, config: &StreamConfig) -> Vec<Arc<[u8]>> {
    match p.frame.codec {
        Codec::H264 => {
            let (sps, pps) = config
                .video
                .as_ref()
                .and_then(|v| avc::parse_decoder_config(&v.record).ok())
                .map(|c| (c.sps.first().cloned(), c.pps.first().cloned()))
                .unwrap_or((None, None));
            h264::packetize(
                &p.frame.payload,
                sps.as_deref().unwrap_or(&[]),
                pps.as_deref().unwrap_or(&[]),
                RTP_MTU,
            )
        }
        Codec::Vp8 => vp8::packetize(&p.frame.payload, RTP_MTU),
        Codec::Opus => vec![Arc::from(&p.frame.payload[..])],
        Codec::Aac => vec![],
    }
}

/// Resends cover what a NACK can still save at live latency: the last second, at most
/// [`RTX_CACHE_PACKETS`] packets. (str0m's default, 1024 packets / 3 s per stream, was most of
/// a viewer's memory.) No cap on the resent share: the cap's byte history (an entry per
/// packet sent in the last second) cost ~20 KB per viewer, and resends are already bounded
/// by this cache.
///
/// Returns the SSRC of `mid`'s send stream, by which its packets are written (a hash
/// lookup; finding the stream by mid compares strings, ~2% of a viewer's CPU).
fn bound_rtx_cache(rtc: &mut Rtc, mid: Mid) -> Option<Ssrc> {
    let mut api = rtc.direct_api();
    let tx = api.stream_tx_by_mid(mid, None)?;
    tx.set_rtx_cache(RTX_CACHE_PACKETS, Duration::from_secs(1), None);
    Some(tx.ssrc())
}

/// Writes consecutive RTP payloads of a frame on `track`, numbered from `seq`; the marker
/// goes on the last one if `ends_frame`.
fn write_packets(
    rtc: &mut Rtc,
    track: TrackOut,
    seq: u64,
    time: u32,
    payloads: &[Arc<[u8]>],
    ends_frame: bool,
) {
    let mut api = rtc.direct_api();
    let Some(tx) = api.stream_tx(&track.ssrc) else {
        return;
    };
    let now = Instant::now();
    let last = payloads.len().saturating_sub(1);
    for (i, payload) in payloads.iter().enumerate() {
        tx.write_rtp(
            RtpWrite::new(
                track.pt,
                SeqNo::from(seq + i as u64),
                time,
                now,
                payload.clone(),
            )
            .marker(ends_frame && i == last)
            .nackable(track.nack),
        );
    }
}

/// Per-viewer RTP numbering: random starts, then continuous whatever the source does.
struct RtpState {
    seq: u64,
    ts_offset: u32,
    first_pts: Option<i64>,
}

impl RtpState {
    fn new() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        RtpState {
            seq: rng.random_range(0..30_000),
            ts_offset: rng.random(),
            first_pts: None,
        }
    }

    /// The RTP timestamp of a frame presented at `pts` (in the track's RTP clock): relative
    /// to the viewer's first frame, from a random base. B-frames before the first frame wrap
    /// correctly.
    fn timestamp(&mut self, pts: i64) -> u32 {
        let first = *self.first_pts.get_or_insert(pts);
        ((pts - first) as u32).wrapping_add(self.ts_offset)
    }
}

/// A negotiated outgoing track.
#[derive(Clone, Copy)]
struct TrackOut {
    /// The send stream's SSRC.
    ssrc: Ssrc,
    pt: str0m::media::Pt,
    /// Whether the viewer NACKs this payload (video; browsers and str0m do not NACK Opus):
    /// only then are its packets kept for resending.
    nack: bool,
}

impl TrackOut {
    fn new(ssrc: Ssrc, params: &str0m::format::PayloadParams) -> TrackOut {
        TrackOut {
            ssrc,
            pt: params.pt(),
            nack: params.fb_nack(),
        }
    }
}
