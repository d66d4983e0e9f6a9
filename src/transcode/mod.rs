//! Audio bridging between RTMP (AAC) and WebRTC (Opus) with FFmpeg (ffmpeg-next).
//!
//! [`AudioTranscoder`] is compute only: frames in, frames out, no I/O and no clock. It
//! decodes (AAC is fed as ADTS so no decoder extradata is needed), resamples to what the
//! encoder takes, cuts the samples into the encoder's frame size, and encodes. Output
//! timestamps follow the input's: they start at the first input frame and are re-anchored
//! whenever the input jumps (a publisher gap or a consumer skipping to a keyframe).
//!
//! A protocol-layer part, below the hub: it knows frames and codecs only. The driver that
//! runs one transcoder per stream per node, only while some consumer needs the other codec,
//! is the audio bridge, a hub subscriber above this layer; nothing here refers to it.

use bytes::Bytes;
use ff::codec::{self, Context};
use ff::format::sample::{Sample, Type as SampleType};
use ff::software::resampling;
use ff::ChannelLayout;
use ffmpeg_next as ff;

use crate::media::{aac, avc, AudioConfig, Codec, Frame, Timebase, VideoConfig};

pub mod mix;

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("no {0} codec in this FFmpeg build")]
    MissingCodec(&'static str),
    #[error("cannot bridge {from:?} to {to:?}")]
    Unsupported { from: Codec, to: Codec },
    #[error("bad AudioSpecificConfig: {0}")]
    Config(#[from] aac::AacError),
    #[error("ffmpeg: {0}")]
    Ffmpeg(#[from] ff::Error),
    #[error("the transcoder panicked")]
    Panicked,
}

/// Input gaps larger than this re-anchor the output timestamps.
const RESYNC_MS: i64 = 200;

pub struct AudioTranscoder {
    from: Codec,
    adts: Option<aac::AacConfig>,
    decoder: ff::decoder::Audio,
    resampler: Option<resampling::Context>,
    out: AudioEncoder,
}

/// An AAC or Opus encoder of 48 kHz stereo with its sample FIFO: samples in (whatever the
/// count), whole encoder frames out, timestamped on the output's sample clock.
pub(crate) struct AudioEncoder {
    to: Codec,
    encoder: ff::encoder::Audio,
    out_format: Sample,
    out_layout: ChannelLayout,
    out_rate: u32,
    out_channels: u16,
    frame_size: usize,
    /// Samples waiting for a whole encoder frame, one buffer per plane.
    fifo: Vec<Vec<u8>>,
    fifo_samples: usize,
    /// Output time (in `out_rate` samples) of the first sample in the FIFO.
    next_pts: Option<i64>,
    output: AudioConfig,
}

/// A decoder for `input` (AAC, fed as ADTS: its config is returned; or Opus).
pub(crate) fn audio_decoder(
    input: &AudioConfig,
) -> Result<(ff::decoder::Audio, Option<aac::AacConfig>), TranscodeError> {
    ff::init()?;
    let (dec_id, adts) = match input.codec {
        Codec::Aac => (
            codec::Id::AAC,
            Some(aac::parse_audio_specific_config(&input.specific)?),
        ),
        Codec::Opus => (codec::Id::OPUS, None),
        other => {
            return Err(TranscodeError::Unsupported {
                from: other,
                to: Codec::Aac,
            })
        }
    };
    let dec_codec = ff::decoder::find(dec_id).ok_or(TranscodeError::MissingCodec("decoder"))?;
    let mut dec_ctx = Context::new_with_codec(dec_codec);
    if input.codec == Codec::Opus {
        // Opus carries no in-band configuration: say what WebRTC sends.
        // SAFETY: the context is not opened yet and these are plain fields of it.
        unsafe {
            let p = dec_ctx.as_mut_ptr();
            (*p).sample_rate = 48_000;
            #[allow(deprecated)]
            {
                (*p).channels = 2;
                (*p).channel_layout = ChannelLayout::STEREO.bits();
            }
        }
    }
    Ok((dec_ctx.decoder().audio()?, adts))
}

/// An encoded audio frame's packet for the decoder (AAC gets its ADTS header).
pub(crate) fn audio_packet(adts: Option<&aac::AacConfig>, payload: &[u8]) -> ff::Packet {
    match adts {
        Some(cfg) => ff::Packet::copy(&with_adts(cfg, payload)),
        None => ff::Packet::copy(payload),
    }
}

impl AudioTranscoder {
    /// A transcoder from `input`'s codec to `to` (AAC → Opus or Opus → AAC).
    pub fn new(input: &AudioConfig, to: Codec) -> Result<AudioTranscoder, TranscodeError> {
        if !matches!(
            (input.codec, to),
            (Codec::Aac, Codec::Opus) | (Codec::Opus, Codec::Aac)
        ) {
            return Err(TranscodeError::Unsupported {
                from: input.codec,
                to,
            });
        }
        let (decoder, adts) = audio_decoder(input)?;
        Ok(AudioTranscoder {
            from: input.codec,
            adts,
            decoder,
            resampler: None,
            out: AudioEncoder::new(to)?,
        })
    }

    /// The configuration of the output track.
    pub fn output_config(&self) -> &AudioConfig {
        &self.out.output
    }

    /// Transcodes one input frame; returns the output frames it completed.
    pub fn push(&mut self, frame: &Frame) -> Result<Vec<Frame>, TranscodeError> {
        if frame.codec != self.from {
            return Ok(vec![]);
        }
        let in_pts = frame
            .timebase
            .rescale(frame.pts, Timebase(self.out.out_rate));
        self.out.anchor(in_pts);
        self.decoder
            .send_packet(&audio_packet(self.adts.as_ref(), &frame.payload))?;
        let mut decoded = ff::frame::Audio::empty();
        while self.decoder.receive_frame(&mut decoded).is_ok() {
            if self.resampler.is_none() {
                self.resampler = Some(self.out.resampler_for(&decoded)?);
            }
            if let Some(r) = self.resampler.as_mut() {
                let mut out = ff::frame::Audio::empty();
                r.run(&decoded, &mut out)?;
                self.out.queue_frame(&out);
            }
        }
        self.out.encode_whole_frames()
    }
}

impl AudioEncoder {
    /// An encoder of 48 kHz stereo to `to` (AAC-LC at 128 kb/s, or Opus at 64 kb/s).
    pub(crate) fn new(to: Codec) -> Result<AudioEncoder, TranscodeError> {
        ff::init()?;
        let (enc_codec, out_format, out_rate, bitrate) = match to {
            Codec::Opus => (
                ff::encoder::find_by_name("libopus")
                    .or_else(|| ff::encoder::find(codec::Id::OPUS))
                    .ok_or(TranscodeError::MissingCodec("opus encoder"))?,
                Sample::F32(SampleType::Packed),
                48_000,
                64_000,
            ),
            _ => (
                ff::encoder::find(codec::Id::AAC)
                    .ok_or(TranscodeError::MissingCodec("aac encoder"))?,
                Sample::F32(SampleType::Planar),
                48_000,
                128_000,
            ),
        };
        let out_layout = ChannelLayout::STEREO;
        let mut enc = Context::new_with_codec(enc_codec).encoder().audio()?;
        enc.set_rate(out_rate as i32);
        enc.set_channel_layout(out_layout);
        #[allow(deprecated)]
        enc.set_channels(2);
        enc.set_format(out_format);
        enc.set_bit_rate(bitrate);
        enc.set_time_base((1, out_rate as i32));
        let encoder = enc.open_as(enc_codec)?;
        let frame_size = match encoder.frame_size() {
            0 => 960,
            n => n as usize,
        };
        let specific = if to == Codec::Aac {
            // AAC-LC, 48 kHz (index 3), stereo.
            Bytes::from_static(&[0x11, 0x90])
        } else {
            Bytes::new()
        };
        Ok(AudioEncoder {
            to,
            encoder,
            out_format,
            out_layout,
            out_rate,
            out_channels: 2,
            frame_size,
            fifo: Vec::new(),
            fifo_samples: 0,
            next_pts: None,
            output: AudioConfig {
                codec: to,
                specific,
                sample_rate: out_rate,
                channels: 2,
            },
        })
    }

    pub(crate) fn output_config(&self) -> &AudioConfig {
        &self.output
    }

    /// Anchors (or re-anchors, after a jump) the output timeline on input time `in_pts`
    /// (in output samples).
    pub(crate) fn anchor(&mut self, in_pts: i64) {
        let expected = self.next_pts.map(|p| p + self.fifo_samples as i64);
        let jump =
            expected.is_some_and(|e| (e - in_pts).abs() > RESYNC_MS * self.out_rate as i64 / 1000);
        if self.next_pts.is_none() || jump {
            self.next_pts = Some(in_pts - self.fifo_samples as i64);
        }
    }

    /// A resampler from `decoded`'s format to the encoder's.
    pub(crate) fn resampler_for(
        &self,
        decoded: &ff::frame::Audio,
    ) -> Result<resampling::Context, TranscodeError> {
        let layout = match decoded.channel_layout() {
            l if l.is_empty() => ChannelLayout::default(decoded.channels() as i32),
            l => l,
        };
        Ok(resampling::Context::get(
            decoded.format(),
            layout,
            decoded.rate(),
            self.out_format,
            self.out_layout,
            self.out_rate,
        )?)
    }

    /// Queues a frame already in the encoder's format.
    pub(crate) fn queue_frame(&mut self, out: &ff::frame::Audio) {
        let samples = out.samples();
        if samples == 0 {
            return;
        }
        let bytes = self.plane_bytes(samples);
        let planes = out.planes();
        if self.fifo.len() != planes {
            self.fifo = vec![Vec::new(); planes];
        }
        for (i, plane) in self.fifo.iter_mut().enumerate() {
            plane.extend_from_slice(&out.data(i)[..bytes]);
        }
        self.fifo_samples += samples;
    }

    /// Queues interleaved stereo f32 samples (converted to the encoder's layout).
    pub(crate) fn queue_interleaved(&mut self, samples: &[f32]) {
        let n = samples.len() / 2;
        if n == 0 {
            return;
        }
        let planar = self.out_format.is_planar();
        let planes = if planar { 2 } else { 1 };
        if self.fifo.len() != planes {
            self.fifo = vec![Vec::new(); planes];
        }
        if planar {
            for (c, plane) in self.fifo.iter_mut().enumerate() {
                plane.extend(
                    samples
                        .iter()
                        .skip(c)
                        .step_by(2)
                        .flat_map(|v| v.to_ne_bytes()),
                );
            }
        } else {
            self.fifo[0].extend(samples[..n * 2].iter().flat_map(|v| v.to_ne_bytes()));
        }
        self.fifo_samples += n;
    }

    /// Bytes per plane for `samples` samples of the output format.
    fn plane_bytes(&self, samples: usize) -> usize {
        let per_sample = self.out_format.bytes();
        if self.out_format.is_planar() {
            samples * per_sample
        } else {
            samples * per_sample * self.out_channels as usize
        }
    }

    pub(crate) fn encode_whole_frames(&mut self) -> Result<Vec<Frame>, TranscodeError> {
        let mut out = Vec::new();
        while self.fifo_samples >= self.frame_size {
            let mut f = ff::frame::Audio::new(self.out_format, self.frame_size, self.out_layout);
            f.set_rate(self.out_rate);
            let bytes = self.plane_bytes(self.frame_size);
            for (i, plane) in self.fifo.iter_mut().enumerate() {
                f.data_mut(i)[..bytes].copy_from_slice(&plane[..bytes]);
                plane.drain(..bytes);
            }
            self.fifo_samples -= self.frame_size;
            let pts = self.next_pts.unwrap_or(0);
            f.set_pts(Some(pts));
            self.next_pts = Some(pts + self.frame_size as i64);
            self.encoder.send_frame(&f)?;
            let mut packet = ff::Packet::empty();
            while self.encoder.receive_packet(&mut packet).is_ok() {
                let Some(data) = packet.data() else { continue };
                let pts = packet.pts().unwrap_or(pts);
                out.push(Frame {
                    codec: self.to,
                    dts: pts,
                    pts,
                    timebase: Timebase(self.out_rate),
                    keyframe: true,
                    payload: Bytes::copy_from_slice(data),
                });
            }
        }
        Ok(out)
    }
}

/// Re-encodes video to H.264 without B-frames with libx264. Two uses:
///
/// * VP8 → H.264, for egress that asks for it explicitly (`transcode_video`);
/// * H.264 with B-frames → H.264 without, the WebRTC rendition: browsers' WebRTC decoders
///   output frames in decode order, so a stream whose frames are reordered (OBS's and most
///   hardware encoders' defaults) barely plays. The decoder reorders; the encoder keeps the
///   source's size, profile, GOP (an input keyframe forces an IDR) and, as far as it was
///   measured, bitrate.
///
/// Compute only, like [`AudioTranscoder`]. The encoder is tuned for latency (no B-frames, no
/// lookahead, no scene-cut keyframes), so each decoded frame comes out at once with
/// `dts = pts`.
pub struct VideoTranscoder {
    from: Codec,
    decoder: ff::decoder::Video,
    encoder: Option<ff::encoder::Video>,
    output: Option<VideoConfig>,
    size: (u32, u32),
    /// The x264 profile matching the source's (H.264 input only).
    profile: Option<&'static str>,
    /// The bitrate to aim at (bits per second), when the caller knows the source's.
    bitrate: Option<u64>,
    /// The last input dts and the typical spacing of input frames (ms), for the frame rate.
    last_dts: Option<i64>,
    frame_ms: Option<i64>,
    /// The next decoded frame is encoded as an IDR (a viewer asked for a keyframe).
    force_keyframe: bool,
    /// The last presentation time sent to the encoder: output time only moves forward.
    last_pts: Option<i64>,
}

impl VideoTranscoder {
    /// A transcoder for `input` (VP8 or H.264). `bitrate` (bits per second) is the source's
    /// measured bitrate, when known; otherwise one is chosen from the picture size.
    pub fn new(
        input: &VideoConfig,
        bitrate: Option<u64>,
    ) -> Result<VideoTranscoder, TranscodeError> {
        ff::init()?;
        let unsupported = TranscodeError::Unsupported {
            from: input.codec,
            to: Codec::H264,
        };
        let profile = match input.codec {
            Codec::Vp8 => None,
            Codec::H264 => {
                let avc = avc::parse_decoder_config(&input.record)
                    .map_err(|_| TranscodeError::Ffmpeg(ff::Error::InvalidData))?;
                Some(x264_profile(avc.profile))
            }
            _ => return Err(unsupported),
        };
        let decoder = video_decoder(input)?;
        Ok(VideoTranscoder {
            from: input.codec,
            decoder,
            encoder: None,
            output: None,
            size: (0, 0),
            profile,
            bitrate,
            last_dts: None,
            frame_ms: None,
            force_keyframe: false,
            last_pts: None,
        })
    }

    /// The H.264 configuration, once the first keyframe is encoded.
    pub fn output_config(&self) -> Option<&VideoConfig> {
        self.output.as_ref()
    }

    /// Makes the next frame out an IDR: everything is decoded here, so a consumer's
    /// keyframe request need not wait for the source's next keyframe.
    pub fn force_keyframe(&mut self) {
        self.force_keyframe = true;
    }

    /// Transcodes one input frame; returns the H.264 frames it produced (in presentation
    /// order, which is now also decode order).
    pub fn push(&mut self, frame: &Frame) -> Result<Vec<Frame>, TranscodeError> {
        if frame.codec != self.from {
            return Ok(vec![]);
        }
        let dts = frame.dts_ms();
        if let Some(last) = self.last_dts.replace(dts) {
            let step = dts - last;
            if (1..=1000).contains(&step) {
                // The smallest spacing seen is the frame interval (gaps only make it larger).
                self.frame_ms = Some(self.frame_ms.map_or(step, |f| f.min(step)));
            }
        }
        let mut packet = ff::Packet::copy(&frame.payload);
        packet.set_pts(Some(frame.pts_ms()));
        packet.set_dts(Some(dts));
        if frame.keyframe {
            packet.set_flags(ff::packet::Flags::KEY);
        }
        self.decoder.send_packet(&packet)?;
        let mut out = Vec::new();
        let mut decoded = ff::frame::Video::empty();
        while self.decoder.receive_frame(&mut decoded).is_ok() {
            let size = (decoded.width(), decoded.height());
            if self.encoder.is_none() || size != self.size {
                let fps = self.frame_ms.map_or(30, |ms| (1000 / ms.max(1)) as i32);
                let bitrate = self
                    .bitrate
                    .unwrap_or((size.0 as u64 * size.1 as u64 * 4).clamp(500_000, 8_000_000));
                let opened = open_x264(size, decoded.format(), fps, bitrate, self.profile)?;
                self.encoder = Some(opened);
                self.size = size;
            }
            let Some(encoder) = self.encoder.as_mut() else {
                continue;
            };
            let pts = decoded
                .timestamp()
                .or(decoded.pts())
                .unwrap_or(frame.pts_ms());
            if self.last_pts.is_some_and(|last| pts <= last) {
                // Input whose presentation times do not increase (a broken or hostile
                // publisher): the frame is dropped, so output time never goes back.
                continue;
            }
            self.last_pts = Some(pts);
            let key = decoded.is_key()
                || (self.from == Codec::Vp8 && frame.keyframe)
                || std::mem::take(&mut self.force_keyframe);
            decoded.set_pts(Some(pts));
            decoded.set_kind(if key {
                ff::picture::Type::I
            } else {
                ff::picture::Type::None
            });
            encoder.send_frame(&decoded)?;
            out.extend(x264_frames(encoder, size, &mut self.output, pts));
        }
        Ok(out)
    }
}

/// A decoder for `input` (H.264 with its decoder configuration, or VP8), its packets on a
/// millisecond clock.
pub(crate) fn video_decoder(input: &VideoConfig) -> Result<ff::decoder::Video, TranscodeError> {
    ff::init()?;
    let id = match input.codec {
        Codec::Vp8 => codec::Id::VP8,
        Codec::H264 => codec::Id::H264,
        other => {
            return Err(TranscodeError::Unsupported {
                from: other,
                to: Codec::H264,
            })
        }
    };
    let dec = ff::decoder::find(id).ok_or(TranscodeError::MissingCodec("video decoder"))?;
    let mut ctx = Context::new_with_codec(dec);
    if input.codec == Codec::H264 {
        set_extradata(&mut ctx, &input.record)?;
    }
    // SAFETY: the context is not opened yet; pkt_timebase is a plain field of it.
    unsafe {
        (*ctx.as_mut_ptr()).pkt_timebase = ff::ffi::AVRational { num: 1, den: 1000 };
    }
    Ok(ctx.decoder().video()?)
}

/// The H.264 frames libx264 has ready (AVCC, millisecond times, `pts` when a packet has
/// none); `output` becomes the stream's configuration once an SPS and PPS are seen, and no
/// frame is returned before that.
pub(crate) fn x264_frames(
    encoder: &mut ff::encoder::Video,
    size: (u32, u32),
    output: &mut Option<VideoConfig>,
    pts: i64,
) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut packet = ff::Packet::empty();
    while encoder.receive_packet(&mut packet).is_ok() {
        let Some(data) = packet.data() else { continue };
        let avc::AccessUnit { avcc, sps, pps, .. } = avc::access_unit(avc::annexb_nalus(data));
        if let (Some(sps), Some(pps)) = (sps, pps) {
            let record = Bytes::from(avc::decoder_config_record(&sps, &pps));
            if output.as_ref().is_none_or(|o| o.record != record) {
                *output = Some(VideoConfig {
                    codec: Codec::H264,
                    record,
                    width: size.0,
                    height: size.1,
                });
            }
        }
        if output.is_none() || avcc.is_empty() {
            continue;
        }
        let pts = packet.pts().unwrap_or(pts);
        out.push(Frame {
            codec: Codec::H264,
            dts: pts,
            pts,
            timebase: Timebase::MILLIS,
            keyframe: packet.is_key(),
            payload: Bytes::from(avcc),
        });
    }
    out
}

/// The x264 profile for a source's `profile_idc`: the rendition keeps the source's, so the
/// WHEP answer names what the viewer really gets.
fn x264_profile(profile_idc: u8) -> &'static str {
    match profile_idc {
        66 => "baseline",
        77 | 88 => "main",
        _ => "high",
    }
}

/// Gives an unopened decoder its codec extradata (an AVCDecoderConfigurationRecord), so it
/// reads length-prefixed NAL units.
fn set_extradata(ctx: &mut Context, data: &[u8]) -> Result<(), TranscodeError> {
    let padding = ff::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
    // SAFETY: a fresh zeroed buffer of the data's size plus FFmpeg's padding, filled with the
    // data and owned by the context from here on (avcodec_free_context frees it).
    unsafe {
        let buf = ff::ffi::av_mallocz(data.len() + padding) as *mut u8;
        if buf.is_null() {
            return Err(TranscodeError::Ffmpeg(ff::Error::Other {
                errno: ff::util::error::ENOMEM,
            }));
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len());
        let p = ctx.as_mut_ptr();
        (*p).extradata = buf;
        (*p).extradata_size = data.len() as i32;
    }
    Ok(())
}

pub(crate) fn open_x264(
    (width, height): (u32, u32),
    format: ff::format::Pixel,
    fps: i32,
    bitrate: u64,
    profile: Option<&str>,
) -> Result<ff::encoder::Video, TranscodeError> {
    if format != ff::format::Pixel::YUV420P && format != ff::format::Pixel::YUVJ420P {
        return Err(TranscodeError::Ffmpeg(ff::Error::InvalidData));
    }
    let codec =
        ff::encoder::find_by_name("libx264").ok_or(TranscodeError::MissingCodec("libx264"))?;
    let mut enc = Context::new_with_codec(codec).encoder().video()?;
    enc.set_width(width);
    enc.set_height(height);
    enc.set_format(ff::format::Pixel::YUV420P);
    enc.set_time_base((1, 1000));
    enc.set_max_b_frames(0);
    // Keyframes follow the source's (forced IDRs); this only bounds a source without any.
    enc.set_gop(fps.clamp(1, 120) as u32 * 10);
    enc.set_bit_rate(bitrate as usize);
    // A one-second VBV keeps each second near the target, as a live viewer's link needs.
    enc.set_max_bit_rate(bitrate as usize);
    // SAFETY: not opened yet; these are plain fields.
    unsafe {
        let p = enc.as_mut_ptr();
        (*p).rc_buffer_size = bitrate.min(i32::MAX as u64) as i32;
        (*p).framerate = ff::ffi::AVRational {
            num: fps.clamp(1, 120),
            den: 1,
        };
    }
    let mut opts = ff::Dictionary::new();
    opts.set("preset", "veryfast");
    opts.set("tune", "zerolatency");
    opts.set("forced-idr", "1");
    opts.set("x264-params", "scenecut=0");
    if let Some(profile) = profile {
        opts.set("profile", profile);
    }
    Ok(enc.open_as_with(codec, opts)?)
}

/// A raw AAC frame with an ADTS header in front (so the decoder needs no extradata).
fn with_adts(cfg: &aac::AacConfig, raw: &[u8]) -> Vec<u8> {
    const RATES: [u32; 13] = [
        96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
    ];
    let freq = RATES
        .iter()
        .position(|r| *r == cfg.sample_rate)
        .unwrap_or(4) as u8;
    let profile = cfg.object_type.clamp(1, 4) - 1;
    let chan = cfg.channels.min(7);
    let len = raw.len() + 7;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&[
        0xff,
        0xf1,
        (profile << 6) | (freq << 2) | (chan >> 2),
        ((chan & 3) << 6) | ((len >> 11) as u8 & 0x03),
        (len >> 3) as u8,
        (((len & 7) as u8) << 5) | 0x1f,
        0xfc,
    ]);
    out.extend_from_slice(raw);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adts_header_layout() {
        let cfg = aac::AacConfig {
            object_type: 2,
            sample_rate: 44100,
            channels: 2,
        };
        let h = with_adts(&cfg, &[0; 100]);
        assert_eq!(&h[..2], &[0xff, 0xf1]);
        assert_eq!(h[2], (1 << 6) | (4 << 2)); // LC, 44.1 kHz
        let len = (((h[3] & 3) as usize) << 11) | ((h[4] as usize) << 3) | ((h[5] >> 5) as usize);
        assert_eq!(len, 107);
    }

    /// Synthetic audio through both bridges: AAC (encoded here by FFmpeg) → Opus → AAC.
    #[test]
    fn aac_to_opus_and_back_keeps_duration_and_timing() {
        // Make AAC input: encode 1 s of a 440 Hz tone with FFmpeg's AAC encoder.
        ff::init().unwrap();
        let enc_codec = ff::encoder::find(codec::Id::AAC).unwrap();
        let mut enc = Context::new_with_codec(enc_codec)
            .encoder()
            .audio()
            .unwrap();
        enc.set_rate(44100);
        enc.set_channel_layout(ChannelLayout::MONO);
        #[allow(deprecated)]
        enc.set_channels(1);
        enc.set_format(Sample::F32(SampleType::Planar));
        enc.set_bit_rate(64_000);
        enc.set_time_base((1, 44100));
        let mut enc = enc.open_as(enc_codec).unwrap();
        let mut aac_frames = vec![];
        for i in 0..44 {
            let mut f =
                ff::frame::Audio::new(Sample::F32(SampleType::Planar), 1024, ChannelLayout::MONO);
            f.set_rate(44100);
            for (j, s) in f.plane_mut::<f32>(0).iter_mut().enumerate() {
                let t = (i * 1024 + j) as f32 / 44100.0;
                *s = (t * 440.0 * std::f32::consts::TAU).sin() * 0.3;
            }
            f.set_pts(Some(i as i64 * 1024));
            enc.send_frame(&f).unwrap();
            let mut p = ff::Packet::empty();
            while enc.receive_packet(&mut p).is_ok() {
                aac_frames.push(p.data().unwrap().to_vec());
            }
        }
        assert!(aac_frames.len() > 30);
        let input = AudioConfig {
            codec: Codec::Aac,
            specific: Bytes::from_static(&[0x12, 0x08]), // LC 44.1 kHz mono
            sample_rate: 44100,
            channels: 1,
        };
        let mut to_opus = AudioTranscoder::new(&input, Codec::Opus).unwrap();
        let mut opus = vec![];
        for (i, data) in aac_frames.iter().enumerate() {
            let ms = 5000 + (i as i64 * 1024 * 1000 / 44100);
            opus.extend(
                to_opus
                    .push(&Frame {
                        codec: Codec::Aac,
                        dts: ms,
                        pts: ms,
                        timebase: Timebase::MILLIS,
                        keyframe: true,
                        payload: Bytes::from(data.clone()),
                    })
                    .unwrap(),
            );
        }
        // ~1 s of input → ~45-50 Opus frames of 20 ms, starting near 5 s, monotonic.
        assert!(opus.len() >= 40, "{} opus frames", opus.len());
        assert!(opus
            .iter()
            .all(|f| f.codec == Codec::Opus && !f.payload.is_empty()));
        let first_ms = opus[0].pts_ms();
        assert!(
            (4900..=5100).contains(&first_ms),
            "first opus frame at {first_ms} ms"
        );
        assert!(opus.windows(2).all(|w| w[1].pts > w[0].pts));

        let mut to_aac = AudioTranscoder::new(to_opus.output_config(), Codec::Aac).unwrap();
        let mut back = vec![];
        for f in &opus {
            back.extend(to_aac.push(f).unwrap());
        }
        assert!(back.len() >= 35, "{} aac frames", back.len());
        assert_eq!(to_aac.output_config().sample_rate, 48_000);
        let spread = back.last().unwrap().pts_ms() - back[0].pts_ms();
        assert!(
            (700..=1100).contains(&spread),
            "AAC output spans {spread} ms"
        );
    }

    #[test]
    fn refuses_unsupported_pairs() {
        let input = AudioConfig {
            codec: Codec::Aac,
            specific: Bytes::from_static(&[0x12, 0x10]),
            sample_rate: 44100,
            channels: 2,
        };
        assert!(matches!(
            AudioTranscoder::new(&input, Codec::Aac),
            Err(TranscodeError::Unsupported { .. })
        ));
    }

    /// H.264 with B-frames, as an OBS-like encoder makes it (x264, `profile`, 2 B-frames,
    /// 15-frame GOP): the configuration and the frames in decode order, timestamps in ms.
    fn bframe_h264(profile: &str, frames: i64) -> (VideoConfig, Vec<Frame>) {
        ff::init().unwrap();
        let codec = ff::encoder::find_by_name("libx264").unwrap();
        let mut enc = Context::new_with_codec(codec).encoder().video().unwrap();
        enc.set_width(160);
        enc.set_height(96);
        enc.set_format(ff::format::Pixel::YUV420P);
        enc.set_time_base((1, 1000));
        enc.set_max_b_frames(2);
        enc.set_gop(15);
        enc.set_bit_rate(300_000);
        let mut opts = ff::Dictionary::new();
        opts.set("preset", "veryfast");
        opts.set("profile", profile);
        opts.set("x264-params", "scenecut=0:b-adapt=0:bframes=2");
        let mut enc = enc.open_as_with(codec, opts).unwrap();
        let mut packets = vec![];
        let take = |enc: &mut ff::encoder::Video, packets: &mut Vec<(i64, i64, bool, Vec<u8>)>| {
            let mut p = ff::Packet::empty();
            while enc.receive_packet(&mut p).is_ok() {
                packets.push((
                    p.dts().unwrap(),
                    p.pts().unwrap(),
                    p.is_key(),
                    p.data().unwrap().to_vec(),
                ));
            }
        };
        for i in 0..frames {
            let mut f = ff::frame::Video::new(ff::format::Pixel::YUV420P, 160, 96);
            for (j, b) in f.data_mut(0).iter_mut().enumerate() {
                *b = ((j as i64 + i * 7) % 251) as u8; // moving content
            }
            f.set_pts(Some(i * 33));
            enc.send_frame(&f).unwrap();
            take(&mut enc, &mut packets);
        }
        enc.send_eof().unwrap();
        take(&mut enc, &mut packets);
        let mut record = None;
        let frames = packets
            .into_iter()
            .map(|(dts, pts, key, data)| {
                let au = avc::access_unit(avc::annexb_nalus(&data));
                if let (Some(sps), Some(pps), None) = (au.sps, au.pps, &record) {
                    record = Some(Bytes::from(avc::decoder_config_record(&sps, &pps)));
                }
                Frame {
                    codec: Codec::H264,
                    dts,
                    pts,
                    timebase: Timebase::MILLIS,
                    keyframe: key,
                    payload: Bytes::from(au.avcc),
                }
            })
            .collect();
        let config = VideoConfig {
            codec: Codec::H264,
            record: record.unwrap(),
            width: 160,
            height: 96,
        };
        (config, frames)
    }

    #[test]
    fn a_keyframe_can_be_forced_between_the_sources() {
        let (config, input) = bframe_h264("main", 30);
        let mut t = VideoTranscoder::new(&config, Some(300_000)).unwrap();
        let mut out = vec![];
        for (i, f) in input.iter().enumerate() {
            if i == 20 {
                t.force_keyframe();
            }
            out.extend(t.push(f).unwrap());
        }
        let keys: Vec<i64> = out.iter().filter(|f| f.keyframe).map(|f| f.pts).collect();
        // The source's keyframes (every 15 frames = 495 ms) and one more, asked for.
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(
            keys.iter().all(|k| *k == 0 || *k == 495 || *k > 495),
            "{keys:?}"
        );
    }

    #[test]
    fn bframes_are_removed_keeping_profile_gop_and_every_frame() {
        for (profile, idc) in [("main", 77), ("high", 100)] {
            let (config, input) = bframe_h264(profile, 60);
            assert!(
                input.iter().any(|f| f.pts != f.dts),
                "the input has B-frames"
            );
            let mut t = VideoTranscoder::new(&config, Some(300_000)).unwrap();
            let mut out = vec![];
            for f in &input {
                out.extend(t.push(f).unwrap());
            }
            // The decoder holds back its reorder depth (2 frames) until more input comes.
            assert!(
                out.len() >= input.len() - 3,
                "{} of {}",
                out.len(),
                input.len()
            );
            assert!(out.iter().all(|f| f.pts == f.dts), "no reordering left");
            assert!(out.windows(2).all(|w| w[1].dts > w[0].dts), "in order");
            // Every source frame, at its presentation time, in order.
            let mut shown: Vec<i64> = input.iter().map(|f| f.pts).collect();
            shown.sort();
            let got: Vec<i64> = out.iter().map(|f| f.pts).collect();
            assert_eq!(got, shown[..got.len()]);
            // Keyframes where the source's are (every 15 frames = 495 ms).
            let keys: Vec<i64> = out.iter().filter(|f| f.keyframe).map(|f| f.pts).collect();
            let source_keys: Vec<i64> = input
                .iter()
                .filter(|f| f.keyframe && f.pts <= *got.last().unwrap())
                .map(|f| f.pts)
                .collect();
            assert_eq!(keys, source_keys);
            let record = &t.output_config().unwrap().record;
            let avc = avc::parse_decoder_config(record).unwrap();
            assert_eq!(avc.profile, idc, "{profile}: the source's profile is kept");
            assert_eq!((avc.width, avc.height), (160, 96));
        }
    }
}
