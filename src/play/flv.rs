//! HTTP-FLV playback: `GET /{namespace}/{stream}.flv` streams an FLV file that never ends
//! while the stream is live.
//!
//! A pump task moves the subscription into a small bounded channel feeding the response
//! body. If the client stops reading, the channel stays full; after the viewer write timeout
//! the pump gives up and the response ends, so a stalled HTTP viewer is disconnected like a
//! stalled RTMP one and holds no more than the channel's few buffers.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::hub::{StreamEvent, Subscription, SubscriptionEnd};
use crate::media::flv;
use crate::metrics::ProtoCounters;

/// Buffers between the pump and the HTTP body.
const BODY_QUEUE: usize = 16;

/// Starts pumping `sub` as FLV; returns the receiving end for the response body.
pub fn spawn_pump(
    sub: Subscription,
    counters: ProtoCounters,
    write_timeout: Duration,
) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(BODY_QUEUE);
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        pump(sub, tx, counters, write_timeout),
        span,
    ));
    rx
}

async fn pump(
    mut sub: Subscription,
    tx: mpsc::Sender<Bytes>,
    counters: ProtoCounters,
    write_timeout: Duration,
) {
    counters.viewers.inc();
    let mut header_sent = false;
    let mut last_ts = 0u32;
    loop {
        let ev = match sub.next().await {
            Ok(ev) => ev,
            Err(SubscriptionEnd::Ended) => {
                info!("stream ended; closing FLV response");
                break;
            }
            Err(SubscriptionEnd::TooSlow) => {
                counters.slow_disconnects.inc();
                warn!("FLV viewer stayed too far behind; disconnecting");
                break;
            }
            Err(SubscriptionEnd::Kicked) => {
                info!("FLV viewer disconnected by the operator");
                break;
            }
        };
        let bytes = match ev {
            StreamEvent::Config(config) => {
                let mut out = Vec::new();
                if !header_sent {
                    out.extend_from_slice(&flv::file_header(
                        config.audio.as_ref().is_some_and(|a| a.codec.fits_flv()),
                        config.video.is_some(),
                    ));
                    header_sent = true;
                }
                out.extend_from_slice(&flv::tag(
                    flv::TAG_SCRIPT,
                    last_ts,
                    &flv::metadata_body(&config),
                ));
                if let Some(v) = &config.video {
                    let body = flv::video_sequence_header_body(&v.record);
                    out.extend_from_slice(&flv::tag(flv::TAG_VIDEO, last_ts, &body));
                }
                if let Some(a) = config.audio.as_ref().filter(|a| a.codec.fits_flv()) {
                    let body = flv::audio_sequence_header_body(&a.specific);
                    out.extend_from_slice(&flv::tag(flv::TAG_AUDIO, last_ts, &body));
                }
                Bytes::from(out)
            }
            StreamEvent::Frame(p) if !p.frame.codec.fits_flv() => continue,
            StreamEvent::Frame(p) => {
                last_ts = p.frame.dts_ms() as u32;
                counters.frames_out.inc();
                flv::tag_of(&p).clone()
            }
            StreamEvent::Discontinuity => {
                counters.lag_skips.inc();
                continue;
            }
        };
        let len = bytes.len() as u64;
        match tx.send_timeout(bytes, write_timeout).await {
            Ok(()) => {
                counters.bytes_out.inc_by(len);
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                counters.slow_disconnects.inc();
                warn!("FLV viewer did not read for {write_timeout:?}; disconnecting");
                break;
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                debug!("FLV viewer went away");
                break;
            }
        }
    }
    counters.viewers.dec();
}
