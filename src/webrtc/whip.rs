//! A WHIP publisher: RTP in (str0m, RTP mode), frames out to the hub.
//!
//! H.264 is reassembled into access units ([`super::assemble`]), its in-band SPS/PPS become
//! the stream's decoder configuration; Opus packets pass through as frames. All tracks are
//! put on one timeline by their first packets' arrival times. A keyframe is requested (PLI)
//! when a loss could not be repaired, and every [`KEYFRAME_INTERVAL`] so that the GOP cache
//! stays short and late joiners start at once: browsers send keyframes only when asked.
//!
//! **Simulcast.** Each encoding (rid) of a simulcast publisher is published as its own stream
//! ([`StreamKey::layer`](crate::media::StreamKey::layer)), video only, so each is cached,
//! relayed over the backbone and requested keyframes for on its own. The stream itself
//! carries the largest layer's video (for RTMP, FLV, egress) and the audio, and lists the
//! layers in its configuration, which is how WHEP viewers anywhere find them. Which layer
//! that is, and when, [`super::primary`] decides.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use str0m::format::Codec as RtcCodec;
use str0m::media::Pt;
use str0m::media::{KeyframeRequestKind, MediaKind};
use str0m::rtp::rtcp::SenderInfo;
use str0m::rtp::{RtpPacket, Ssrc};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::assemble::{H264Assembler, Vp8Assembler};
use super::io::Io;
use super::primary::{EncodingInfo, PrimaryChoice};
use super::sessions::{Registered, SessionEnd, PUBLISHER_CONNECT_TIMEOUT};
use super::track_clock::TrackClock;
use crate::hub::Publisher;
use crate::media::avc::decoder_config_record;
use crate::media::keyframe::{KeyframeRequestGate, KEYFRAME_REQUEST_INTERVAL};
use crate::media::Packet;
use crate::media::{
    avc, valid_rid, AudioConfig, Codec, Frame, SimulcastLayer, StreamConfig, Timebase, VideoConfig,
};
use crate::metrics::{IngestCounters, Proto, Seat};

/// Keyframes are requested at least this often.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_secs(2);
/// Encodings taken from one publisher; more are ignored.
const MAX_ENCODINGS: usize = 4;

/// The largest correction sender reports may make to a layer's clock (90 kHz ticks, 5 s).
const MAX_LAYER_SHIFT: i64 = 5 * 90_000;

pub(super) struct WhipPeer {
    rtc: Box<Rtc>,
    publisher: Publisher,
    io: Arc<Io>,
    local_addr: SocketAddr,
    connected: bool,
    /// The `webrtc` series this publisher counts in.
    counters: IngestCounters,
    /// This publisher in the `publishers` gauge, from its offer's answer to its end.
    _seat: Seat,
}

/// One incoming video encoding: the only one, or one simulcast layer.
struct VideoIn {
    ssrc: Ssrc,
    /// The simulcast layer's id (None without simulcast).
    rid: Option<String>,
    assembler: H264Assembler,
    vp8: Vp8Assembler,
    clock: TrackClock,
    sps_pps: Option<(Vec<u8>, Vec<u8>)>,
    config: Option<VideoConfig>,
    /// The layer's own stream (simulcast only).
    layer: Option<Publisher>,
    /// Viewers' requests, periodic requests and loss recovery, merged and spaced.
    gate: KeyframeRequestGate,
    last_keyframe_request: Option<Instant>,
    /// The publisher's last sender report for this encoding: (NTP time, RTP timestamp).
    sender_report: Option<(SystemTime, u32)>,
    /// Whether this layer's clock was aligned with the first layer's by sender reports.
    aligned: bool,
    /// After an alignment moved this layer's clock back: frames wait until they pass this
    /// time (so time never runs backwards), then, if any was held back, for a keyframe to
    /// restart the pictures (whether one was held back is the flag).
    resync_after: Option<(i64, bool)>,
}

struct Ingest {
    codecs: HashMap<Pt, RtcCodec>,
    videos: Vec<VideoIn>,
    /// Which encoding's video the stream itself carries.
    primary: PrimaryChoice,
    config: StreamConfig,
    t0: Option<Instant>,
    audio_clock: TrackClock,
    /// Keyframe requests from the consumers of each layer stream (index into `videos`).
    layer_requests: mpsc::Receiver<usize>,
    layer_requests_tx: mpsc::Sender<usize>,
    /// Forward each layer stream's keyframe requests to `layer_requests`; aborted on drop.
    forwarders: JoinSet<()>,
}

impl WhipPeer {
    /// A publisher feeding `publisher`, whose negotiated `rtc` talks through `io`.
    pub(super) fn new(
        rtc: Rtc,
        publisher: Publisher,
        io: Arc<Io>,
        local_addr: SocketAddr,
    ) -> WhipPeer {
        let counters = publisher.metrics().publisher_counters(Proto::WebRtc);
        WhipPeer {
            _seat: Seat::take(&counters.publishers),
            rtc: Box::new(rtc),
            publisher,
            io,
            local_addr,
            connected: false,
            counters,
        }
    }

    pub async fn run(mut self, session: Registered) -> SessionEnd {
        let Registered {
            mut datagrams,
            cancel,
            ..
        } = session;
        let started = Instant::now();
        let (layer_requests_tx, layer_requests) = mpsc::channel(16);
        let mut ingest = Ingest {
            codecs: HashMap::new(),
            videos: Vec::new(),
            primary: PrimaryChoice::default(),
            config: StreamConfig::default(),
            t0: None,
            audio_clock: TrackClock::new(48_000),
            layer_requests,
            layer_requests_tx,
            forwarders: JoinSet::new(),
        };
        let keyframe_signal = self.publisher.keyframe_signal();
        let evicted = self.publisher.evicted();
        tokio::pin!(evicted);
        for p in self.rtc.codec_config().params() {
            ingest.codecs.insert(p.pt(), p.spec().codec);
        }
        loop {
            let timeout = loop {
                match self.rtc.poll_output()? {
                    Output::Timeout(t) => {
                        self.io.flush();
                        break t;
                    }
                    Output::Transmit(t) => self.io.transmit(&t),
                    Output::Event(ev) => self.on_event(&mut ingest, ev),
                }
            };
            if !self.rtc.is_alive() {
                return Ok("peer closed");
            }
            if !self.connected && started.elapsed() > PUBLISHER_CONNECT_TIMEOUT {
                return Ok("ICE did not connect in time");
            }
            for i in 0..ingest.videos.len() {
                self.maybe_request_keyframe(&mut ingest, i, false);
            }
            let timeout = ingest
                .videos
                .iter()
                .filter_map(|v| v.gate.poll_timeout())
                .fold(timeout, Instant::min);
            tokio::select! {
                _ = keyframe_signal.wanted() => {
                    if let Some(i) = ingest.primary.primary() {
                        self.maybe_request_keyframe(&mut ingest, i, true);
                    }
                }
                Some(i) = ingest.layer_requests.recv() => {
                    self.maybe_request_keyframe(&mut ingest, i, true);
                }
                d = datagrams.recv() => {
                    let Some(d) = d else { return Ok("closed") };
                    self.counters.bytes_in.inc_by(d.len() as u64);
                    d.feed(&mut self.rtc, self.local_addr)?;
                }
                _ = tokio::time::sleep_until(timeout.into()) => {
                    self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
                _ = cancel.cancelled() => {
                    self.rtc.disconnect();
                    return Ok("deleted");
                }
                reason = &mut evicted => {
                    warn!("publisher evicted: {reason}");
                    self.rtc.disconnect();
                    return Ok("evicted: the stream name belongs to another origin");
                }
            }
        }
    }

    /// Handles one of str0m's events.
    fn on_event(&mut self, ingest: &mut Ingest, ev: Event) {
        match ev {
            Event::Connected => {
                info!("connected");
                self.connected = true;
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.rtc.disconnect();
            }
            Event::MediaAdded(m) => {
                debug!(mid = %m.mid, kind = ?m.kind, simulcast = ?m.simulcast, "media added");
                if m.kind == MediaKind::Video {
                    if let Some(s) = &m.simulcast {
                        let rids: Vec<String> = s.recv.iter().map(|l| l.rid.to_string()).collect();
                        info!(?rids, "simulcast publisher");
                        ingest.primary.announced(rids);
                    }
                }
                if m.kind == MediaKind::Audio {
                    ingest.config.audio = Some(AudioConfig {
                        codec: Codec::Opus,
                        specific: Bytes::new(),
                        sample_rate: 48_000,
                        channels: 2,
                    });
                    self.publisher.set_config(ingest.config.clone());
                }
            }
            Event::RtpPacket(p) => {
                self.counters.packets_in.inc();
                self.on_rtp(ingest, p);
            }
            Event::SenderFeedback(f) => on_sender_report(ingest, &f.sender_info),
            _ => {}
        }
    }

    fn on_rtp(&mut self, ingest: &mut Ingest, p: RtpPacket) {
        let t0 = *ingest.t0.get_or_insert(p.timestamp);
        let codec = match ingest.codecs.get(&p.header.payload_type) {
            Some(RtcCodec::H264) => Codec::H264,
            Some(RtcCodec::Vp8) => Codec::Vp8,
            Some(RtcCodec::Opus) => Codec::Opus,
            other => {
                debug!(pt = ?p.header.payload_type, codec = ?other, "RTP with an unsupported payload dropped");
                return;
            }
        };
        if codec == Codec::Opus {
            self.on_opus(ingest, &p, t0);
            return;
        }
        let Some(idx) = self.video_in(ingest, p.header.ssrc) else {
            return;
        };
        let (seq, time, marker) = (*p.seq_no, p.header.timestamp, p.header.marker);
        let video = &mut ingest.videos[idx];
        let frames = match codec {
            Codec::H264 => video
                .assembler
                .push(seq, time, marker, &p.payload, p.timestamp),
            _ => video.vp8.push(seq, time, marker, &p.payload, p.timestamp),
        };
        for f in frames {
            let video = &mut ingest.videos[idx];
            if f.keyframe {
                debug!(rid = ?video.rid, "keyframe from the publisher");
                video.gate.keyframe_seen();
            }
            let mut changed = false;
            if let (Some(sps), Some(pps)) = (&f.sps, &f.pps) {
                let known = video
                    .sps_pps
                    .as_ref()
                    .is_some_and(|(s, p)| s == sps && p == pps);
                if !known {
                    changed |= configure_h264(video, sps, pps);
                }
            }
            if let Some((width, height)) = f.size {
                changed |= configure_vp8(video, width, height);
            }
            if changed {
                self.layer_configured(ingest, idx);
            }
            let video = &mut ingest.videos[idx];
            let Some(codec) = video.config.as_ref().map(|c| c.codec) else {
                continue; // no decoder configuration yet
            };
            let pts = video.clock.pts(f.rtp_time, p.timestamp, t0);
            if let Some((floor, dropped)) = video.resync_after {
                if pts <= floor {
                    video.resync_after = Some((floor, true));
                    if !dropped {
                        self.maybe_request_keyframe(ingest, idx, true);
                    }
                    continue;
                }
                if dropped && !f.keyframe {
                    continue;
                }
                debug!(rid = ?video.rid, dropped, "layer time runs on after its clock moved back");
                video.resync_after = None;
            }
            let packet = Packet::new(Frame {
                codec,
                dts: pts,
                pts,
                timebase: Timebase(90_000),
                keyframe: f.keyframe,
                payload: Bytes::from(f.avcc),
            });
            self.counters.frames_in.inc();
            if let Some(layer) = &mut video.layer {
                layer.push(packet.clone());
            }
            if f.keyframe {
                self.maybe_promote(ingest, idx);
            }
            if ingest.primary.primary() == Some(idx) {
                self.publisher.push(packet);
            }
        }
    }

    /// The encoding `ssrc` belongs to, created on its first packet.
    fn video_in(&mut self, ingest: &mut Ingest, ssrc: Ssrc) -> Option<usize> {
        if let Some(i) = ingest.videos.iter().position(|v| v.ssrc == ssrc) {
            return Some(i);
        }
        if ingest.videos.len() >= MAX_ENCODINGS {
            return None;
        }
        let rid = if !ingest.primary.is_simulcast() {
            None
        } else {
            // str0m learned the layer from the rid header extension of the first packets.
            let rid = self.rtc.direct_api().stream_rx(&ssrc)?.rid()?.to_string();
            if !valid_rid(&rid) {
                warn!(
                    rid,
                    "simulcast layer id not usable in a stream name; layer ignored"
                );
                return None;
            }
            Some(rid)
        };
        let layer = match &rid {
            Some(rid) => match self.publisher.publish_layer(rid) {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!("simulcast layer {rid}: {e}");
                    return None;
                }
            },
            None => None,
        };
        let idx = ingest.videos.len();
        if let Some(layer) = &layer {
            let signal = layer.keyframe_signal();
            let tx = ingest.layer_requests_tx.clone();
            ingest.forwarders.spawn(async move {
                loop {
                    signal.wanted().await;
                    if tx.send(idx).await.is_err() {
                        return;
                    }
                }
            });
        }
        debug!(?ssrc, ?rid, "video encoding");
        ingest.videos.push(VideoIn {
            ssrc,
            rid,
            assembler: H264Assembler::new(),
            vp8: Vp8Assembler::new(),
            clock: TrackClock::new(90_000),
            sps_pps: None,
            config: None,
            layer,
            gate: KeyframeRequestGate::new(KEYFRAME_REQUEST_INTERVAL),
            last_keyframe_request: None,
            sender_report: None,
            aligned: false,
            resync_after: None,
        });
        ingest.primary.encoding_added(idx);
        Some(idx)
    }

    /// An encoding has a (new) decoder configuration: its layer stream and the stream's
    /// layer list follow.
    fn layer_configured(&mut self, ingest: &mut Ingest, idx: usize) {
        let video = &mut ingest.videos[idx];
        if let (Some(layer), Some(config)) = (&mut video.layer, &video.config) {
            layer.set_config(StreamConfig {
                video: Some(config.clone()),
                ..Default::default()
            });
            layer.set_derived_live();
        }
        if video.layer.is_some() {
            ingest.primary.layer_configured(Instant::now());
            let mut layers: Vec<SimulcastLayer> = ingest
                .videos
                .iter()
                .filter_map(|v| {
                    let c = v.config.as_ref()?;
                    Some(SimulcastLayer {
                        rid: v.rid.clone()?,
                        width: c.width,
                        height: c.height,
                    })
                })
                .collect();
            layers.sort_by_key(|l| (l.pixels(), l.rid.clone()));
            ingest.config.simulcast = layers;
        }
        if ingest.primary.primary() == Some(idx) {
            ingest.config.video = ingest.videos[idx].config.clone();
        }
        if ingest.config.video.is_some() {
            self.publisher.set_config(ingest.config.clone());
        }
    }

    /// At a keyframe of encoding `idx`: makes it the stream's video if the choice says so.
    fn maybe_promote(&mut self, ingest: &mut Ingest, idx: usize) {
        let encodings: Vec<EncodingInfo> = ingest
            .videos
            .iter()
            .map(|v| EncodingInfo {
                rid: v.rid.as_deref(),
                pixels: v.config.as_ref().map(|c| c.width as u64 * c.height as u64),
            })
            .collect();
        if !ingest.primary.keyframe(Instant::now(), idx, &encodings) {
            return;
        }
        info!(rid = ?ingest.videos[idx].rid, "simulcast layer carries the stream's video");
        ingest.config.video = ingest.videos[idx].config.clone();
        self.publisher.set_config(ingest.config.clone());
    }

    fn on_opus(&mut self, ingest: &mut Ingest, p: &RtpPacket, t0: Instant) {
        if ingest.config.video.is_none() && !ingest.videos.is_empty() {
            return; // audio waits for video to be configured, so tracks start together
        }
        let pts = ingest.audio_clock.pts(p.header.timestamp, p.timestamp, t0);
        if let Some(level) = p.header.ext_vals.audio_level {
            // str0m gives -dBov as 0..=-127 (0 loudest).
            self.publisher
                .note_audio_level((-(level as i16)).clamp(0, 127) as u8);
        }
        self.counters.frames_in.inc();
        self.publisher.push(Packet::new(Frame {
            codec: Codec::Opus,
            dts: pts,
            pts,
            timebase: Timebase(48_000),
            keyframe: true,
            payload: Bytes::copy_from_slice(&p.payload),
        }));
    }

    /// PLI for viewers who asked, on unrepaired loss, and periodically to keep GOPs short;
    /// all through the encoding's gate, so it gets at most one PLI per interval.
    /// `asked`: a consumer asked, or the ingest needs one (see `VideoIn::resync_after`).
    fn maybe_request_keyframe(&mut self, ingest: &mut Ingest, idx: usize, asked: bool) {
        let Some(video) = ingest.videos.get_mut(idx) else {
            return;
        };
        let now = Instant::now();
        let due = video
            .last_keyframe_request
            .is_none_or(|t| now.duration_since(t) >= KEYFRAME_INTERVAL);
        let lost = video.assembler.take_keyframe_wanted() | video.vp8.take_keyframe_wanted();
        let send = if asked || due || lost {
            video.gate.request(now)
        } else {
            video.gate.poll(now)
        };
        if !send {
            return;
        }
        if let Some(rx) = self.rtc.direct_api().stream_rx(&video.ssrc) {
            debug!(rid = ?video.rid, asked, due, lost, "PLI to the publisher");
            rx.request_keyframe(KeyframeRequestKind::Pli);
            video.last_keyframe_request = Some(now);
            self.publisher
                .metrics()
                .keyframe_requests_to_publisher
                .inc();
        }
    }
}

/// Keeps an encoding's sender report, and aligns the simulcast layers' clocks with the
/// first layer's once both have reports (once per layer; see [`TrackClock::shift_to`]).
fn on_sender_report(ingest: &mut Ingest, info: &SenderInfo) {
    let Some(video) = ingest.videos.iter_mut().find(|v| v.ssrc == info.ssrc) else {
        return;
    };
    video.sender_report = Some((info.ntp_time, info.rtp_time.numer() as u32));
    // The reference: the first layer whose clock runs.
    let Some(r) = ingest.videos.iter().position(|v| v.clock.started()) else {
        return;
    };
    let Some(ref_sr) = ingest.videos[r].sender_report else {
        return;
    };
    for i in 0..ingest.videos.len() {
        let v = &ingest.videos[i];
        if i == r || v.aligned || !v.clock.started() {
            continue;
        }
        let Some(sr) = v.sender_report else { continue };
        let Some(shift) = v.clock.shift_to(sr, &ingest.videos[r].clock, ref_sr) else {
            continue;
        };
        let v = &mut ingest.videos[i];
        v.aligned = true;
        if shift.abs() > MAX_LAYER_SHIFT {
            warn!(rid = ?v.rid, shift_ms = shift / 90, "sender reports disagree with arrival times; layer clock left as it is");
            continue;
        }
        if shift < 0 {
            // Time must not run backwards on this layer's stream.
            v.resync_after = v.clock.last_pts().map(|last| (last, false));
        }
        v.clock.shift(shift);
        info!(rid = ?v.rid, shift_ms = shift / 90, "simulcast layer clock aligned by sender reports");
    }
}

/// Takes an H.264 encoding's parameter sets; true if its configuration changed.
fn configure_h264(video: &mut VideoIn, sps: &[u8], pps: &[u8]) -> bool {
    let (width, height) = match avc::sps_picture_size(sps) {
        Ok(s) => s,
        Err(e) => {
            warn!("publisher sent an unreadable SPS: {e}");
            return false;
        }
    };
    info!(width, height, rid = ?video.rid, "H.264 configuration from the publisher");
    video.sps_pps = Some((sps.to_vec(), pps.to_vec()));
    video.config = Some(VideoConfig {
        codec: Codec::H264,
        record: Bytes::from(decoder_config_record(sps, pps)),
        width,
        height,
    });
    true
}

/// Takes a VP8 encoding's picture size; true if its configuration changed.
fn configure_vp8(video: &mut VideoIn, width: u32, height: u32) -> bool {
    let known = video
        .config
        .as_ref()
        .is_some_and(|v| (v.width, v.height) == (width, height));
    if known {
        return false;
    }
    info!(width, height, rid = ?video.rid, "VP8 from the publisher");
    video.config = Some(VideoConfig {
        codec: Codec::Vp8,
        record: Bytes::new(),
        width,
        height,
    });
    true
}
