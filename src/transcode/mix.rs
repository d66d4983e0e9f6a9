//! A room as one stream: every participant's video decoded and composed onto one picture
//! (the active speaker alone, or a grid of up to four), every participant's audio decoded
//! and mixed, both encoded once (H.264 with libx264, AAC).
//!
//! Compute only, like the transcoders: frames in, frames out. The caller's clock drives
//! the output: [`Mixer::render`] at `now` makes the picture due then and the audio up to
//! then, from each participant's latest picture and queued samples. A participant whose
//! audio runs dry is silent for the rest of that window; one whose queue grows past
//! [`MAX_QUEUED_MS`] loses its oldest samples, so the mix never lags behind real time.

use std::collections::{BTreeMap, VecDeque};

use ff::software::resampling;
use ffmpeg_next as ff;

use super::{
    audio_decoder, audio_packet, open_x264, video_decoder, x264_frames, AudioEncoder,
    TranscodeError,
};
use crate::media::{aac, AudioConfig, Codec, Frame, StreamConfig, VideoConfig};

/// What each participant's audio may hold before its oldest samples are dropped.
pub const MAX_QUEUED_MS: usize = 300;
const RATE: usize = 48_000;

/// How the participants are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The active speaker fills the picture (the first participant when nobody speaks).
    Speaker,
    /// Up to four participants: side by side for two, two by two for three or four.
    Grid,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "speaker" => Some(Layout::Speaker),
            "grid" => Some(Layout::Grid),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Speaker => "speaker",
            Layout::Grid => "grid",
        }
    }
}

/// The mixed stream's shape.
#[derive(Clone, Copy, Debug)]
pub struct MixSettings {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub video_bps: u64,
    pub layout: Layout,
}

impl Default for MixSettings {
    fn default() -> Self {
        MixSettings {
            width: 640,
            height: 360,
            fps: 15,
            video_bps: 800_000,
            layout: Layout::Grid,
        }
    }
}

/// A decoded picture (YUV 4:2:0, tightly packed planes).
struct Picture {
    width: usize,
    height: usize,
    planes: [Vec<u8>; 3],
}

struct Input {
    video_config: Option<VideoConfig>,
    video: Option<ff::decoder::Video>,
    picture: Option<Picture>,
    audio_config: Option<AudioConfig>,
    audio: Option<(ff::decoder::Audio, Option<aac::AacConfig>)>,
    resampler: Option<resampling::Context>,
    /// Interleaved stereo f32 at 48 kHz.
    samples: VecDeque<f32>,
}

/// One room's mixer (see the module doc).
pub struct Mixer {
    settings: MixSettings,
    inputs: BTreeMap<String, Input>,
    encoder: Option<ff::encoder::Video>,
    video_output: Option<VideoConfig>,
    audio: AudioEncoder,
    /// Audio samples (per channel) mixed so far.
    mixed: usize,
    last_video_ms: Option<i64>,
    force_keyframe: bool,
    /// When the last keyframe was asked for (one every [`KEYFRAME_EVERY_MS`]).
    last_keyframe_ms: Option<i64>,
}

/// The mix's GOP: a keyframe every 2 s, so a viewer or a CDN joining mid-stream waits
/// little, and recordings split near where asked.
const KEYFRAME_EVERY_MS: i64 = 2000;

impl Mixer {
    pub fn new(settings: MixSettings) -> Result<Mixer, TranscodeError> {
        let audio = AudioEncoder::new(Codec::Aac)?;
        Ok(Mixer {
            settings,
            inputs: BTreeMap::new(),
            encoder: None,
            video_output: None,
            audio,
            mixed: 0,
            last_video_ms: None,
            force_keyframe: false,
            last_keyframe_ms: None,
        })
    }

    /// The output's configuration, once a picture was encoded.
    pub fn output_config(&self) -> Option<StreamConfig> {
        Some(StreamConfig {
            video: Some(self.video_output.clone()?),
            audio: Some(self.audio.output_config().clone()),
            ..Default::default()
        })
    }

    /// The next picture out is a keyframe (a consumer asked).
    pub fn force_keyframe(&mut self) {
        self.force_keyframe = true;
    }

    /// Participant `id`'s stream has (a new) configuration: its decoders follow it.
    pub fn configure(&mut self, id: &str, config: &StreamConfig) -> Result<(), TranscodeError> {
        let input = self.inputs.entry(id.to_string()).or_insert_with(|| Input {
            video_config: None,
            video: None,
            picture: None,
            audio_config: None,
            audio: None,
            resampler: None,
            samples: VecDeque::new(),
        });
        if config.video != input.video_config {
            input.video = config.video.as_ref().map(video_decoder).transpose()?;
            input.video_config = config.video.clone();
        }
        if config.audio != input.audio_config {
            input.audio = config.audio.as_ref().map(audio_decoder).transpose()?;
            input.resampler = None;
            input.audio_config = config.audio.clone();
        }
        Ok(())
    }

    /// Participant `id` left the mix.
    pub fn remove(&mut self, id: &str) {
        self.inputs.remove(id);
    }

    /// A frame of participant `id` (configured before): decoded into its latest picture
    /// or its queued samples.
    pub fn push(&mut self, id: &str, frame: &Frame) -> Result<(), TranscodeError> {
        let Some(input) = self.inputs.get_mut(id) else {
            return Ok(());
        };
        if frame.codec.track() == crate::media::TrackKind::Video {
            let Some(decoder) = input.video.as_mut() else {
                return Ok(());
            };
            let mut packet = ff::Packet::copy(&frame.payload);
            packet.set_pts(Some(frame.pts_ms()));
            packet.set_dts(Some(frame.dts_ms()));
            if frame.keyframe {
                packet.set_flags(ff::packet::Flags::KEY);
            }
            decoder.send_packet(&packet)?;
            let mut decoded = ff::frame::Video::empty();
            while decoder.receive_frame(&mut decoded).is_ok() {
                if let Some(p) = picture_of(&decoded) {
                    input.picture = Some(p);
                }
            }
            return Ok(());
        }
        let Some((decoder, adts)) = input.audio.as_mut() else {
            return Ok(());
        };
        decoder.send_packet(&audio_packet(adts.as_ref(), &frame.payload))?;
        let mut decoded = ff::frame::Audio::empty();
        while decoder.receive_frame(&mut decoded).is_ok() {
            if input.resampler.is_none() {
                let layout = match decoded.channel_layout() {
                    l if l.is_empty() => ff::ChannelLayout::default(decoded.channels() as i32),
                    l => l,
                };
                input.resampler = Some(resampling::Context::get(
                    decoded.format(),
                    layout,
                    decoded.rate(),
                    ff::format::Sample::F32(ff::format::sample::Type::Packed),
                    ff::ChannelLayout::STEREO,
                    RATE as u32,
                )?);
            }
            let Some(r) = input.resampler.as_mut() else {
                continue;
            };
            let mut out = ff::frame::Audio::empty();
            r.run(&decoded, &mut out)?;
            let n = out.samples() * 2;
            let bytes = &out.data(0)[..n * 4];
            input.samples.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            );
            let cap = MAX_QUEUED_MS * RATE / 1000 * 2;
            if input.samples.len() > cap {
                let excess = input.samples.len() - cap;
                input.samples.drain(..excess);
            }
        }
        Ok(())
    }

    /// The output due at `now_ms` (time since the mix began): one picture if a frame
    /// interval passed, and the mixed audio up to `now_ms`. `order` lists the
    /// participants in the order their tiles take; `speaker` is the active one.
    pub fn render(
        &mut self,
        now_ms: i64,
        order: &[String],
        speaker: Option<&str>,
    ) -> Result<Vec<Frame>, TranscodeError> {
        let mut out = self.mix_audio(now_ms)?;
        let interval = 1000 / self.settings.fps.max(1) as i64;
        if self.last_video_ms.is_some_and(|t| now_ms - t < interval) {
            return Ok(out);
        }
        self.last_video_ms = Some(now_ms);
        let frame = self.compose(order, speaker);
        let size = (self.settings.width, self.settings.height);
        if self.encoder.is_none() {
            self.encoder = Some(open_x264(
                size,
                ff::format::Pixel::YUV420P,
                self.settings.fps as i32,
                self.settings.video_bps,
                Some("main"),
            )?);
        }
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(out);
        };
        let mut frame = frame;
        frame.set_pts(Some(now_ms));
        let due = self
            .last_keyframe_ms
            .is_none_or(|t| now_ms - t >= KEYFRAME_EVERY_MS);
        if std::mem::take(&mut self.force_keyframe) || due {
            frame.set_kind(ff::picture::Type::I);
            self.last_keyframe_ms = Some(now_ms);
        }
        encoder.send_frame(&frame)?;
        out.extend(x264_frames(encoder, size, &mut self.video_output, now_ms));
        Ok(out)
    }

    /// Mixes every participant's queued audio up to `now_ms` and encodes it.
    fn mix_audio(&mut self, now_ms: i64) -> Result<Vec<Frame>, TranscodeError> {
        let due = (now_ms.max(0) as usize * RATE / 1000).saturating_sub(self.mixed);
        // After a stall, start again from now rather than catch up with old silence.
        let due = due.min(MAX_QUEUED_MS * RATE / 1000);
        if due == 0 {
            return Ok(Vec::new());
        }
        if self.mixed == 0 {
            self.audio.anchor(0);
        }
        let mut mix = vec![0f32; due * 2];
        for input in self.inputs.values_mut() {
            let n = input.samples.len().min(due * 2);
            for (m, s) in mix.iter_mut().zip(input.samples.drain(..n)) {
                *m += s;
            }
        }
        for m in &mut mix {
            *m = m.clamp(-1.0, 1.0);
        }
        self.mixed += due;
        self.audio.queue_interleaved(&mix);
        self.audio.encode_whole_frames()
    }

    /// The picture: black, with each shown participant's latest picture in its tile.
    fn compose(&self, order: &[String], speaker: Option<&str>) -> ff::frame::Video {
        let (w, h) = (self.settings.width as usize, self.settings.height as usize);
        let mut frame = ff::frame::Video::new(ff::format::Pixel::YUV420P, w as u32, h as u32);
        for (plane, value) in [(0, 16u8), (1, 128), (2, 128)] {
            frame.data_mut(plane).fill(value);
        }
        let shown: Vec<&String> = match self.settings.layout {
            Layout::Speaker => speaker
                .and_then(|s| order.iter().find(|o| o.as_str() == s))
                .or(order.first())
                .into_iter()
                .collect(),
            Layout::Grid => order.iter().take(4).collect(),
        };
        let tiles = tiles(shown.len(), w, h);
        for (id, (x, y, tw, th)) in shown.into_iter().zip(tiles) {
            if let Some(p) = self.inputs.get(id).and_then(|i| i.picture.as_ref()) {
                draw(&mut frame, p, x, y, tw, th);
            }
        }
        frame
    }
}

/// Tiles (x, y, width, height) for `n` participants on a `w`×`h` picture, all even.
fn tiles(n: usize, w: usize, h: usize) -> Vec<(usize, usize, usize, usize)> {
    let even = |v: usize| v & !1;
    match n {
        0 => vec![],
        1 => vec![(0, 0, w, h)],
        2 => {
            let tw = even(w / 2);
            let (th, y) = (even(h / 2), even(h / 4));
            vec![(0, y, tw, th), (tw, y, tw, th)]
        }
        _ => {
            let (tw, th) = (even(w / 2), even(h / 2));
            (0..n.min(4))
                .map(|i| ((i % 2) * tw, (i / 2) * th, tw, th))
                .collect()
        }
    }
}

/// Copies a decoded picture's planes, when it is 4:2:0.
fn picture_of(f: &ff::frame::Video) -> Option<Picture> {
    use ff::format::Pixel;
    if !matches!(f.format(), Pixel::YUV420P | Pixel::YUVJ420P) {
        return None;
    }
    let (w, h) = (f.width() as usize, f.height() as usize);
    if w < 2 || h < 2 {
        return None;
    }
    let plane = |i: usize, pw: usize, ph: usize| {
        let stride = f.stride(i);
        let data = f.data(i);
        let mut out = Vec::with_capacity(pw * ph);
        for row in 0..ph {
            out.extend_from_slice(&data[row * stride..row * stride + pw]);
        }
        out
    };
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    Some(Picture {
        width: w,
        height: h,
        planes: [plane(0, w, h), plane(1, cw, ch), plane(2, cw, ch)],
    })
}

/// Scales `p` into the tile at (`x`, `y`) of size `tw`×`th` (nearest neighbour).
fn draw(frame: &mut ff::frame::Video, p: &Picture, x: usize, y: usize, tw: usize, th: usize) {
    for plane in 0..3 {
        let (div, pw, ph) = if plane == 0 {
            (1, p.width, p.height)
        } else {
            (2, p.width.div_ceil(2), p.height.div_ceil(2))
        };
        let (px, py, pw_out, ph_out) = (x / div, y / div, tw / div, th / div);
        let stride = frame.stride(plane);
        let src = &p.planes[plane];
        let dst = frame.data_mut(plane);
        for row in 0..ph_out {
            let sy = row * ph / ph_out.max(1);
            let line = &src[sy * pw..sy * pw + pw];
            let start = (py + row) * stride + px;
            let Some(out) = dst.get_mut(start..start + pw_out) else {
                continue;
            };
            for (col, d) in out.iter_mut().enumerate() {
                *d = line[col * pw / pw_out.max(1)];
            }
        }
    }
}

/// The power of frequency `hz` in signal `x` sampled at `rate` (Goertzel): how tests and
/// benchmarks tell which participants a mix carries.
pub fn tone_power(x: &[f32], hz: f32, rate: f32) -> f32 {
    let w = 2.0 * std::f32::consts::PI * hz / rate;
    let c = 2.0 * w.cos();
    let (mut s1, mut s2) = (0f32, 0f32);
    for v in x {
        let s = v + c * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    s1 * s1 + s2 * s2 - c * s1 * s2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_picture() {
        assert_eq!(tiles(1, 640, 360), [(0, 0, 640, 360)]);
        assert_eq!(tiles(2, 640, 360), [(0, 90, 320, 180), (320, 90, 320, 180)]);
        let four = tiles(4, 640, 360);
        assert_eq!(four[3], (320, 180, 320, 180));
        assert_eq!(tiles(7, 640, 360).len(), 4);
        for (x, y, w, h) in tiles(3, 642, 362) {
            assert!(x + w <= 642 && y + h <= 362);
        }
    }

    /// Two tones in, AAC out; the mixed audio decodes to both (checked with Goertzel).
    #[test]
    fn two_tones_are_mixed_into_one_aac_track() {
        let mut aac_in = [
            AudioEncoder::new(Codec::Aac).unwrap(),
            AudioEncoder::new(Codec::Aac).unwrap(),
        ];
        let mut m = Mixer::new(MixSettings::default()).unwrap();
        let config = StreamConfig {
            audio: Some(aac_in[0].output_config().clone()),
            ..Default::default()
        };
        for id in ["a", "b"] {
            m.configure(id, &config).unwrap();
        }
        let mut out = Vec::new();
        let mut t = 0usize;
        for step in 0..100 {
            // 20 ms of each tone per step.
            for (i, (id, hz)) in [("a", 440.0f32), ("b", 1000.0)].iter().enumerate() {
                let samples: Vec<f32> = (t..t + 960)
                    .flat_map(|n| {
                        let v = 0.3 * (2.0 * std::f32::consts::PI * hz * n as f32 / 48_000.0).sin();
                        [v, v]
                    })
                    .collect();
                aac_in[i].anchor(t as i64);
                aac_in[i].queue_interleaved(&samples);
                for f in aac_in[i].encode_whole_frames().unwrap() {
                    m.push(id, &f).unwrap();
                }
            }
            t += 960;
            out.extend(
                m.render(step * 20, &["a".into(), "b".into()], None)
                    .unwrap(),
            );
        }
        let audio: Vec<&Frame> = out.iter().filter(|f| f.codec == Codec::Aac).collect();
        assert!(audio.len() > 60, "{} AAC frames", audio.len());
        let video: Vec<&Frame> = out.iter().filter(|f| f.codec == Codec::H264).collect();
        assert!(!video.is_empty() && video[0].keyframe);
        // Decode the mix and look for both tones.
        let (mut dec, adts) = audio_decoder(m.audio.output_config()).unwrap();
        let mut pcm: Vec<f32> = Vec::new();
        for f in &audio {
            dec.send_packet(&audio_packet(adts.as_ref(), &f.payload))
                .unwrap();
            let mut d = ff::frame::Audio::empty();
            while dec.receive_frame(&mut d).is_ok() {
                let n = d.samples();
                pcm.extend(
                    d.data(0)[..n * 4]
                        .chunks_exact(4)
                        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
                );
            }
        }
        let tail = &pcm[pcm.len() / 2..];
        let power = |hz: f32| tone_power(tail, hz, 48_000.0);
        let (p440, p1000, p700) = (power(440.0), power(1000.0), power(700.0));
        assert!(
            p440 > 50.0 * p700 && p1000 > 50.0 * p700,
            "440: {p440}, 1000: {p1000}, 700: {p700}"
        );
    }
}
