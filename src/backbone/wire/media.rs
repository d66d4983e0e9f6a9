//! Media-stream items: the group header, then configuration, frames and publish counts.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    put_bytes, put_frame, put_str, Reader, WireError, GROUP_HEADER_LEN, GROUP_MAGIC, VERSION,
};
use crate::media::{
    valid_rid, AudioConfig, Frame, Metadata, SimulcastLayer, StreamConfig, Timebase, VideoConfig,
};

/// First bytes of every media stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHeader {
    pub subscription: u64,
    /// Increases by one per group within a subscription.
    pub sequence: u64,
}

impl GroupHeader {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&GROUP_MAGIC);
        out.put_u8(VERSION as u8);
        out.put_u64(self.subscription);
        out.put_u64(self.sequence);
    }

    pub fn decode(b: &[u8; GROUP_HEADER_LEN]) -> Result<GroupHeader, WireError> {
        if b[..2] != GROUP_MAGIC || b[2] != VERSION as u8 {
            return Err(WireError::BadGroupHeader);
        }
        let mut r = &b[3..];
        Ok(GroupHeader {
            subscription: r.get_u64(),
            sequence: r.get_u64(),
        })
    }
}

/// Items on a media (group) stream.
#[derive(Clone, Debug, PartialEq)]
pub enum MediaItem {
    /// The stream's configuration; at the start of every group, and again on change.
    Config(StreamConfig),
    Frame(Frame),
    /// How many publishers the stream has had (it grows when a publisher comes back to the
    /// stream held for it); first item of every group.
    Publishes(u64),
}

pub(super) const K_CONFIG: u8 = 0x01;
pub(super) const K_FRAME: u8 = 0x02;
pub(super) const K_PUBLISHES: u8 = 0x03;

pub(super) const CF_VIDEO: u8 = 1;
pub(super) const CF_AUDIO: u8 = 2;
pub(super) const CF_FRAME_RATE: u8 = 4;
pub(super) const CF_VIDEO_BITRATE: u8 = 8;
pub(super) const CF_AUDIO_BITRATE: u8 = 16;
pub(super) const CF_ENCODER: u8 = 32;
pub(super) const CF_SIMULCAST: u8 = 64;

impl MediaItem {
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            MediaItem::Config(c) => {
                let mut body = BytesMut::new();
                let m = &c.metadata;
                let flags = (c.video.is_some() as u8 * CF_VIDEO)
                    | (c.audio.is_some() as u8 * CF_AUDIO)
                    | (m.frame_rate.is_some() as u8 * CF_FRAME_RATE)
                    | (m.video_bitrate_kbps.is_some() as u8 * CF_VIDEO_BITRATE)
                    | (m.audio_bitrate_kbps.is_some() as u8 * CF_AUDIO_BITRATE)
                    | (m.encoder.is_some() as u8 * CF_ENCODER)
                    | (!c.simulcast.is_empty() as u8 * CF_SIMULCAST);
                body.put_u8(flags);
                if let Some(v) = &c.video {
                    body.put_u8(v.codec.wire_id());
                    body.put_u32(v.width);
                    body.put_u32(v.height);
                    put_bytes(&mut body, &v.record);
                }
                if let Some(a) = &c.audio {
                    body.put_u8(a.codec.wire_id());
                    body.put_u32(a.sample_rate);
                    body.put_u8(a.channels);
                    put_bytes(&mut body, &a.specific);
                }
                for v in [m.frame_rate, m.video_bitrate_kbps, m.audio_bitrate_kbps]
                    .into_iter()
                    .flatten()
                {
                    body.put_f64(v);
                }
                if let Some(e) = &m.encoder {
                    put_str(&mut body, e);
                }
                if !c.simulcast.is_empty() {
                    body.put_u8(c.simulcast.len().min(u8::MAX as usize) as u8);
                    for l in c.simulcast.iter().take(u8::MAX as usize) {
                        put_str(&mut body, &l.rid);
                        body.put_u32(l.width);
                        body.put_u32(l.height);
                    }
                }
                put_frame(out, K_CONFIG, &body);
            }
            MediaItem::Frame(f) => {
                let len = 1 + 1 + 4 + 8 + 4 + f.payload.len();
                out.reserve(4 + 1 + len);
                out.put_u32(1 + len as u32);
                out.put_u8(K_FRAME);
                out.put_u8(f.codec.wire_id());
                out.put_u8(f.keyframe as u8);
                out.put_u32(f.timebase.0);
                out.put_i64(f.dts);
                out.put_i32((f.pts - f.dts).clamp(0, i32::MAX as i64) as i32);
                out.put_slice(&f.payload);
            }
            MediaItem::Publishes(n) => {
                out.put_u32(1 + 8);
                out.put_u8(K_PUBLISHES);
                out.put_u64(*n);
            }
        }
    }

    pub fn decode(kind: u8, body: Bytes) -> Result<MediaItem, WireError> {
        let mut r = Reader(body);
        match kind {
            K_CONFIG => {
                let flags = r.u8()?;
                let video = if flags & CF_VIDEO != 0 {
                    Some(VideoConfig {
                        codec: r.codec()?,
                        width: r.u32()?,
                        height: r.u32()?,
                        record: r.bytes()?,
                    })
                } else {
                    None
                };
                let audio = if flags & CF_AUDIO != 0 {
                    Some(AudioConfig {
                        codec: r.codec()?,
                        sample_rate: r.u32()?,
                        channels: r.u8()?,
                        specific: r.bytes()?,
                    })
                } else {
                    None
                };
                let mut opt = |bit: u8| -> Result<Option<f64>, WireError> {
                    if flags & bit != 0 {
                        Ok(Some(r.f64()?))
                    } else {
                        Ok(None)
                    }
                };
                let metadata = Metadata {
                    frame_rate: opt(CF_FRAME_RATE)?,
                    video_bitrate_kbps: opt(CF_VIDEO_BITRATE)?,
                    audio_bitrate_kbps: opt(CF_AUDIO_BITRATE)?,
                    encoder: if flags & CF_ENCODER != 0 {
                        Some(r.string()?)
                    } else {
                        None
                    },
                };
                let mut simulcast = vec![];
                if flags & CF_SIMULCAST != 0 {
                    for _ in 0..r.u8()? {
                        let rid = r.string()?;
                        if !valid_rid(&rid) {
                            return Err(WireError::Invalid("bad simulcast rid"));
                        }
                        simulcast.push(SimulcastLayer {
                            rid,
                            width: r.u32()?,
                            height: r.u32()?,
                        });
                    }
                }
                r.finish()?;
                Ok(MediaItem::Config(StreamConfig {
                    video,
                    audio,
                    metadata,
                    simulcast,
                }))
            }
            K_FRAME => {
                let codec = r.codec()?;
                let flags = r.u8()?;
                let timebase = r.u32()?;
                if timebase == 0 {
                    return Err(WireError::Invalid("zero timebase"));
                }
                let dts = r.i64()?;
                let pts_offset = r.i32()?;
                if pts_offset < 0 {
                    return Err(WireError::Invalid("negative pts offset"));
                }
                Ok(MediaItem::Frame(Frame {
                    codec,
                    dts,
                    pts: dts.saturating_add(pts_offset as i64),
                    timebase: Timebase(timebase),
                    keyframe: flags & 1 != 0,
                    payload: r.rest(),
                }))
            }
            K_PUBLISHES => {
                let n = r.u64()?;
                r.finish()?;
                Ok(MediaItem::Publishes(n))
            }
            other => Err(WireError::UnknownKind(other)),
        }
    }
}
