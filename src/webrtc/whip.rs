//! A WHIP publisher: RTP in (str0m, RTP mode), frames out to the hub.
//!
//! H.264 is reassembled into access units ([`super::assemble`]), its in-band SPS/PPS become
//! the stream's decoder configuration; Opus packets pass through as frames. Both tracks are
//! put on one timeline by their first packets' arrival times. A keyframe is requested (PLI)
//! when a loss could not be repaired, and every [`KEYFRAME_INTERVAL`] so that the GOP cache
//! stays short and late joiners start at once: browsers send keyframes only when asked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use str0m::format::Codec as RtcCodec;
use str0m::media::Pt;
use str0m::media::{KeyframeRequestKind, MediaKind};
use str0m::rtp::{RtpPacket, Ssrc};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::assemble::{H264Assembler, Vp8Assembler};
use super::Datagram;
use crate::hub::{Packet, Publisher};
use crate::media::avc::decoder_config_record;
use crate::media::keyframe::{KeyframeRequestGate, KEYFRAME_REQUEST_INTERVAL};
use crate::media::{avc, AudioConfig, Codec, Frame, StreamConfig, Timebase, VideoConfig};

/// Keyframes are requested at least this often.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_secs(2);
/// A session that is not connected within this time is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Maps one track's RTP timestamps onto the session timeline.
struct TrackClock {
    rate: u32,
    last: Option<u32>,
    value: i64,
    offset: i64,
}

impl TrackClock {
    fn new(rate: u32) -> Self {
        TrackClock {
            rate,
            last: None,
            value: 0,
            offset: 0,
        }
    }

    /// The presentation time, in `rate` ticks since the session's first packet.
    fn pts(&mut self, rtp: u32, arrival: Instant, t0: Instant) -> i64 {
        match self.last {
            None => {
                self.value = 0;
                // The first packet is placed at its arrival time on the shared timeline.
                let since = arrival.saturating_duration_since(t0);
                self.offset = (since.as_secs_f64() * self.rate as f64) as i64;
            }
            Some(last) => self.value += rtp.wrapping_sub(last) as i32 as i64,
        }
        self.last = Some(rtp);
        self.value + self.offset
    }
}

pub(super) struct WhipPeer {
    pub rtc: Rtc,
    pub publisher: Publisher,
    pub socket: Arc<UdpSocket>,
    pub local_addr: SocketAddr,
}

struct Ingest {
    codecs: HashMap<Pt, RtcCodec>,
    video_ssrc: Option<Ssrc>,
    assembler: H264Assembler,
    vp8: Vp8Assembler,
    config: StreamConfig,
    sps_pps: Option<(Vec<u8>, Vec<u8>)>,
    t0: Option<Instant>,
    video_clock: TrackClock,
    audio_clock: TrackClock,
    last_keyframe_request: Option<Instant>,
    /// Viewers' requests, periodic requests and loss recovery, merged and spaced.
    gate: KeyframeRequestGate,
    frames: u64,
}

impl WhipPeer {
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Datagram>,
        cancel: CancellationToken,
    ) -> Result<&'static str, str0m::RtcError> {
        let started = Instant::now();
        let mut connected = false;
        let mut ingest = Ingest {
            codecs: HashMap::new(),
            video_ssrc: None,
            assembler: H264Assembler::new(),
            vp8: Vp8Assembler::new(),
            config: StreamConfig::default(),
            sps_pps: None,
            t0: None,
            video_clock: TrackClock::new(90_000),
            audio_clock: TrackClock::new(48_000),
            last_keyframe_request: None,
            gate: KeyframeRequestGate::new(KEYFRAME_REQUEST_INTERVAL),
            frames: 0,
        };
        let keyframe_signal = self.publisher.keyframe_signal();
        for p in self.rtc.codec_config().params() {
            ingest.codecs.insert(p.pt(), p.spec().codec);
        }
        loop {
            let timeout = loop {
                match self.rtc.poll_output()? {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        let _ = self.socket.try_send_to(&t.contents, t.destination);
                    }
                    Output::Event(ev) => match ev {
                        Event::Connected => {
                            info!("connected");
                            connected = true;
                        }
                        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                            self.rtc.disconnect();
                        }
                        Event::MediaAdded(m) => {
                            debug!(mid = %m.mid, kind = ?m.kind, "media added");
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
                            self.on_rtp(&mut ingest, p);
                        }
                        _ => {}
                    },
                }
            };
            if !self.rtc.is_alive() {
                return Ok("peer closed");
            }
            if !connected && started.elapsed() > CONNECT_TIMEOUT {
                return Ok("ICE did not connect in time");
            }
            self.maybe_request_keyframe(&mut ingest, false);
            let timeout = ingest
                .gate
                .poll_timeout()
                .map_or(timeout, |g| timeout.min(g));
            tokio::select! {
                _ = keyframe_signal.wanted() => {
                    self.maybe_request_keyframe(&mut ingest, true);
                }
                d = rx.recv() => {
                    let Some(d) = d else { return Ok("closed") };
                    super::receive(&mut self.rtc, self.local_addr, &d)?;
                }
                _ = tokio::time::sleep_until(timeout.into()) => {
                    self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
                _ = cancel.cancelled() => {
                    self.rtc.disconnect();
                    return Ok("deleted");
                }
            }
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
        ingest.video_ssrc = Some(p.header.ssrc);
        let (seq, time, marker) = (*p.seq_no, p.header.timestamp, p.header.marker);
        let frames = match codec {
            Codec::H264 => ingest
                .assembler
                .push(seq, time, marker, &p.payload, p.timestamp),
            _ => ingest.vp8.push(seq, time, marker, &p.payload, p.timestamp),
        };
        for f in frames {
            if f.keyframe {
                ingest.gate.keyframe_seen();
            }
            if let (Some(sps), Some(pps)) = (&f.sps, &f.pps) {
                if ingest.sps_pps.as_ref() != Some(&(sps.clone(), pps.clone())) {
                    self.configure_video(ingest, sps, pps);
                }
            }
            if let Some((width, height)) = f.size {
                self.configure_vp8(ingest, width, height);
            }
            if ingest.config.video.is_none() {
                continue; // no decoder configuration yet
            }
            let pts = ingest.video_clock.pts(f.rtp_time, p.timestamp, t0);
            ingest.frames += 1;
            self.publisher.push(Packet::new(Frame {
                codec,
                dts: pts,
                pts,
                timebase: Timebase(90_000),
                keyframe: f.keyframe,
                payload: Bytes::from(f.avcc),
            }));
        }
    }

    fn configure_vp8(&mut self, ingest: &mut Ingest, width: u32, height: u32) {
        let known = ingest
            .config
            .video
            .as_ref()
            .is_some_and(|v| (v.width, v.height) == (width, height));
        if known {
            return;
        }
        info!(width, height, "VP8 from the publisher");
        ingest.config.video = Some(VideoConfig {
            codec: Codec::Vp8,
            record: Bytes::new(),
            width,
            height,
        });
        self.publisher.set_config(ingest.config.clone());
    }

    fn on_opus(&mut self, ingest: &mut Ingest, p: &RtpPacket, t0: Instant) {
        if ingest.config.video.is_none() && ingest.video_ssrc.is_some() {
            return; // audio waits for video to be configured, so tracks start together
        }
        let pts = ingest.audio_clock.pts(p.header.timestamp, p.timestamp, t0);
        self.publisher.push(Packet::new(Frame {
            codec: Codec::Opus,
            dts: pts,
            pts,
            timebase: Timebase(48_000),
            keyframe: true,
            payload: Bytes::copy_from_slice(&p.payload),
        }));
    }

    fn configure_video(&mut self, ingest: &mut Ingest, sps: &[u8], pps: &[u8]) {
        let (width, height) = match avc::sps_picture_size(sps) {
            Ok(s) => s,
            Err(e) => {
                warn!("publisher sent an unreadable SPS: {e}");
                return;
            }
        };
        info!(width, height, "H.264 configuration from the publisher");
        ingest.sps_pps = Some((sps.to_vec(), pps.to_vec()));
        ingest.config.video = Some(VideoConfig {
            codec: Codec::H264,
            record: Bytes::from(decoder_config_record(sps, pps)),
            width,
            height,
        });
        self.publisher.set_config(ingest.config.clone());
    }

    /// PLI for viewers who asked, on unrepaired loss, and periodically to keep GOPs short;
    /// all through one gate, so the publisher gets at most one PLI per interval.
    fn maybe_request_keyframe(&mut self, ingest: &mut Ingest, viewer_asked: bool) {
        let Some(ssrc) = ingest.video_ssrc else {
            return;
        };
        let now = Instant::now();
        let due = ingest
            .last_keyframe_request
            .is_none_or(|t| now.duration_since(t) >= KEYFRAME_INTERVAL);
        let lost = ingest.assembler.take_keyframe_wanted() | ingest.vp8.take_keyframe_wanted();
        let send = if viewer_asked || due || lost {
            ingest.gate.request(now)
        } else {
            ingest.gate.poll(now)
        };
        if !send {
            return;
        }
        if let Some(rx) = self.rtc.direct_api().stream_rx(&ssrc) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            ingest.last_keyframe_request = Some(now);
        }
    }
}
