//! A minimal WHEP viewer on str0m, for tests and load generation: offers recvonly video and
//! audio, POSTs the offer, then counts the RTP packets it receives and notes the H.264
//! picture sizes it is sent. Many can run in one process, each with its own UDP socket on
//! loopback. Being str0m, it sends TWCC feedback, so the server can estimate its bandwidth.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
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
}

#[derive(Clone, Debug)]
pub struct PlayOptions {
    pub duration: Duration,
    /// Send to (and receive from) this address instead of the server's candidate: a relay
    /// in front of the server (e.g. one that limits bandwidth).
    pub via: Option<SocketAddr>,
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
    };
    play_with(http, path, &opts).await
}

/// [`play`] with options.
pub async fn play_with(
    http: SocketAddr,
    path: &str,
    opts: &PlayOptions,
) -> Result<WhepStats, WhepClientError> {
    let duration = opts.duration;
    // The server's address as str0m knows it, when talking through `opts.via`.
    let mut server = None;
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;
    let mut rtc = Rtc::builder().set_rtp_mode(true).build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(rtc_err)?);
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let (offer, pending): (_, SdpPendingOffer) =
        api.apply().ok_or_else(|| rtc_err("nothing to offer"))?;
    let started = Instant::now();
    let answer = post_sdp(http, path, &offer.to_sdp_string()).await?;
    let answer = SdpAnswer::from_sdp_string(&answer).map_err(rtc_err)?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(rtc_err)?;

    let mut stats = WhepStats::default();
    let deadline = Instant::now() + duration;
    let mut buf = vec![0u8; 2048];
    loop {
        let timeout = loop {
            match rtc.poll_output().map_err(rtc_err)? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    server = Some(t.destination);
                    let to = opts.via.unwrap_or(t.destination);
                    let _ = socket.send_to(&t.contents, to).await;
                }
                Output::Event(Event::Connected) => stats.connected = true,
                Output::Event(Event::RtpPacket(p)) => {
                    stats.bytes += p.payload.len() as u64;
                    // Video uses the 90 kHz clock, audio 48 kHz.
                    if p.time.frequency().get() == 90_000 {
                        stats.video_packets += 1;
                        stats.first_video.get_or_insert(started.elapsed());
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
        match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                let from = match (opts.via, server) {
                    (Some(via), Some(server)) if from == via => server,
                    _ => from,
                };
                if let Ok(r) = Receive::new(Protocol::Udp, from, local, &buf[..n]) {
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

/// POSTs an SDP offer over HTTP/1.1; returns the answer.
async fn post_sdp(http: SocketAddr, path: &str, sdp: &str) -> Result<String, WhepClientError> {
    let mut s = TcpStream::connect(http).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sdp}",
        sdp.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
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
