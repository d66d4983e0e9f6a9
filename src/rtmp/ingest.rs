//! The publish path into the hub: admitting a publish (auth, then the hub and the cluster's
//! publish race), and a publisher's media ([`IngestMedia`], sans-IO) turned into frames
//! pushed to its hub [`Publisher`].
//!
//! Admission is a future the connection polls beside its reads ([`super::server`]), so a
//! slow webhook or publish race never stops the socket being read.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rml_rtmp::sessions::StreamMetadata;
use tracing::{debug, info};

use super::protocol::{Refused, Request};
use super::RtmpError;
use crate::auth::{Action, Auth};
use crate::hub::{Hub, PublishError, Publisher};
use crate::media::packet::Packet;
use crate::media::{
    aac, avc, flv, AudioConfig, Codec, Frame, Metadata, StreamConfig, StreamKey, Timebase,
    TimestampUnwrapper, VideoConfig,
};
use crate::metrics::Proto;

/// Decides a publish: auth first, then the hub claims the name (on a cluster node after
/// asking the other origins whether they have it live, which can take up to the link
/// timeout). Owns what it needs, so the connection can poll it while it reads.
pub(super) async fn admit_publish(
    hub: Arc<Hub>,
    auth: Arc<Auth>,
    peer: SocketAddr,
    request: Request,
) -> Result<Publisher, (Refused, String)> {
    authorize(&auth, Action::Publish, &request, peer)
        .await
        .map_err(|denied| (Refused::Unauthorized, denied.reason))?;
    hub.publish_checked(request.key).await.map_err(|e| {
        let why = match e {
            PublishError::Limit(_) => Refused::Limit,
            PublishError::AlreadyLive(_) | PublishError::PublishedElsewhere { .. } => {
                Refused::Taken
            }
        };
        (why, e.to_string())
    })
}

/// Asks [`Auth`] whether `peer` may `action` the stream; the token comes from the request's
/// query (`demo?token=T`).
pub(super) async fn authorize(
    auth: &Auth,
    action: Action,
    request: &Request,
    peer: SocketAddr,
) -> Result<(), crate::auth::Denied> {
    let token = crate::auth::token_from_query(&request.query);
    let access = crate::auth::Access {
        action,
        protocol: "rtmp",
        stream: &request.key,
        client: peer,
        query: &request.query,
        token: token.as_deref(),
    };
    auth.check(&access).await
}

/// A publishing connection's ingest state: [`IngestMedia`] plus where its frames go.
pub(super) struct Ingest {
    key: StreamKey,
    publisher: Publisher,
    media: IngestMedia,
    frames_in: prometheus_client::metrics::counter::Counter,
    bytes_in: prometheus_client::metrics::counter::Counter,
    /// This connection in `meshcast_publishers{proto="rtmp"}` while it publishes.
    _seat: crate::metrics::Seat,
}

impl Ingest {
    pub(super) fn new(hub: &Hub, key: StreamKey, publisher: Publisher) -> Ingest {
        let counters = hub.metrics().publisher_counters(Proto::Rtmp);
        Ingest {
            key,
            publisher,
            media: IngestMedia::default(),
            frames_in: counters.frames_in,
            bytes_in: counters.bytes_in,
            _seat: crate::metrics::Seat::take(&counters.publishers),
        }
    }

    /// Resolves with the reason when the hub evicts this publisher.
    pub(super) fn evicted(&self) -> impl Future<Output = String> + Send + 'static {
        self.publisher.evicted()
    }

    fn reject(&self, why: impl ToString) -> RtmpError {
        RtmpError::Media(self.key.clone(), why.to_string())
    }

    pub(super) fn on_metadata(&mut self, m: &StreamMetadata) {
        self.media.config.metadata = Metadata {
            frame_rate: m.video_frame_rate.map(f64::from),
            video_bitrate_kbps: m.video_bitrate_kbps.map(f64::from),
            audio_bitrate_kbps: m.audio_bitrate_kbps.map(f64::from),
            encoder: m.encoder.clone(),
        };
        self.publisher.set_config(self.media.config.clone());
    }

    pub(super) fn on_video(&mut self, data: Bytes, timestamp: u32) -> Result<(), RtmpError> {
        self.bytes_in.inc_by(data.len() as u64);
        let out = self
            .media
            .on_video(data, timestamp)
            .map_err(|e| self.reject(e))?;
        self.deliver(out);
        Ok(())
    }

    pub(super) fn on_audio(&mut self, data: Bytes, timestamp: u32) -> Result<(), RtmpError> {
        self.bytes_in.inc_by(data.len() as u64);
        let out = self
            .media
            .on_audio(data, timestamp)
            .map_err(|e| self.reject(e))?;
        self.deliver(out);
        Ok(())
    }

    fn deliver(&mut self, out: Option<IngestOutput>) {
        match out {
            Some(IngestOutput::Config) => self.publisher.set_config(self.media.config.clone()),
            Some(IngestOutput::Frame { frame, body }) => {
                self.frames_in.inc();
                let packet = match body {
                    Some(body) => Packet::with(frame, &flv::BODY, body),
                    None => Packet::new(frame),
                };
                self.publisher.push(packet);
            }
            None => {}
        }
    }
}

/// Why a publisher's audio or video message was refused (the connection closes).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Flv(#[from] flv::FlvError),
    #[error(transparent)]
    Avc(#[from] avc::AvcError),
    #[error(transparent)]
    Aac(#[from] aac::AacError),
}

/// What one audio or video message of a publisher gave.
#[derive(Debug)]
pub enum IngestOutput {
    /// A sequence header changed [`IngestMedia::config`].
    Config,
    /// A frame; `body` is the received FLV body when it still matches the frame (its
    /// timestamps were not adjusted), so players can be sent it as is.
    Frame { frame: Frame, body: Option<Bytes> },
}

/// A publisher's media, sans-IO: the FLV bodies and RTMP timestamps of its audio and video
/// messages in, codec configuration and frames with monotonic timestamps out. It owns the
/// media parsers network input reaches on ingest (FLV tag, AVC decoder configuration, AAC
/// AudioSpecificConfig); it knows nothing of sockets, the hub or metrics.
#[derive(Debug, Default)]
pub struct IngestMedia {
    pub config: StreamConfig,
    video_clock: TrackClock,
    audio_clock: TrackClock,
}

/// One track's RTMP timestamps, unwrapped past 32 bits and never going backwards.
#[derive(Debug)]
struct TrackClock {
    unwrapper: TimestampUnwrapper,
    last_dts: i64,
}

impl Default for TrackClock {
    fn default() -> Self {
        TrackClock {
            unwrapper: TimestampUnwrapper::default(),
            last_dts: i64::MIN,
        }
    }
}

impl TrackClock {
    /// The message's timestamp unwrapped (`raw`), and the dts to use: `raw`, or the last dts
    /// when `raw` went backwards.
    fn next(&mut self, timestamp: u32) -> (i64, i64) {
        let raw = self.unwrapper.unwrap(timestamp);
        let dts = raw.max(self.last_dts);
        self.last_dts = dts;
        (raw, dts)
    }
}

impl IngestMedia {
    /// One video message body; `None` when it gives nothing (end of sequence, or a frame
    /// before the sequence header).
    pub fn on_video(
        &mut self,
        data: Bytes,
        timestamp: u32,
    ) -> Result<Option<IngestOutput>, IngestError> {
        match flv::parse_video_tag(&data)? {
            flv::VideoTag::SequenceHeader(record) => {
                let c = avc::parse_decoder_config(&record)?;
                info!(
                    width = c.width,
                    height = c.height,
                    profile = c.profile,
                    "H.264 configuration"
                );
                self.config.video = Some(VideoConfig {
                    codec: Codec::H264,
                    record,
                    width: c.width,
                    height: c.height,
                });
                Ok(Some(IngestOutput::Config))
            }
            flv::VideoTag::Frame {
                keyframe,
                cts,
                payload,
            } => {
                if self.config.video.is_none() {
                    debug!("video frame before its sequence header: dropped");
                    return Ok(None);
                }
                let (raw, dts) = self.video_clock.next(timestamp);
                let pts = (dts + cts as i64).max(dts);
                let exact = dts == raw && cts >= 0;
                let frame = Frame {
                    codec: Codec::H264,
                    dts,
                    pts,
                    timebase: Timebase::MILLIS,
                    keyframe,
                    payload,
                };
                Ok(Some(IngestOutput::Frame {
                    frame,
                    body: exact.then_some(data),
                }))
            }
            flv::VideoTag::EndOfSequence => Ok(None),
        }
    }

    /// One audio message body; `None` for a frame before the sequence header.
    pub fn on_audio(
        &mut self,
        data: Bytes,
        timestamp: u32,
    ) -> Result<Option<IngestOutput>, IngestError> {
        match flv::parse_audio_tag(&data)? {
            flv::AudioTag::SequenceHeader(specific) => {
                let c = aac::parse_audio_specific_config(&specific)?;
                info!(
                    sample_rate = c.sample_rate,
                    channels = c.channels,
                    "AAC configuration"
                );
                self.config.audio = Some(AudioConfig {
                    codec: Codec::Aac,
                    specific,
                    sample_rate: c.sample_rate,
                    channels: c.channels,
                });
                Ok(Some(IngestOutput::Config))
            }
            flv::AudioTag::Frame(payload) => {
                if self.config.audio.is_none() {
                    return Ok(None);
                }
                let (raw, dts) = self.audio_clock.next(timestamp);
                let frame = Frame {
                    codec: Codec::Aac,
                    dts,
                    pts: dts,
                    timebase: Timebase::MILLIS,
                    keyframe: true,
                    payload,
                };
                Ok(Some(IngestOutput::Frame {
                    frame,
                    body: (dts == raw).then_some(data),
                }))
            }
        }
    }
}
