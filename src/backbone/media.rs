//! Media streams: sending and reading groups over QUIC unidirectional streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use super::downstream_link::Internal;
use super::link::HELLO_TIMEOUT;
use super::wire::{self, code, GroupHeader, MediaItem, GROUP_HEADER_LEN};
use crate::hub::{Hub, StreamEvent, Subscription, SubscriptionEnd};
use crate::media::{StreamConfig, TrackKind};

/// Audio-only streams start a new group every this many frames.
pub(super) const AUDIO_GROUP_FRAMES: u32 = 50;

/// What flows from group readers to a pull.
pub(super) enum FeedItem {
    Media {
        group: u64,
        item: MediaItem,
    },
    GroupEnd {
        group: u64,
    },
    /// The upstream ended the subscription (`code` from [`wire::code`]).
    Done {
        code: u16,
        reason: String,
    },
}

/// Accepts the group streams of a dialed link and hands each to a reader task.
pub(super) async fn accept_groups(
    conn: quinn::Connection,
    feeds: Arc<Mutex<HashMap<u64, mpsc::Sender<FeedItem>>>>,
    hub: Arc<Hub>,
) {
    while let Ok(stream) = conn.accept_uni().await {
        hub.metrics().backbone_groups_received.inc();
        tokio::spawn(read_group(stream, feeds.clone()).instrument(tracing::Span::current()));
    }
}

/// Reads one group stream into its subscription's feed.
pub(super) async fn read_group(
    mut stream: quinn::RecvStream,
    feeds: Arc<Mutex<HashMap<u64, mpsc::Sender<FeedItem>>>>,
) {
    let mut header = [0u8; GROUP_HEADER_LEN];
    let header = match tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut header)).await {
        Ok(Ok(())) => match GroupHeader::decode(&header) {
            Ok(h) => h,
            Err(e) => {
                warn!("bad group stream: {e}");
                let _ = stream.stop(code::STREAM_MALFORMED.into());
                return;
            }
        },
        _ => return,
    };
    let Some(tx) = feeds.lock().get(&header.subscription).cloned() else {
        // Unsubscribed meanwhile.
        let _ = stream.stop(code::STREAM_UNWANTED.into());
        return;
    };
    let group = header.sequence;
    loop {
        match read_item(&mut stream).await {
            Ok(Some(item)) => {
                if tx.send(FeedItem::Media { group, item }).await.is_err() {
                    let _ = stream.stop(code::STREAM_UNWANTED.into());
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                debug!(group, "group stream ended early: {e}");
                if matches!(e, ItemError::Wire(_)) {
                    warn!(group, "malformed media item: {e}");
                    let _ = stream.stop(code::STREAM_MALFORMED.into());
                }
                break;
            }
        }
    }
    let _ = tx.send(FeedItem::GroupEnd { group }).await;
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ItemError {
    #[error("{0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("{0}")]
    ReadChunk(#[from] quinn::ReadError),
    #[error("stream ended inside an item")]
    FinishedEarly,
    #[error("{0}")]
    Wire(#[from] wire::WireError),
}

/// Reads one length-prefixed media item; `None` at a clean end of stream. The body buffer
/// grows as its bytes arrive: an announced length (up to [`wire::MAX_MESSAGE`]) reserves
/// nothing by itself.
pub(super) async fn read_item(
    stream: &mut quinn::RecvStream,
) -> Result<Option<MediaItem>, ItemError> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = wire::frame_len(prefix)?;
    let mut body = BytesMut::new();
    while body.len() < len {
        let chunk = stream
            .read_chunk(len - body.len(), true)
            .await?
            .ok_or(ItemError::FinishedEarly)?;
        body.extend_from_slice(&chunk.bytes);
    }
    let mut body = body.freeze();
    let kind = bytes::Buf::get_u8(&mut body);
    Ok(Some(MediaItem::decode(kind, body)?))
}

/// Writes a served subscription as one QUIC stream per group.
pub(super) async fn send_media(
    conn: quinn::Connection,
    id: u64,
    mut sub: Subscription,
    cancel: CancellationToken,
    done: mpsc::Sender<Internal>,
    write_timeout: Duration,
    hub: Arc<Hub>,
) {
    let metrics = hub.metrics().clone();
    let counters = metrics.proto(crate::metrics::Proto::Backbone);
    counters.viewers.inc();
    let mut config = Arc::new(StreamConfig::default());
    let mut group: Option<quinn::SendStream> = None;
    let mut next_sequence = 0u64;
    let mut audio_frames = 0u32;
    let mut buf = BytesMut::new();
    let (code, reason) = loop {
        let ev = tokio::select! {
            ev = sub.next() => ev,
            _ = cancel.cancelled() => break (code::GONE, "unsubscribed".to_string()),
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(SubscriptionEnd::Ended) => match sub.evicted() {
                Some(why) => break (code::MOVED, why),
                None => break (code::ENDED, "stream ended".into()),
            },
            Err(SubscriptionEnd::TooSlow) => {
                counters.slow_disconnects.inc();
                break (code::TOO_SLOW, "subscriber too far behind".into());
            }
            // Other nodes' pulls hold no viewer ticket, so they are never kicked.
            Err(SubscriptionEnd::Kicked) => break (code::ENDED, "disconnected".into()),
        };
        buf.clear();
        match ev {
            StreamEvent::Config(c) => {
                config = c;
                if group.is_some() {
                    MediaItem::Config((*config).clone()).encode(&mut buf);
                }
            }
            StreamEvent::Discontinuity => {
                counters.lag_skips.inc();
                if let Some(mut g) = group.take() {
                    let _ = g.reset(code::STREAM_ABANDONED.into());
                }
                continue;
            }
            StreamEvent::Frame(p) => {
                let f = &p.frame;
                let has_video = config.video.is_some();
                let starts_group = if has_video {
                    f.is_video_keyframe()
                } else {
                    f.track() == TrackKind::Audio
                        && (group.is_none() || audio_frames >= AUDIO_GROUP_FRAMES)
                };
                if starts_group {
                    if let Some(mut g) = group.take() {
                        let _ = g.finish();
                    }
                    let s = match conn.open_uni().await {
                        Ok(s) => s,
                        Err(e) => break (code::GONE, format!("link lost: {e}")),
                    };
                    // Newer groups win the bandwidth.
                    let _ = s.set_priority(next_sequence.min(i32::MAX as u64) as i32);
                    GroupHeader {
                        subscription: id,
                        sequence: next_sequence,
                    }
                    .encode(&mut buf);
                    next_sequence += 1;
                    audio_frames = 0;
                    metrics.backbone_groups_sent.inc();
                    // In band, so a downstream egress sees a returning publisher where
                    // its frames start (`egress` `on_reconnect`); first, so a relay knows
                    // it before it goes live.
                    MediaItem::Publishes(sub.publishes()).encode(&mut buf);
                    MediaItem::Config((*config).clone()).encode(&mut buf);
                    group = Some(s);
                }
                if group.is_none() {
                    // Before the first keyframe: nothing decodable to send yet.
                    continue;
                }
                if f.track() == TrackKind::Audio {
                    audio_frames += 1;
                }
                MediaItem::Frame(f.clone()).encode(&mut buf);
                counters.frames_out.inc();
            }
        }
        if buf.is_empty() {
            continue;
        }
        let Some(g) = group.as_mut() else { continue };
        match tokio::time::timeout(write_timeout, g.write_all(&buf)).await {
            Ok(Ok(())) => {
                counters.bytes_out.inc_by(buf.len() as u64);
            }
            Ok(Err(e)) => {
                debug!("group write failed: {e}");
                group = None;
            }
            Err(_) => {
                counters.slow_disconnects.inc();
                break (code::TOO_SLOW, "peer stopped reading".into());
            }
        }
    };
    if let Some(mut g) = group.take() {
        let _ = g.finish();
    }
    counters.viewers.dec();
    debug!("subscription over: {reason}");
    let _ = done.send(Internal::SenderDone { id, code, reason }).await;
}
