//! The play path out of the hub: admitting a player (auth, the viewer limits, the
//! subscription, which on an edge may wait for the stream's pull), and turning the hub's
//! [`StreamEvent`]s into RTMP chunks. A frame's chunks are built once per packet for every
//! player on the canonical message stream (`CANONICAL_CHUNKS`).
//!
//! Admission is a future the connection polls beside its reads ([`super::server`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::chunk;
use super::ingest::authorize;
use super::protocol::{Refused, Request};
use crate::auth::{Action, Auth};
use crate::hub::{Hub, StreamEvent, Subscription, SubscriptionEnd};
use crate::media::packet::{Encoding, Packet};
use crate::media::{flv, Codec};
use crate::metrics::ProtoCounters;

/// Message stream id whose chunks are cached on the packet (what every common player gets).
const CANONICAL_STREAM_ID: u32 = 1;

/// Decides a play: auth, then the viewer limits, then the subscription (audio as AAC, video
/// that FLV carries). Owns what it needs, so the connection can poll it while it reads.
pub(super) async fn admit_play(
    hub: Arc<Hub>,
    auth: Arc<Auth>,
    peer: SocketAddr,
    request: Request,
) -> Result<Subscription, (Refused, String)> {
    authorize(&auth, Action::Play, &request, peer)
        .await
        .map_err(|denied| (Refused::Unauthorized, denied.reason))?;
    let ticket = hub
        .admit_viewer(&request.key, "rtmp", peer)
        .map_err(|why| (Refused::Limit, why))?;
    let mut sub = crate::bridge::subscribe_with_audio(&hub, &request.key, Codec::Aac)
        .await
        .map_err(|e| (Refused::NotFound, e.to_string()))?;
    if let Some(why) = crate::bridge::flv_incompatible_video(&sub) {
        return Err((Refused::NotFound, why));
    }
    sub.hold(ticket);
    Ok(sub)
}

/// A playing connection's state.
pub(super) struct Playback {
    pub(super) sub: Subscription,
    stream_id: u32,
    chunk_size: usize,
    last_ts: u32,
    pub(super) counters: ProtoCounters,
}

impl Playback {
    /// Playback of `sub` on message stream `stream_id`; counts a viewer until dropped.
    pub(super) fn new(
        sub: Subscription,
        stream_id: u32,
        chunk_size: usize,
        counters: ProtoCounters,
    ) -> Playback {
        counters.viewers.inc();
        Playback {
            sub,
            stream_id,
            chunk_size,
            last_ts: 0,
            counters,
        }
    }

    /// Appends the bytes for one event to `out`; returns the number of frames.
    pub(super) fn encode(&mut self, ev: StreamEvent, out: &mut Vec<Bytes>) -> u64 {
        match ev {
            StreamEvent::Config(config) => {
                let ts = self.last_ts;
                out.push(self.message(
                    chunk::CSID_DATA,
                    chunk::MSG_DATA_AMF0,
                    ts,
                    &flv::metadata_body(&config),
                ));
                if let Some(v) = &config.video {
                    let body = flv::video_sequence_header_body(&v.record);
                    out.push(self.message(chunk::CSID_VIDEO, chunk::MSG_VIDEO, ts, &body));
                }
                if let Some(a) = config.audio.as_ref().filter(|a| a.codec.fits_flv()) {
                    let body = flv::audio_sequence_header_body(&a.specific);
                    out.push(self.message(chunk::CSID_AUDIO, chunk::MSG_AUDIO, ts, &body));
                }
                0
            }
            StreamEvent::Frame(packet) if !packet.frame.codec.fits_flv() => 0,
            StreamEvent::Frame(packet) => {
                let ts = packet.frame.dts_ms() as u32;
                self.last_ts = ts;
                let bytes = if self.stream_id == CANONICAL_STREAM_ID {
                    let chunk_size = self.chunk_size;
                    CANONICAL_CHUNKS
                        .get(&packet, |p| {
                            frame_chunks(p, CANONICAL_STREAM_ID, chunk_size)
                        })
                        .clone()
                } else {
                    frame_chunks(&packet, self.stream_id, self.chunk_size)
                };
                out.push(bytes);
                1
            }
            StreamEvent::Discontinuity => {
                self.counters.lag_skips.inc();
                0
            }
        }
    }

    fn message(&self, csid: u8, kind: u8, ts: u32, body: &[u8]) -> Bytes {
        chunk::encode_message(csid, kind, ts, self.stream_id, body, self.chunk_size)
    }
}

/// A frame's RTMP chunks in the node's canonical chunking (stream id
/// [`CANONICAL_STREAM_ID`], the node's chunk size), built once per packet for every player.
static CANONICAL_CHUNKS: Encoding<Bytes> = Encoding::new("rtmp chunks");

fn frame_chunks(p: &Packet, stream_id: u32, chunk_size: usize) -> Bytes {
    let (csid, kind) = match p.frame.codec {
        Codec::H264 => (chunk::CSID_VIDEO, chunk::MSG_VIDEO),
        Codec::Vp8 => (chunk::CSID_VIDEO, chunk::MSG_VIDEO),
        Codec::Aac | Codec::Opus => (chunk::CSID_AUDIO, chunk::MSG_AUDIO),
    };
    chunk::encode_message(
        csid,
        kind,
        p.frame.dts_ms() as u32,
        stream_id,
        flv::body_of(p),
        chunk_size,
    )
}

impl Drop for Playback {
    fn drop(&mut self) {
        self.counters.viewers.dec();
    }
}

/// Next event for a playing connection.
///
/// With merged writes, waits for the next tick of the node's flush clock first, so that
/// frames arriving meanwhile are written together. Cancel-safe: dropping the future while it
/// waits loses nothing.
pub(super) async fn next_event(
    play: &mut Playback,
    flush_clock: Option<&mut watch::Receiver<()>>,
) -> Result<StreamEvent, SubscriptionEnd> {
    if let Some(clock) = flush_clock {
        // An error means the clock stopped (shutdown): write at once.
        let _ = clock.changed().await;
    }
    play.sub.next().await
}

/// Ticks every `interval` while the server runs; players with merged writes flush on it.
/// One timer for the whole node instead of one per player.
pub(super) fn spawn_flush_clock(
    interval: Duration,
    shutdown: CancellationToken,
) -> Option<watch::Receiver<()>> {
    if interval.is_zero() {
        return None;
    }
    let (tx, rx) = watch::channel(());
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    tx.send_replace(());
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Some(rx)
}
