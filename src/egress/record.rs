//! The recording sink: writes a stream to files with FFmpeg's muxers (ffmpeg-next), on a
//! thread of its own (file I/O never blocks the async runtime).
//!
//! * Fragmented MP4 by default (`frag_keyframe+empty_moov+default_base_moof`, flushed after
//!   every packet): each GOP lands on disk as a complete fragment, so a file stays playable up
//!   to its last fragment even if the node is killed with SIGKILL. FLV and Matroska too.
//! * Packets are remuxed as they are: H.264 as AVCC with its avcC record as extradata, AAC
//!   with its AudioSpecificConfig, Opus (Matroska) with an `OpusHead`.
//! * A file starts at a keyframe with timestamps from zero; the next one starts at the first
//!   keyframe after `segment` time or `segment_bytes` (rotation), when the publisher comes
//!   back under the `new_segment` policy, or when the codec configuration changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ff::ffi;
use ff::Rescale;
use ffmpeg_next as ff;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::spec::{confine, PathTemplate, RecordFormat};
use super::{Item, SharedStatus, SinkError, State};
use crate::media::Packet;
use crate::media::{Codec, StreamConfig, StreamKey, TrackKind};

/// What to record and where.
pub struct Job {
    /// The disk must keep this much free: at the floor, the file ends cleanly and the
    /// recording stops for good.
    pub min_free_bytes: u64,
    pub root: PathBuf,
    pub key: StreamKey,
    pub format: RecordFormat,
    pub template: PathTemplate,
    pub segment: Option<Duration>,
    pub segment_bytes: Option<u64>,
    /// Where finished files go next (`[recording.s3]`).
    pub uploader: Option<Arc<super::upload::Uploader>>,
}

/// Records what arrives on `rx` until it closes (files finished cleanly) or a file cannot be
/// written (the error; the egress task starts a new sink after a pause).
pub fn run(
    job: Job,
    mut rx: mpsc::Receiver<Item>,
    shared: Arc<SharedStatus>,
) -> Result<(), SinkError> {
    ff::init().map_err(|e| SinkError::File(format!("ffmpeg: {e}")))?;
    let mut config: Option<Arc<StreamConfig>> = None;
    let mut file: Option<OutFile> = None;
    let mut seq = 0u32;
    let result = (|| {
        while let Some(item) = rx.blocking_recv() {
            match item {
                // A file changes only at a frame: a publisher that comes back sends its
                // configuration again, usually the same, and the file goes on.
                Item::Config(c) if c.video.is_none() && c.audio.is_none() => {}
                Item::Config(c) => config = Some(c),
                Item::NewSegment => finish(file.take(), &shared, &job),
                Item::Frame {
                    packet,
                    dts_ms,
                    pts_ms,
                } => {
                    let Some(cfg) = &config else { continue };
                    let starts = packet.frame.resumes_at(cfg.video.is_some());
                    if file.as_ref().is_some_and(|f| !f.same_tracks(cfg)) {
                        if !starts {
                            continue;
                        }
                        info!("codec configuration changed; starting a new file");
                        finish(file.take(), &shared, &job);
                    }
                    if starts && file.as_ref().is_some_and(|f| f.due(dts_ms, &job)) {
                        finish(file.take(), &shared, &job);
                    }
                    if file.is_none() {
                        if !starts {
                            continue;
                        }
                        check_free_space(&job)?;
                        let f = OutFile::open(&job, cfg, seq, dts_ms).map_err(SinkError::File)?;
                        seq += 1;
                        info!(file = %f.relative, "recording");
                        shared.file_opened(f.relative.clone());
                        shared.set_state(State::Live);
                        file = Some(f);
                    }
                    let f = file.as_mut().expect("opened above");
                    let n = f.write(&packet, dts_ms, pts_ms).map_err(SinkError::File)?;
                    shared.sent(n, 1);
                    // Look at the disk again after every MiB written.
                    if f.bytes / FREE_SPACE_EVERY != (f.bytes - n) / FREE_SPACE_EVERY {
                        check_free_space(&job)?;
                    }
                }
            }
        }
        Ok(())
    })();
    finish(file.take(), &shared, &job);
    result
}

/// Bytes written between two looks at the disk's free space.
const FREE_SPACE_EVERY: u64 = 1 << 20;

/// Fails the recording for good ([`SinkError::DiskFull`]) when the disk under `job.root` is at its floor (the caller
/// finishes the open file cleanly on the way out).
fn check_free_space(job: &Job) -> Result<(), SinkError> {
    if job.min_free_bytes == 0 {
        return Ok(());
    }
    let _ = std::fs::create_dir_all(&job.root);
    match free_bytes(&job.root) {
        Some(free) if free < job.min_free_bytes => {
            let why = format!(
                "the disk under the recording root has {} MiB free, below recording.min_free_mb ({} MiB): recording stopped",
                free >> 20,
                job.min_free_bytes >> 20
            );
            Err(SinkError::DiskFull(why))
        }
        _ => Ok(()),
    }
}

/// Free bytes for unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter
    // that statvfs fills on success.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn finish(file: Option<OutFile>, shared: &Arc<SharedStatus>, job: &Job) {
    if let Some(mut f) = file {
        if let Err(e) = f.octx.write_trailer() {
            warn!(file = %f.relative, "finishing the file: {e}");
        }
        info!(file = %f.relative, bytes = f.bytes, "file finished");
        shared.file_closed();
        // Closed before it is queued: the uploader reads a whole file.
        let relative = f.relative.clone();
        drop(f);
        if let Some(u) = &job.uploader {
            u.enqueue(&job.root, &relative, Some(shared.clone()));
        }
    }
}

struct Track {
    index: usize,
    time_base: ff::Rational,
}

struct OutFile {
    octx: ff::format::context::Output,
    relative: String,
    video: Option<(Track, Codec)>,
    audio: Option<(Track, Codec)>,
    config: Arc<StreamConfig>,
    /// Input dts (ms) of this file's first frame: the file's zero.
    base_ms: i64,
    bytes: u64,
}

impl OutFile {
    fn open(
        job: &Job,
        config: &Arc<StreamConfig>,
        seq: u32,
        base_ms: i64,
    ) -> Result<OutFile, String> {
        let ext = job.format.extension();
        let rendered = job.template.render(&job.key, SystemTime::now(), seq, ext);
        // Never overwrite: a name taken already (same second) gets a suffix.
        let mut relative = rendered.clone();
        let mut path = confine(&job.root, &relative)?;
        let mut n = 1;
        while path.exists() {
            let stem = rendered.file_stem().unwrap_or_default().to_string_lossy();
            let ext = rendered
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default();
            relative = rendered.with_file_name(format!("{stem}-{n}{ext}"));
            path = confine(&job.root, &relative)?;
            n += 1;
        }
        let relative = relative.display().to_string();
        let err = |what: &str, e: ff::Error| format!("{relative}: {what}: {e}");
        let mut octx =
            ff::format::output_as(&path, job.format.muxer()).map_err(|e| err("opening", e))?;
        let mut video = None;
        if let Some(v) = &config.video {
            let id = match v.codec {
                Codec::H264 => ffi::AVCodecID::AV_CODEC_ID_H264,
                Codec::Vp8 => ffi::AVCodecID::AV_CODEC_ID_VP8,
                other => return Err(format!("{other:?} is not a video codec")),
            };
            let index = add_stream(&mut octx, id, &v.record, |par| {
                par.codec_type = ffi::AVMediaType::AVMEDIA_TYPE_VIDEO;
                par.width = v.width as i32;
                par.height = v.height as i32;
            })
            .map_err(|e| err("adding video", e))?;
            video = Some((index, v.codec));
        }
        let mut audio = None;
        if let Some(a) = &config.audio {
            let (id, extradata, frame_size) = match a.codec {
                Codec::Aac => (ffi::AVCodecID::AV_CODEC_ID_AAC, a.specific.to_vec(), 1024),
                Codec::Opus if job.format.takes_opus() => {
                    (ffi::AVCodecID::AV_CODEC_ID_OPUS, opus_head(a.channels), 960)
                }
                other => return Err(format!("{other:?} audio cannot go into {:?}", job.format)),
            };
            let index = add_stream(&mut octx, id, &extradata, |par| {
                par.codec_type = ffi::AVMediaType::AVMEDIA_TYPE_AUDIO;
                par.sample_rate = a.sample_rate as i32;
                par.frame_size = frame_size;
                #[allow(deprecated)]
                {
                    par.channels = a.channels as i32;
                    par.channel_layout = if a.channels == 1 {
                        ff::ChannelLayout::MONO.bits()
                    } else {
                        ff::ChannelLayout::STEREO.bits()
                    };
                }
            })
            .map_err(|e| err("adding audio", e))?;
            audio = Some((index, a.codec));
        }
        let mut opts = ff::Dictionary::new();
        if job.format == RecordFormat::Mp4 {
            opts.set("movflags", "frag_keyframe+empty_moov+default_base_moof");
        }
        // Every packet reaches the kernel at once: what was written survives a crash.
        opts.set("flush_packets", "1");
        octx.write_header_with(opts)
            .map_err(|e| err("writing the header", e))?;
        let track = |(index, codec): (usize, Codec), octx: &ff::format::context::Output| {
            let time_base = octx.stream(index).expect("added above").time_base();
            (Track { index, time_base }, codec)
        };
        let video = video.map(|v| track(v, &octx));
        let audio = audio.map(|a| track(a, &octx));
        Ok(OutFile {
            octx,
            relative,
            video,
            audio,
            config: config.clone(),
            base_ms,
            bytes: 0,
        })
    }

    /// Whether `config` has the same tracks and codec parameters as this file.
    fn same_tracks(&self, config: &StreamConfig) -> bool {
        self.config.video == config.video && self.config.audio == config.audio
    }

    fn due(&self, dts_ms: i64, job: &Job) -> bool {
        job.segment
            .is_some_and(|d| dts_ms - self.base_ms >= d.as_millis() as i64)
            || job.segment_bytes.is_some_and(|b| self.bytes >= b)
    }

    /// Writes one frame; returns its payload size (0 if it has no track here).
    fn write(&mut self, packet: &Packet, dts_ms: i64, pts_ms: i64) -> Result<u64, String> {
        let f = &packet.frame;
        let track = match f.track() {
            TrackKind::Video => self.video.as_ref(),
            TrackKind::Audio => self.audio.as_ref(),
        };
        let Some((track, codec)) = track else {
            return Ok(0);
        };
        if *codec != f.codec {
            return Ok(0);
        }
        let (dts, pts) = (dts_ms - self.base_ms, pts_ms - self.base_ms);
        if dts < 0 {
            return Ok(0); // audio from just before the file's first keyframe
        }
        let ms = ff::Rational::new(1, 1000);
        let mut pkt = ff::Packet::copy(&f.payload);
        pkt.set_stream(track.index);
        pkt.set_dts(Some(dts.rescale(ms, track.time_base)));
        pkt.set_pts(Some(pts.max(dts).rescale(ms, track.time_base)));
        if f.keyframe {
            pkt.set_flags(ff::packet::Flags::KEY);
        }
        pkt.write_interleaved(&mut self.octx)
            .map_err(|e| format!("{}: writing: {e}", self.relative))?;
        self.bytes += f.payload.len() as u64;
        Ok(f.payload.len() as u64)
    }
}

/// Adds a stream (time base 1 ms, as written) of codec `id` with `extradata`; `fill` sets
/// the rest of its codec parameters. Returns the stream's index.
fn add_stream(
    octx: &mut ff::format::context::Output,
    id: ffi::AVCodecID,
    extradata: &[u8],
    fill: impl FnOnce(&mut ffi::AVCodecParameters),
) -> Result<usize, ff::Error> {
    let mut st = octx.add_stream(None::<ff::Codec>)?;
    st.set_time_base((1, 1000));
    // SAFETY: a fresh stream's codecpar (allocated by FFmpeg, unset extradata), filled
    // before the header is written.
    unsafe {
        let par = &mut *(*st.as_mut_ptr()).codecpar;
        par.codec_id = id;
        fill(par);
        if !extradata.is_empty() {
            let padded = extradata.len() + ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
            let buf = ffi::av_mallocz(padded) as *mut u8;
            if buf.is_null() {
                return Err(ff::Error::Other {
                    errno: ff::util::error::ENOMEM,
                });
            }
            std::ptr::copy_nonoverlapping(extradata.as_ptr(), buf, extradata.len());
            par.extradata = buf;
            par.extradata_size = extradata.len() as i32;
        }
    }
    Ok(st.index())
}

/// The Opus identification header (RFC 7845 §5.1) Matroska carries as codec private data.
fn opus_head(channels: u8) -> Vec<u8> {
    let mut h = b"OpusHead".to_vec();
    h.push(1); // version
    h.push(channels.max(1));
    h.extend_from_slice(&312u16.to_le_bytes()); // pre-skip (libopus's usual)
    h.extend_from_slice(&48_000u32.to_le_bytes()); // input sample rate
    h.extend_from_slice(&0i16.to_le_bytes()); // output gain
    h.push(0); // channel mapping family 0 (mono/stereo)
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_head_is_19_bytes() {
        let h = opus_head(2);
        assert_eq!(h.len(), 19);
        assert_eq!(&h[..8], b"OpusHead");
        assert_eq!(h[9], 2);
    }
}
