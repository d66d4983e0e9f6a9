//! The RTMP push sink: publishes a stream to another RTMP server (a CDN ingest, nginx-rtmp,
//! another meshcast) with rml_rtmp's client session.
//!
//! Frames are remuxed: the FLV tag bodies built once per frame on this node are sent as
//! they are (only timestamps change). The sink keeps reading what the server sends
//! (acknowledgements, pings, status) while it writes, and every write has a deadline, so a
//! destination that stops reading fails this sink alone; the egress task restarts it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::sessions::{
    ClientSessionEvent, ClientSessionResult, PublishRequestType, StreamMetadata,
};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::policy::DestinationPolicy;
use super::spec::RtmpUrl;
use super::{Item, SharedStatus, SinkError, State};
use crate::media::{flv, Codec, StreamConfig, TrackKind};
use crate::rtmp::client::{collect, ClientConn, PlayError};

/// Connecting, handshaking and being allowed to publish must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A new publish on the same connection (a new segment) must be accepted within this.
const REPUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// The unpublish at the end gets this long to be written before the connection closes.
const UNPUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// One write to the destination blocking this long fails the sink.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Items written per batch at most.
const BATCH: usize = 64;

/// Publishes what arrives on `rx` to `url` until `rx` closes (clean unpublish) or the
/// destination fails (the error).
pub async fn run(
    url: RtmpUrl,
    policy: Option<Arc<DestinationPolicy>>,
    mut rx: mpsc::Receiver<Item>,
    shared: Arc<SharedStatus>,
) -> Result<(), SinkError> {
    shared.set_state(State::Connecting);
    // Under a policy, dial exactly the address it checked (no second lookup to rebind).
    let addr = match &policy {
        Some(p) => p
            .resolve(&url.host, url.port)
            .await
            .map_err(|reason| SinkError::Refused {
                destination: url.redacted(),
                reason,
            })?
            .to_string(),
        None => format!("{}:{}", url.host, url.port),
    };
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, connect(&addr, &url))
        .await
        .map_err(|_| SinkError::ConnectTimeout {
            destination: url.redacted(),
            timeout: CONNECT_TIMEOUT,
        })?
        .map_err(|source| SinkError::Connect {
            destination: url.redacted(),
            source,
        })?;
    info!(destination = %url.redacted(), "publishing");
    shared.set_state(State::Live);
    let mut last_ts = 0u32;
    let mut buf = vec![0u8; 16 * 1024];
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    // The egress ended: unpublish cleanly.
                    let r = conn.session.stop_publishing().map_err(SinkError::session)?;
                    let mut out = Vec::new();
                    collect(&r, &mut out);
                    let _ = tokio::time::timeout(UNPUBLISH_TIMEOUT, conn.socket.write_all(&out)).await;
                    let _ = conn.socket.shutdown().await;
                    return Ok(());
                }
                let mut out = Vec::new();
                let mut frames = 0;
                for item in batch.drain(..) {
                    match item {
                        Item::Config(c) => encode_config(&mut conn, &c, last_ts, &mut out)?,
                        Item::Frame { packet, dts_ms, .. } => {
                            if !packet.frame.codec.fits_flv() {
                                continue;
                            }
                            let ts = RtmpTimestamp::new(dts_ms as u32);
                            last_ts = dts_ms as u32;
                            let body = crate::media::flv::body_of(&packet).clone();
                            let r = match packet.frame.track() {
                                TrackKind::Video => conn.session.publish_video_data(body, ts, false),
                                TrackKind::Audio => conn.session.publish_audio_data(body, ts, false),
                            };
                            collect(std::slice::from_ref(&r.map_err(SinkError::session)?), &mut out);
                            frames += 1;
                        }
                        Item::NewSegment => {
                            write(&mut conn, &out).await?;
                            out.clear();
                            republish(&mut conn, &url).await?;
                        }
                    }
                }
                write(&mut conn, &out).await?;
                shared.sent(out.len() as u64, frames);
            }
            n = conn.socket.read(&mut buf) => {
                let n = n.map_err(SinkError::Read)?;
                if n == 0 {
                    return Err(SinkError::Closed);
                }
                let results = conn.feed(&buf[..n]).map_err(SinkError::BadInput)?;
                let mut out = Vec::new();
                collect(&results, &mut out);
                write(&mut conn, &out).await?;
                for r in &results {
                    if let ClientSessionResult::RaisedEvent(ClientSessionEvent::UnhandleableOnStatusCode { code }) = r {
                        if is_error_status(code) {
                            return Err(SinkError::Status(code.clone()));
                        }
                        debug!(code, "status from the destination");
                    }
                }
            }
        }
    }
}

async fn connect(addr: &str, url: &RtmpUrl) -> Result<ClientConn, PlayError> {
    let mut conn = ClientConn::connect(addr, &url.app, Some(url.tc_url()), None).await?;
    let r = conn
        .session
        .request_publishing(url.key.clone(), PublishRequestType::Live);
    conn.send(r).await?;
    wait_publish(&mut conn).await?;
    Ok(conn)
}

async fn wait_publish(conn: &mut ClientConn) -> Result<(), PlayError> {
    conn.until(Vec::new(), |ev| match ev {
        ClientSessionEvent::PublishRequestAccepted => Some(Ok(())),
        ClientSessionEvent::UnhandleableOnStatusCode { code } if is_error_status(code) => {
            Some(Err(PlayError::Refused(code.clone())))
        }
        ClientSessionEvent::UnhandleableAmf0Command {
            command_name,
            additional_values,
            ..
        } if command_name == "onStatus" || command_name == "_error" => {
            refusal(additional_values).map(|why| Err(PlayError::Refused(why)))
        }
        // rml_rtmp servers answer a refused publish with an `_error` on transaction 0.
        ClientSessionEvent::UnknownTransactionResultReceived {
            additional_values, ..
        } => refusal(additional_values).map(|why| Err(PlayError::Refused(why))),
        _ => None,
    })
    .await
}

/// The reason in an error status object (`level` error), if it is one.
fn refusal(values: &[rml_amf0::Amf0Value]) -> Option<String> {
    let field = |name: &str| {
        values.iter().find_map(|v| match v {
            rml_amf0::Amf0Value::Object(o) => match o.get(name) {
                Some(rml_amf0::Amf0Value::Utf8String(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        })
    };
    let level = field("level")?;
    (level == "error" || level == "_error").then(|| {
        field("description")
            .or_else(|| field("code"))
            .unwrap_or_else(|| format!("{values:?}"))
    })
}

/// Ends the current publish and starts another on the same connection (a new segment).
async fn republish(conn: &mut ClientConn, url: &RtmpUrl) -> Result<(), SinkError> {
    let r = conn.session.stop_publishing().map_err(SinkError::session)?;
    let mut out = Vec::new();
    collect(&r, &mut out);
    write(conn, &out).await?;
    let r = conn
        .session
        .request_publishing(url.key.clone(), PublishRequestType::Live);
    conn.send(r).await.map_err(SinkError::Republish)?;
    tokio::time::timeout(REPUBLISH_TIMEOUT, wait_publish(conn))
        .await
        .map_err(|_| SinkError::RepublishTimeout)?
        .map_err(SinkError::Republish)
}

fn is_error_status(code: &str) -> bool {
    [
        "BadName",
        "Failed",
        "Rejected",
        "Error",
        "Denied",
        "Unauthorized",
    ]
    .iter()
    .any(|w| code.contains(w))
}

/// `onMetaData` and the sequence headers, as an RTMP publisher sends them.
fn encode_config(
    conn: &mut ClientConn,
    config: &StreamConfig,
    ts: u32,
    out: &mut Vec<u8>,
) -> Result<(), SinkError> {
    let mut meta = StreamMetadata::new();
    if let Some(v) = &config.video {
        meta.video_width = Some(v.width);
        meta.video_height = Some(v.height);
        meta.video_codec_id = Some(7);
    }
    if let Some(a) = config.audio.as_ref().filter(|a| a.codec == Codec::Aac) {
        meta.audio_codec_id = Some(10);
        meta.audio_sample_rate = Some(a.sample_rate);
        meta.audio_channels = Some(a.channels as u32);
        meta.audio_is_stereo = Some(a.channels > 1);
    }
    meta.video_frame_rate = config.metadata.frame_rate.map(|f| f as f32);
    meta.encoder = Some(concat!("meshcast ", env!("CARGO_PKG_VERSION")).to_string());
    let e = SinkError::session;
    let ts = RtmpTimestamp::new(ts);
    let mut results = vec![conn.session.publish_metadata(&meta).map_err(e)?];
    if let Some(v) = config.video.as_ref().filter(|v| v.codec == Codec::H264) {
        let body = flv::video_sequence_header_body(&v.record);
        results.push(
            conn.session
                .publish_video_data(body, ts, false)
                .map_err(e)?,
        );
    }
    if let Some(a) = config.audio.as_ref().filter(|a| a.codec == Codec::Aac) {
        let body: Bytes = flv::audio_sequence_header_body(&a.specific);
        results.push(
            conn.session
                .publish_audio_data(body, ts, false)
                .map_err(e)?,
        );
    }
    collect(&results, out);
    Ok(())
}

async fn write(conn: &mut ClientConn, bytes: &[u8]) -> Result<(), SinkError> {
    if bytes.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(WRITE_TIMEOUT, conn.socket.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SinkError::Write(e)),
        Err(_) => Err(SinkError::WriteTimeout(WRITE_TIMEOUT)),
    }
}
