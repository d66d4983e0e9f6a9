//! Publishers and stamp-reading players for the [`synth`](super::synth) stream:
//!
//! * [`whip_publisher`]: frames packetized as RTP on a thread of their own, relayed by the
//!   project's str0m WHIP client (`meshcast::webrtc::client::publish_rtp`) on another;
//! * [`rtmp_publish`]: frames as FLV video tags over the project's RTMP client connection;
//! * [`rtmp_stamps`]: an RTMP player that reports each video frame's stamp and arrival.
//!
//! Every loop is bounded by a duration.

use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshcast::rtmp::client::{collect, ClientConn, PlayError};
use meshcast::webrtc::client::{publish_rtp, PublishStats, WhepClientError};
use rml_rtmp::sessions::{ClientSessionEvent, ClientSessionResult, PublishRequestType};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::synth::{read_stamp, Frame, Stamp, Synth};

/// The frame interval (30 frames/s).
pub const FRAME: Duration = Duration::from_nanos(33_333_333);

/// Calls `send` with frame 0, 1, ... every [`FRAME`] (on this thread) for `duration`.
pub fn paced_frames(synth: &Synth, duration: Duration, mut send: impl FnMut(&Frame)) {
    let start = Instant::now();
    let mut index = 0u64;
    while start.elapsed() < duration {
        let due = start + FRAME * index as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        send(&synth.frame(index));
        index += 1;
    }
}

/// Publishes the synthetic stream over WHIP to `path` on `http` for `duration`: a relay
/// thread (the str0m client) and a frame thread feeding it RTP over loopback UDP. The join
/// handle yields the relay's result.
pub fn whip_publisher(
    http: SocketAddr,
    path: &str,
    synth: Synth,
    duration: Duration,
) -> std::thread::JoinHandle<bool> {
    let video = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let audio = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = video.local_addr().unwrap();
    let relay = whip_relay(http, path, video, audio, duration + Duration::from_secs(1));
    std::thread::spawn(move || {
        // The relay drops packets until it is connected (a few ms on loopback).
        std::thread::sleep(Duration::from_millis(300));
        let out = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut seq = 0u16;
        paced_frames(&synth, duration, |frame| {
            for p in synth.rtp(frame, &mut seq) {
                let _ = out.send_to(&p, to);
            }
        });
        match relay.join() {
            Ok(Ok(s)) => s.connected && s.video_packets > 0,
            other => {
                eprintln!("WHIP publisher: {other:?}");
                false
            }
        }
    })
}

/// Runs the project's WHIP client on a thread of its own (so that nothing else in the
/// benchmark can delay the server's input), relaying the RTP that arrives on `video` and
/// `audio` to `path` on `http` for `duration`.
pub fn whip_relay(
    http: SocketAddr,
    path: &str,
    video: std::net::UdpSocket,
    audio: std::net::UdpSocket,
    duration: Duration,
) -> std::thread::JoinHandle<Result<PublishStats, WhepClientError>> {
    let path = path.to_string();
    std::thread::spawn(move || {
        current_thread().block_on(async move {
            video.set_nonblocking(true).unwrap();
            audio.set_nonblocking(true).unwrap();
            let video = tokio::net::UdpSocket::from_std(video).unwrap();
            let audio = tokio::net::UdpSocket::from_std(audio).unwrap();
            publish_rtp(http, &path, video, audio, duration).await
        })
    })
}

/// Publishes the synthetic stream to `live/<key>` over RTMP at `addr` for `duration` (frame
/// times from tokio's clock, stamps taken as each frame is made).
pub async fn rtmp_publish(
    addr: SocketAddr,
    key: &str,
    synth: &Synth,
    duration: Duration,
) -> Result<u64, PlayError> {
    let mut conn = ClientConn::connect(&addr.to_string(), "live", None, None).await?;
    let r = conn
        .session
        .request_publishing(key.to_string(), PublishRequestType::Live);
    conn.send(r).await?;
    conn.until(Vec::new(), |ev| match ev {
        ClientSessionEvent::PublishRequestAccepted => Some(Ok(())),
        _ => None,
    })
    .await?;
    let header = Bytes::from(synth.flv_sequence_header());
    let r = conn
        .session
        .publish_video_data(header, RtmpTimestamp::new(0), false);
    conn.send(r).await?;
    let start = tokio::time::Instant::now();
    let mut bytes = 0u64;
    let mut index = 0u64;
    while start.elapsed() < duration {
        tokio::time::sleep_until(start + FRAME * index as u32).await;
        let frame = synth.frame(index);
        let body = Bytes::from(synth.flv_frame(&frame));
        bytes += body.len() as u64;
        let ms = (index * 1000 / 30) as u32;
        let r = conn
            .session
            .publish_video_data(body, RtmpTimestamp::new(ms), false);
        conn.send(r).await?;
        index += 1;
    }
    Ok(bytes)
}

/// Plays `live/<key>` over RTMP from `addr` for `duration`, sending (stamp, arrival) for
/// each stamped video frame to `out`.
pub async fn rtmp_stamps(
    addr: SocketAddr,
    key: &str,
    duration: Duration,
    out: Sender<(Stamp, Instant)>,
) -> Result<(), PlayError> {
    let mut conn = ClientConn::connect(&addr.to_string(), "live", None, None).await?;
    let r = conn.session.request_playback(key.to_string());
    conn.send(r).await?;
    conn.until(Vec::new(), |ev| match ev {
        ClientSessionEvent::PlaybackRequestAccepted => Some(Ok(())),
        _ => None,
    })
    .await?;
    let deadline = tokio::time::Instant::now() + duration;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, conn.socket.read(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok(()),
            Ok(r) => r?,
        };
        let at = Instant::now();
        let results = conn.feed(&buf[..n])?;
        let mut reply = Vec::new();
        collect(&results, &mut reply);
        for r in results {
            if let ClientSessionResult::RaisedEvent(ClientSessionEvent::VideoDataReceived {
                data,
                ..
            }) = r
            {
                if let Some(stamp) = read_stamp(&data) {
                    let _ = out.send((stamp, at));
                }
            }
        }
        if !reply.is_empty() {
            conn.socket.write_all(&reply).await?;
        }
    }
}

pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
