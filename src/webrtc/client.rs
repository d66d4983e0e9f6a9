//! Minimal str0m WebRTC peers for tests and load generation, many per process, each with its
//! own UDP socket on loopback:
//!
//! * a WHEP viewer ([`play`]): offers recvonly video and audio, POSTs the offer, then counts
//!   the RTP packets it receives and notes the H.264 picture sizes it is sent. Being str0m,
//!   it sends TWCC feedback, so the server can estimate its bandwidth;
//! * the same viewer answering a server's offer ([`answer`]), for servers such as Janus
//!   whose viewers receive the offer;
//! * a WHIP publisher that relays RTP it is sent ([`publish_rtp`]), e.g. by
//!   `ffmpeg -f rtp`: the same packets a plain RTP server (Janus's streaming plugin) is fed.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec as RtcCodec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

#[derive(Debug, thiserror::Error)]
pub enum WhepClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("webrtc: {0}")]
    Rtc(String),
    #[error("server answered {0}: {1}")]
    Http(u16, String),
}

fn rtc_err(e: impl std::fmt::Display) -> WhepClientError {
    WhepClientError::Rtc(e.to_string())
}

#[derive(Clone, Debug, Default)]
pub struct WhepStats {
    pub connected: bool,
    pub video_packets: u64,
    pub audio_packets: u64,
    pub bytes: u64,
    /// Time from POST to the first video packet.
    pub first_video: Option<Duration>,
    /// H.264 picture sizes from the SPS the server sent, each change once, in order.
    pub video_sizes: Vec<(u32, u32)>,
    /// The longest wait between two video packets (after the first).
    pub max_video_gap: Duration,
    /// Video packets whose RTP timestamp was before that of the packet before them in
    /// sequence order (resent and reordered packets are not counted).
    pub video_time_backwards: u64,
    /// The largest step forward of the video RTP timestamp between packets, in ms.
    pub max_video_time_step_ms: u64,
    /// Time from POST to the answer, and to the end of the DTLS handshake.
    pub answered: Option<Duration>,
    pub connected_after: Option<Duration>,
    /// Time from POST to the first packet of a keyframe (an SPS or IDR slice, alone, in a
    /// STAP-A or starting an FU-A), and when that packet arrived.
    pub first_keyframe: Option<Duration>,
    pub first_keyframe_at: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct PlayOptions {
    pub duration: Duration,
    /// Send to (and receive from) this address instead of the server's candidate: a relay
    /// in front of the server (e.g. one that limits bandwidth).
    pub via: Option<SocketAddr>,
    /// Also counts every RTP packet received here (shared by many viewers, read while they
    /// run: a load generator's measurement window).
    pub packets: Option<Arc<AtomicU64>>,
}

/// What a load generator watches while viewers run, shared by many viewers (none by default).
#[derive(Clone, Debug, Default)]
pub struct Observer {
    /// The longest wait between two video packets of any viewer, in µs (reset it to 0 to
    /// start a measurement window).
    pub max_video_gap_us: Option<Arc<AtomicU64>>,
    /// Each video packet carrying the RTP marker bit (the end of a frame): when it arrived
    /// and its payload's last [`FRAME_TAIL`] bytes.
    pub frame_ends: Option<std::sync::mpsc::Sender<FrameEnd>>,
}

/// How many bytes of a frame's end [`Observer::frame_ends`] reports.
pub const FRAME_TAIL: usize = 32;

#[derive(Clone, Debug)]
pub struct FrameEnd {
    pub at: Instant,
    pub tail: Vec<u8>,
}

/// Plays `path` (e.g. `/whep/live/demo`) from the node at `http` for `duration`.
pub async fn play(
    http: SocketAddr,
    path: &str,
    duration: Duration,
) -> Result<WhepStats, WhepClientError> {
    let opts = PlayOptions {
        duration,
        via: None,
        packets: None,
    };
    play_with(http, path, &opts).await
}

/// [`play`] with options.
pub async fn play_with(
    http: SocketAddr,
    path: &str,
    opts: &PlayOptions,
) -> Result<WhepStats, WhepClientError> {
    play_observed(http, path, opts, &Observer::default()).await
}

/// [`play_with`], reporting to `observer` as packets arrive.
pub async fn play_observed(
    http: SocketAddr,
    path: &str,
    opts: &PlayOptions,
    observer: &Observer,
) -> Result<WhepStats, WhepClientError> {
    let (socket, local) = bind(IpAddr::from([127, 0, 0, 1])).await?;
    let (mut rtc, offer, pending) = viewer_offer(local)?;
    let started = Instant::now();
    let answer = post_sdp(http, path, &offer.to_sdp_string()).await?;
    let answered = started.elapsed();
    let answer = SdpAnswer::from_sdp_string(&answer).map_err(rtc_err)?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(rtc_err)?;
    Viewer {
        rtc,
        socket,
        local,
        started,
        answered: Some(answered),
    }
    .run_observed(opts, observer)
    .await
}

/// Posts a viewer's offer to `path` and never connects (no ICE, no DTLS): a viewer the node
/// holds as joining until its connect timeout. Returns the answer.
pub async fn offer_only(http: SocketAddr, path: &str) -> Result<String, WhepClientError> {
    let (_socket, local) = bind(IpAddr::from([127, 0, 0, 1])).await?;
    post_sdp(http, path, &recvonly_offer(local)?).await
}

/// The SDP offer of a viewer on `local` that receives video and audio.
pub fn recvonly_offer(local: SocketAddr) -> Result<String, WhepClientError> {
    viewer_offer(local).map(|(_, offer, _)| offer.to_sdp_string())
}

/// A viewer's `Rtc` on `local` and its offer to receive video and audio.
fn viewer_offer(local: SocketAddr) -> Result<(Rtc, SdpOffer, SdpPendingOffer), WhepClientError> {
    let mut rtc = viewer_rtc(local)?;
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().ok_or_else(|| rtc_err("nothing to offer"))?;
    Ok((rtc, offer, pending))
}

/// A viewer whose offer/answer exchange is done; [`Viewer::run`] receives media.
pub struct Viewer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    started: Instant,
    answered: Option<Duration>,
}

/// Answers a server's offer (recvonly for what it sends) from a socket on `ip`; returns the
/// answer SDP to hand the server, and the viewer to run once it has it.
pub async fn answer(offer: &str, ip: IpAddr) -> Result<(String, Viewer), WhepClientError> {
    let (socket, local) = bind(ip).await?;
    let mut rtc = viewer_rtc(local)?;
    let offer = SdpOffer::from_sdp_string(offer).map_err(rtc_err)?;
    let answer = rtc.sdp_api().accept_offer(offer).map_err(rtc_err)?;
    let viewer = Viewer {
        rtc,
        socket,
        local,
        started: Instant::now(),
        answered: None,
    };
    Ok((answer.to_sdp_string(), viewer))
}

/// A viewer's `Rtc` (RTP mode, str0m's default codecs and extensions) with a host
/// candidate on `local`. All viewers of the process share one DTLS certificate: str0m would
/// generate one per `Rtc`, a cost a thousand joining load-generator viewers would pay
/// before their offers.
fn viewer_rtc(local: SocketAddr) -> Result<Rtc, WhepClientError> {
    static CERT: std::sync::OnceLock<Option<str0m::config::DtlsCert>> = std::sync::OnceLock::new();
    let mut builder = Rtc::builder();
    if let Some(cert) = CERT.get_or_init(super::dtls_certificate) {
        builder = builder.set_dtls_cert(cert.clone());
    }
    host_rtc(builder, local)
}

/// An RTP-mode `Rtc` from `builder` with a host candidate on `local`.
fn host_rtc(builder: str0m::RtcConfig, local: SocketAddr) -> Result<Rtc, WhepClientError> {
    let mut rtc = builder
        .set_rtp_mode(true)
        .set_crypto_provider(super::dtls::crypto_provider())
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(rtc_err)?);
    Ok(rtc)
}

impl Viewer {
    /// Receives for `opts.duration`, counting what arrives.
    pub async fn run(self, opts: &PlayOptions) -> Result<WhepStats, WhepClientError> {
        self.run_observed(opts, &Observer::default()).await
    }

    /// [`Viewer::run`], reporting to `observer`.
    pub async fn run_observed(
        mut self,
        opts: &PlayOptions,
        observer: &Observer,
    ) -> Result<WhepStats, WhepClientError> {
        let rtc = &mut self.rtc;
        // The server's address as str0m knows it, when talking through `opts.via`.
        let mut server = None;
        let mut stats = WhepStats {
            answered: self.answered,
            ..Default::default()
        };
        let mut last_video: Option<(Instant, u32, u64)> = None;
        let deadline = Instant::now() + opts.duration;
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = loop {
                match rtc.poll_output().map_err(rtc_err)? {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        server = Some(t.destination);
                        let to = opts.via.unwrap_or(t.destination);
                        let _ = self.socket.send_to(&t.contents, to).await;
                    }
                    Output::Event(Event::Connected) => {
                        stats.connected = true;
                        stats.connected_after = Some(self.started.elapsed());
                    }
                    Output::Event(Event::RtpPacket(p)) => {
                        if let Some(c) = &opts.packets {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        stats.bytes += p.payload.len() as u64;
                        // Video uses the 90 kHz clock, audio 48 kHz.
                        if p.time.frequency().get() == 90_000 {
                            let now = Instant::now();
                            let (ts, seq) = (p.header.timestamp, *p.seq_no);
                            // Time is checked in sequence order: a resent or reordered
                            // packet (older than the newest) is not a step back.
                            let newest = last_video.is_none_or(|(_, _, s)| seq > s);
                            if let (Some((at, last, _)), true) = (last_video, newest) {
                                stats.max_video_gap = stats.max_video_gap.max(now - at);
                                if let Some(max) = &observer.max_video_gap_us {
                                    max.fetch_max((now - at).as_micros() as u64, Ordering::Relaxed);
                                }
                                let step = ts.wrapping_sub(last) as i32;
                                if step < 0 {
                                    stats.video_time_backwards += 1;
                                } else {
                                    let ms = step as u64 / 90;
                                    stats.max_video_time_step_ms =
                                        stats.max_video_time_step_ms.max(ms);
                                }
                            }
                            if newest {
                                last_video = Some((now, ts, seq));
                            }
                            stats.video_packets += 1;
                            stats.first_video.get_or_insert(self.started.elapsed());
                            if stats.first_keyframe.is_none() && starts_keyframe(&p.payload) {
                                stats.first_keyframe = Some(now - self.started);
                                stats.first_keyframe_at = Some(now);
                            }
                            if let (Some(tx), true) = (&observer.frame_ends, p.header.marker) {
                                let tail = p.payload.len().saturating_sub(FRAME_TAIL);
                                let _ = tx.send(FrameEnd {
                                    at: now,
                                    tail: p.payload[tail..].to_vec(),
                                });
                            }
                            if let Some(size) = sps_size(&p.payload) {
                                if stats.video_sizes.last() != Some(&size) {
                                    stats.video_sizes.push(size);
                                }
                            }
                        } else {
                            stats.audio_packets += 1;
                        }
                    }
                    Output::Event(_) => {}
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(stats);
            }
            let wait = timeout.min(deadline).saturating_duration_since(now);
            match tokio::time::timeout(wait, self.socket.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) => {
                    let from = match (opts.via, server) {
                        (Some(via), Some(server)) if from == via => server,
                        _ => from,
                    };
                    if let Ok(r) = Receive::new(Protocol::Udp, from, self.local, &buf[..n]) {
                        rtc.handle_input(Input::Receive(Instant::now(), r))
                            .map_err(rtc_err)?;
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => rtc
                    .handle_input(Input::Timeout(Instant::now()))
                    .map_err(rtc_err)?,
            }
        }
    }
}

/// What a [`publish_rtp`] publisher sent.
#[derive(Clone, Debug, Default)]
pub struct PublishStats {
    pub connected: bool,
    pub video_packets: u64,
    pub audio_packets: u64,
    /// Keyframe requests (PLI/FIR) the server sent this publisher.
    pub keyframe_requests: u64,
}

/// Publishes over WHIP to `path` (e.g. `/whip/live/demo`) the RTP arriving on `video`
/// (H.264, packetization mode 1) and `audio` (Opus) for `duration`, packet for packet:
/// payloads, sequence numbers, timestamps and marker bits as received, on the negotiated
/// payload types. Packets arriving before the connection is up are dropped.
pub async fn publish_rtp(
    http: SocketAddr,
    path: &str,
    video: UdpSocket,
    audio: UdpSocket,
    duration: Duration,
) -> Result<PublishStats, WhepClientError> {
    let (socket, local) = bind(IpAddr::from([127, 0, 0, 1])).await?;
    let builder = Rtc::builder()
        .clear_codecs()
        .enable_h264(true)
        .enable_opus(true, false);
    let mut rtc = host_rtc(builder, local)?;
    let mut api = rtc.sdp_api();
    let video_mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let audio_mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, pending) = api.apply().ok_or_else(|| rtc_err("nothing to offer"))?;
    let answer = post_sdp(http, path, &offer.to_sdp_string()).await?;
    let answer = SdpAnswer::from_sdp_string(&answer).map_err(rtc_err)?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(rtc_err)?;
    let video_pt = super::negotiated(&rtc, video_mid, RtcCodec::H264)
        .ok_or_else(|| rtc_err("no H.264 (packetization mode 1) in the answer"))?
        .pt();
    let audio_pt = super::negotiated(&rtc, audio_mid, RtcCodec::Opus)
        .ok_or_else(|| rtc_err("no Opus in the answer"))?
        .pt();

    let mut stats = PublishStats::default();
    let mut tracks = [
        RelayTrack::new(video_mid, video_pt),
        RelayTrack::new(audio_mid, audio_pt),
    ];
    let deadline = Instant::now() + duration;
    let (mut buf, mut vbuf, mut abuf) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
    loop {
        let timeout = loop {
            match rtc.poll_output().map_err(rtc_err)? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Output::Event(Event::Connected) => stats.connected = true,
                Output::Event(Event::KeyframeRequest(_)) => stats.keyframe_requests += 1,
                Output::Event(_) => {}
            }
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(stats);
        }
        let wait = timeout.min(deadline).saturating_duration_since(now);
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = r?;
                if let Ok(r) = Receive::new(Protocol::Udp, from, local, &buf[..n]) {
                    rtc.handle_input(Input::Receive(Instant::now(), r)).map_err(rtc_err)?;
                }
            }
            r = video.recv(&mut vbuf) => {
                let n = r?;
                if stats.connected && tracks[0].relay(&mut rtc, &vbuf[..n]) {
                    stats.video_packets += 1;
                }
            }
            r = audio.recv(&mut abuf) => {
                let n = r?;
                if stats.connected && tracks[1].relay(&mut rtc, &abuf[..n]) {
                    stats.audio_packets += 1;
                }
            }
            _ = tokio::time::sleep(wait) => {
                rtc.handle_input(Input::Timeout(Instant::now())).map_err(rtc_err)?;
            }
        }
    }
}

/// One relayed RTP stream: its m-line, payload type and extended sequence number.
struct RelayTrack {
    mid: Mid,
    pt: str0m::media::Pt,
    seq: Option<u64>,
}

impl RelayTrack {
    fn new(mid: Mid, pt: str0m::media::Pt) -> Self {
        Self { mid, pt, seq: None }
    }

    /// Writes one received RTP packet; false if it is not RTP.
    fn relay(&mut self, rtc: &mut Rtc, packet: &[u8]) -> bool {
        let Some(rtp) = parse_rtp(packet) else {
            return false;
        };
        // Extend the 16-bit sequence number across wraps (and small reorderings); the
        // receiver's SRTP context starts at rollover count 0.
        let seq = match self.seq {
            None => u64::from(rtp.seq),
            Some(last) => {
                let delta = rtp.seq.wrapping_sub(last as u16) as i16;
                last.saturating_add_signed(i64::from(delta))
            }
        };
        self.seq = Some(self.seq.map_or(seq, |last| last.max(seq)));
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(self.mid, None) else {
            return false;
        };
        tx.write_rtp(
            RtpWrite::new(
                self.pt,
                SeqNo::from(seq),
                rtp.timestamp,
                Instant::now(),
                rtp.payload,
            )
            .marker(rtp.marker)
            .nackable(true),
        );
        true
    }
}

struct RtpView<'a> {
    marker: bool,
    seq: u16,
    timestamp: u32,
    payload: &'a [u8],
}

/// The fields of an RTP packet (RFC 3550 §5.1) a relay needs; None if it is not RTP v2.
fn parse_rtp(p: &[u8]) -> Option<RtpView<'_>> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return None;
    }
    let csrcs = usize::from(p[0] & 0x0f) * 4;
    let mut start = 12 + csrcs;
    if p[0] & 0x10 != 0 {
        let words = u16::from_be_bytes([*p.get(start + 2)?, *p.get(start + 3)?]);
        start += 4 + usize::from(words) * 4;
    }
    let mut end = p.len();
    if p[0] & 0x20 != 0 {
        end = end.checked_sub(usize::from(*p.last()?))?;
    }
    Some(RtpView {
        marker: p[1] & 0x80 != 0,
        seq: u16::from_be_bytes([p[2], p[3]]),
        timestamp: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        payload: p.get(start..end)?,
    })
}

async fn bind(ip: IpAddr) -> Result<(UdpSocket, SocketAddr), WhepClientError> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
    let local = socket.local_addr()?;
    Ok((socket, local))
}

/// Whether an H.264 RTP payload starts a keyframe: an SPS or IDR slice, alone, in a
/// STAP-A, or in the first fragment of an FU-A.
fn starts_keyframe(payload: &[u8]) -> bool {
    let starts = |nal_type: u8| nal_type == 5 || nal_type == 7;
    match payload.first().map(|b| b & 0x1f) {
        Some(24) => {
            super::h264::stap_a_nalus(payload).any(|n| n.first().is_some_and(|b| starts(b & 0x1f)))
        }
        Some(28) => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && starts(fu & 0x1f)),
        Some(t) => starts(t),
        None => false,
    }
}

/// The picture size in an H.264 RTP payload carrying an SPS (alone or in a STAP-A).
fn sps_size(payload: &[u8]) -> Option<(u32, u32)> {
    let is_sps = |n: &&[u8]| n.first().is_some_and(|b| b & 0x1f == 7);
    let sps = match payload.first()? & 0x1f {
        7 => payload,
        24 => super::h264::stap_a_nalus(payload).find(is_sps)?,
        _ => return None,
    };
    crate::media::avc::sps_picture_size(sps).ok()
}

/// How long a WHEP/WHIP server may take to answer an offer.
const SDP_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// POSTs an SDP offer over HTTP/1.1; returns the answer.
async fn post_sdp(http: SocketAddr, path: &str, sdp: &str) -> Result<String, WhepClientError> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sdp}",
        sdp.len()
    );
    // A server that never answers is an error, not a client waiting forever.
    let exchange = async {
        let mut s = TcpStream::connect(http).await?;
        s.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        Ok::<_, std::io::Error>(resp)
    };
    let resp = tokio::time::timeout(SDP_EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to the offer within {SDP_EXCHANGE_TIMEOUT:?}"),
            )
        })??;
    let text = String::from_utf8_lossy(&resp);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    if status != 201 {
        return Err(WhepClientError::Http(status, body));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rtp_with_csrcs_extension_and_padding() {
        let mut p = vec![0xb1, 0xe0, 0x12, 0x34, 0, 0, 0x10, 0, 1, 2, 3, 4];
        p.extend_from_slice(&[9, 9, 9, 9]); // one CSRC
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0xff, 0, 0]); // one extension word
        p.extend_from_slice(b"payload");
        p.extend_from_slice(&[0, 0, 3]); // three bytes of padding
        let rtp = parse_rtp(&p).unwrap();
        assert!(rtp.marker);
        assert_eq!(rtp.seq, 0x1234);
        assert_eq!(rtp.timestamp, 0x1000);
        assert_eq!(rtp.payload, b"payload");
        assert!(parse_rtp(&p[..11]).is_none());
        assert!(parse_rtp(&[0x40; 20]).is_none(), "RTP version 1");
    }
}
