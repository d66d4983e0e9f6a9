//! A synthetic H.264 stream for the latency, join and backbone benchmarks: real SPS and PPS
//! (from one frame encoded by `ffmpeg`), then IDR and non-IDR slices of chosen sizes whose
//! bodies are filler bytes ending in a send-time stamp. Nothing decodes the slices on the way
//! (meshcast relays them), so a viewer reads the stamp back from the end of each frame.
//!
//! Stamps are nanoseconds since [`clock_base`], a monotonic instant shared by the whole
//! benchmark process: publisher and viewers run in it, so they read one clock.
//!
//! Packaging: RTP (single NAL packets for SPS/PPS, FU-A for slices, marker bit on a frame's
//! last packet) for a WHIP publisher fed over UDP, and FLV video tag bodies for RTMP.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Instant;

/// The instant every stamp counts from.
pub fn clock_base() -> Instant {
    static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);
    *BASE
}

/// Nanoseconds since [`clock_base`] at `at`.
pub fn nanos_at(at: Instant) -> u64 {
    at.saturating_duration_since(clock_base()).as_nanos() as u64
}

/// What ends every stamped frame: this tag, `K` for a keyframe or `:`, then the time as 16
/// hex-like nibbles (`b'A' + nibble`), so the stamp has no zero bytes (no start code can
/// appear in it).
const STAMP_TAG: &[u8; 7] = b"MCSTAMP";
pub const STAMP_LEN: usize = 24;

/// A frame's stamp: when it was sent, and whether it is a keyframe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub nanos: u64,
    pub keyframe: bool,
}

pub fn stamp(nanos: u64, keyframe: bool) -> [u8; STAMP_LEN] {
    let mut s = [0u8; STAMP_LEN];
    s[..7].copy_from_slice(STAMP_TAG);
    s[7] = if keyframe { b'K' } else { b':' };
    for i in 0..16 {
        s[8 + i] = b'A' + ((nanos >> (60 - 4 * i)) & 0xf) as u8;
    }
    s
}

/// The stamp at the end of `bytes`, if there is one.
pub fn read_stamp(bytes: &[u8]) -> Option<Stamp> {
    let s = bytes.get(bytes.len().checked_sub(STAMP_LEN)?..)?;
    if &s[..7] != STAMP_TAG {
        return None;
    }
    let nanos = s[8..].iter().try_fold(0u64, |acc, &b| {
        let nibble = b.checked_sub(b'A').filter(|n| *n < 16)?;
        Some(acc << 4 | u64::from(nibble))
    })?;
    Some(Stamp {
        nanos,
        keyframe: s[7] == b'K',
    })
}

/// The stream's parameter sets and frame sizes.
#[derive(Clone)]
pub struct Synth {
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    /// Frames per GOP (the first of each is an IDR).
    pub gop: u64,
    pub idr_bytes: usize,
    pub slice_bytes: usize,
}

/// One synthetic access unit: a slice NAL unit (with its header byte).
pub struct Frame {
    pub index: u64,
    pub keyframe: bool,
    pub nal: Vec<u8>,
    /// The stamp it carries (nanoseconds since [`clock_base`]).
    pub sent: u64,
}

impl Synth {
    /// Parameter sets of a 640x360 constrained-baseline stream, encoded once per `work`
    /// directory; frame sizes for `kbps` at 30 frames/s with a 2 s GOP (the IDR 4× a slice).
    pub fn load(work: &Path, kbps: u32) -> Synth {
        let path = work.join("synth-params.h264");
        if !path.exists() {
            let status = std::process::Command::new("ffmpeg")
                .args(["-hide_banner", "-loglevel", "error", "-y"])
                .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
                .args([
                    "-frames:v",
                    "1",
                    "-c:v",
                    "libx264",
                    "-profile:v",
                    "baseline",
                ])
                .args(["-bsf:v", "filter_units=remove_types=6|9", "-f", "h264"])
                .arg(&path)
                .status()
                .expect("ffmpeg");
            assert!(status.success());
        }
        let annexb = std::fs::read(&path).unwrap();
        let nal = |t: u8| {
            annexb_nalus(&annexb)
                .find(|n| n.first().is_some_and(|b| b & 0x1f == t))
                .expect("parameter set")
                .to_vec()
        };
        let gop = 60u64;
        // kbps over a GOP: (gop - 1) slices + one IDR of 4 slices.
        let gop_bytes = kbps as usize * 1000 / 8 * 2;
        let slice_bytes = gop_bytes / (gop as usize + 3);
        Synth {
            sps: nal(7),
            pps: nal(8),
            gop,
            idr_bytes: slice_bytes * 4,
            slice_bytes,
        }
    }

    /// Frame `index`, stamped now.
    pub fn frame(&self, index: u64) -> Frame {
        let keyframe = index.is_multiple_of(self.gop);
        let size = if keyframe {
            self.idr_bytes
        } else {
            self.slice_bytes
        };
        let mut nal = Vec::with_capacity(size);
        // nal_ref_idc 3; type 5 (IDR) or 1 (non-IDR).
        nal.push(if keyframe { 0x65 } else { 0x41 });
        // Filler without zero bytes: no start code or emulation prevention to trip on.
        let mut x = index as u32 | 1;
        while nal.len() < size.saturating_sub(STAMP_LEN) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            nal.push((x as u8).max(1));
        }
        let sent = nanos_at(Instant::now());
        nal.extend_from_slice(&stamp(sent, keyframe));
        Frame {
            index,
            keyframe,
            nal,
            sent,
        }
    }

    /// The RTP packets (payload type 96, SSRC 1111, 90 kHz at 30 frames/s) of `frame`,
    /// continuing the sequence number `seq`: SPS and PPS before an IDR, then the slice in
    /// FU-A fragments of up to 1100 bytes.
    pub fn rtp(&self, frame: &Frame, seq: &mut u16) -> Vec<Vec<u8>> {
        let ts = (frame.index * 3000) as u32;
        let mut out = Vec::new();
        let mut packet = |payload: &[&[u8]], marker: bool| {
            let mut p = Vec::with_capacity(12 + payload.iter().map(|s| s.len()).sum::<usize>());
            p.extend_from_slice(&[0x80, 96 | if marker { 0x80 } else { 0 }]);
            p.extend_from_slice(&seq.to_be_bytes());
            p.extend_from_slice(&ts.to_be_bytes());
            p.extend_from_slice(&1111u32.to_be_bytes());
            for s in payload {
                p.extend_from_slice(s);
            }
            *seq = seq.wrapping_add(1);
            out.push(p);
        };
        if frame.keyframe {
            packet(&[&self.sps], false);
            packet(&[&self.pps], false);
        }
        let header = frame.nal[0];
        let body = &frame.nal[1..];
        let chunks: Vec<&[u8]> = body.chunks(1100).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let (first, last) = (i == 0, i + 1 == chunks.len());
            let fu_indicator = (header & 0xe0) | 28;
            let fu_header =
                (header & 0x1f) | if first { 0x80 } else { 0 } | if last { 0x40 } else { 0 };
            packet(&[&[fu_indicator, fu_header], chunk], last);
        }
        out
    }

    /// The FLV AVC sequence header (AVCDecoderConfigurationRecord) tag body.
    pub fn flv_sequence_header(&self) -> Vec<u8> {
        let mut b = vec![0x17, 0, 0, 0, 0];
        b.extend_from_slice(&[1, self.sps[1], self.sps[2], self.sps[3], 0xff, 0xe1]);
        b.extend_from_slice(&(self.sps.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.sps);
        b.push(1);
        b.extend_from_slice(&(self.pps.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.pps);
        b
    }

    /// The FLV video tag body of `frame` (AVC NALU, composition time 0, one length-prefixed
    /// NAL unit): its stamp is its last bytes.
    pub fn flv_frame(&self, frame: &Frame) -> Vec<u8> {
        let mut b = Vec::with_capacity(frame.nal.len() + 9);
        b.extend_from_slice(&[if frame.keyframe { 0x17 } else { 0x27 }, 1, 0, 0, 0]);
        b.extend_from_slice(&(frame.nal.len() as u32).to_be_bytes());
        b.extend_from_slice(&frame.nal);
        b
    }
}

/// The NAL units of an Annex B byte stream.
fn annexb_nalus(d: &[u8]) -> impl Iterator<Item = &[u8]> {
    let starts: Vec<usize> = (0..d.len().saturating_sub(2))
        .filter(|&i| d[i..i + 3] == [0, 0, 1])
        .map(|i| i + 3)
        .collect();
    let ends = starts.iter().skip(1).map(|&s| s - 3).chain([d.len()]);
    let units: Vec<&[u8]> = starts
        .iter()
        .zip(ends)
        .map(|(&s, e)| {
            // A 4-byte start code leaves a zero at the end of the unit before it.
            let mut e = e;
            while e > s && d[e - 1] == 0 {
                e -= 1;
            }
            &d[s..e]
        })
        .collect();
    units.into_iter()
}

/// Percentile `q` (0..=1) of sorted `v`.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}
