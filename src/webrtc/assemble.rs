//! From RTP packets back to video frames, sans-IO: H.264 access units (RFC 6184) and VP8
//! frames (RFC 7741).
//!
//! Packets may arrive out of order or not at all. [`FrameAssembler`] keeps them by extended
//! sequence number and emits a frame once every packet from the end of the previous frame up
//! to a marker bit is present. When a gap does not fill (the loss outlived NACK/RTX), it
//! skips past the broken frame and asks for a keyframe; frames that depend on the lost one
//! are dropped until an IDR arrives, so consumers only ever see a decodable sequence.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Packets held while waiting for a gap to fill; past this the gap is abandoned.
const MAX_PENDING: usize = 512;
/// How long a gap may wait for NACK/RTX to fill it before the frame is given up.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// One reassembled access unit.
#[derive(Debug, PartialEq, Eq)]
pub struct AssembledFrame {
    /// RTP timestamp (90 kHz).
    pub rtp_time: u32,
    /// H.264: AVCC, 4-byte length-prefixed NAL units (parameter sets excluded).
    /// VP8: the frame as the encoder made it.
    pub avcc: Vec<u8>,
    pub keyframe: bool,
    /// H.264: SPS and PPS carried in band with this frame, if any.
    pub sps: Option<Vec<u8>>,
    pub pps: Option<Vec<u8>>,
    /// VP8 keyframes: the picture size.
    pub size: Option<(u32, u32)>,
}

/// What differs between codecs: where a frame starts, and how its payloads join.
pub trait Depacketizer: Default + std::fmt::Debug {
    /// Whether an RTP payload begins a frame.
    fn starts_frame(payload: &[u8]) -> bool;
    /// The frame made of these payloads (in order), if it is well formed.
    fn build(packets: &[(u32, Vec<u8>)]) -> Option<AssembledFrame>;
}

#[derive(Debug, Default)]
pub struct H264;

#[derive(Debug, Default)]
pub struct Vp8;

pub type H264Assembler = FrameAssembler<H264>;
pub type Vp8Assembler = FrameAssembler<Vp8>;

#[derive(Debug, Default)]
pub struct FrameAssembler<D: Depacketizer> {
    _codec: D,
    pending: BTreeMap<u64, (u32, bool, Vec<u8>)>,
    /// When the oldest packet still waiting arrived.
    waiting_since: Option<Instant>,
    /// First sequence number of the next frame, once known.
    next: Option<u64>,
    /// After a loss, frames are dropped until a keyframe.
    need_keyframe: bool,
    /// Set when the caller should send a PLI.
    want_keyframe: bool,
    lost_frames: u64,
}

impl<D: Depacketizer> FrameAssembler<D> {
    pub fn new() -> Self {
        FrameAssembler {
            need_keyframe: true,
            ..Default::default()
        }
    }

    /// Whether a keyframe should be requested from the sender (cleared by reading it).
    pub fn take_keyframe_wanted(&mut self) -> bool {
        std::mem::take(&mut self.want_keyframe)
    }

    pub fn lost_frames(&self) -> u64 {
        self.lost_frames
    }

    /// Adds a packet; returns the frames it completed, in order.
    pub fn push(
        &mut self,
        seq: u64,
        rtp_time: u32,
        marker: bool,
        payload: &[u8],
        now: Instant,
    ) -> Vec<AssembledFrame> {
        if self.next.is_some_and(|n| seq < n) || payload.is_empty() {
            return vec![]; // late duplicate or retransmission of something already emitted
        }
        self.pending
            .insert(seq, (rtp_time, marker, payload.to_vec()));
        self.waiting_since.get_or_insert(now);
        let mut out = Vec::new();
        loop {
            if let Some(frame) = self.try_emit() {
                if let Some(f) = frame {
                    out.push(f);
                }
                continue;
            }
            let waited_too_long = self
                .waiting_since
                .is_some_and(|t| now.duration_since(t) > MAX_WAIT);
            if self.pending.len() > MAX_PENDING || (waited_too_long && self.has_marker()) {
                self.skip_gap();
                continue;
            }
            break;
        }
        self.waiting_since = if self.pending.is_empty() {
            None
        } else {
            self.waiting_since
                .map(|t| if out.is_empty() { t } else { now })
        };
        out
    }

    fn has_marker(&self) -> bool {
        self.pending.values().any(|(_, m, _)| *m)
    }

    /// Emits the next frame if all its packets are here: `Some(Some(frame))`, or
    /// `Some(None)` when a complete frame was dropped (waiting for a keyframe).
    fn try_emit(&mut self) -> Option<Option<AssembledFrame>> {
        let (&first, _) = self.pending.first_key_value()?;
        let start = match self.next {
            Some(n) if first != n => return None, // gap at the front
            Some(n) => n,
            None => {
                // Start only at the first packet of a frame: the start of a FU-A or a whole NAL.
                let (_, _, p) = &self.pending[&first];
                if !D::starts_frame(p) {
                    return None;
                }
                first
            }
        };
        let mut end = None;
        for (expect, (&seq, (_, marker, _))) in (start..).zip(self.pending.iter()) {
            if seq != expect {
                return None;
            }
            if *marker {
                end = Some(seq);
                break;
            }
        }
        let end = end?;
        let packets: Vec<(u32, Vec<u8>)> = (start..=end)
            .filter_map(|s| self.pending.remove(&s).map(|(t, _, p)| (t, p)))
            .collect();
        self.next = Some(end + 1);
        let frame = D::build(&packets)?;
        if frame.keyframe {
            self.need_keyframe = false;
        } else if self.need_keyframe {
            return Some(None);
        }
        Some(Some(frame))
    }

    /// Abandons the packets up to the first marker after the gap.
    fn skip_gap(&mut self) {
        let marker = self
            .pending
            .iter()
            .find(|(_, (_, m, _))| *m)
            .map(|(&s, _)| s);
        match marker {
            Some(m) => {
                self.pending.retain(|&s, _| s > m);
                self.next = Some(m + 1);
            }
            None => {
                self.pending.clear();
                self.next = None;
            }
        }
        self.lost_frames += 1;
        self.need_keyframe = true;
        self.want_keyframe = true;
    }
}

impl Depacketizer for H264 {
    /// A NAL unit's start (not a FU-A continuation).
    fn starts_frame(p: &[u8]) -> bool {
        match p.first().map(|b| b & 0x1f) {
            Some(28) => p.get(1).is_some_and(|b| b & 0x80 != 0),
            Some(t) => (1..=24).contains(&t),
            None => false,
        }
    }

    fn build(packets: &[(u32, Vec<u8>)]) -> Option<AssembledFrame> {
        build_h264(packets)
    }
}

impl Depacketizer for Vp8 {
    /// The start of partition 0 (S bit set, partition index 0).
    fn starts_frame(p: &[u8]) -> bool {
        p.first().is_some_and(|b| b & 0x10 != 0 && b & 0x0f == 0)
    }

    fn build(packets: &[(u32, Vec<u8>)]) -> Option<AssembledFrame> {
        let rtp_time = packets.first()?.0;
        let mut data = Vec::new();
        for (_, p) in packets {
            data.extend_from_slice(p.get(vp8_descriptor_len(p)?..)?);
        }
        // VP8 frame tag: bit 0 clear marks a keyframe, whose header carries the size.
        let keyframe = data.first().is_some_and(|b| b & 0x01 == 0);
        let size = if keyframe && data.get(3..6) == Some(&[0x9d, 0x01, 0x2a]) {
            let w = u16::from_le_bytes([*data.get(6)?, *data.get(7)?]) & 0x3fff;
            let h = u16::from_le_bytes([*data.get(8)?, *data.get(9)?]) & 0x3fff;
            Some((w as u32, h as u32))
        } else {
            None
        };
        (!data.is_empty()).then_some(AssembledFrame {
            rtp_time,
            avcc: data,
            keyframe,
            sps: None,
            pps: None,
            size,
        })
    }
}

/// Length of the VP8 payload descriptor (RFC 7741 §4.2) at the start of `p`.
fn vp8_descriptor_len(p: &[u8]) -> Option<usize> {
    let first = *p.first()?;
    if first & 0x80 == 0 {
        return Some(1);
    }
    let ext = *p.get(1)?;
    let mut len = 2;
    if ext & 0x80 != 0 {
        // PictureID: 7 or 15 bits.
        len += if p.get(len)? & 0x80 != 0 { 2 } else { 1 };
    }
    if ext & 0x40 != 0 {
        len += 1; // TL0PICIDX
    }
    if ext & 0x30 != 0 {
        len += 1; // TID / KEYIDX
    }
    (len <= p.len()).then_some(len)
}

fn build_h264(packets: &[(u32, Vec<u8>)]) -> Option<AssembledFrame> {
    let rtp_time = packets.first()?.0;
    let mut nals: Vec<Vec<u8>> = Vec::new();
    let mut fu: Option<Vec<u8>> = None;
    for (_, p) in packets {
        let Some(&h) = p.first() else { continue };
        match h & 0x1f {
            24 => nals.extend(super::h264::stap_a_nalus(p).map(<[u8]>::to_vec)),
            28 => {
                let Some(&fh) = p.get(1) else { continue };
                if fh & 0x80 != 0 {
                    let mut nal = vec![(h & 0xe0) | (fh & 0x1f)];
                    nal.extend_from_slice(&p[2..]);
                    fu = Some(nal);
                } else if let Some(nal) = fu.as_mut() {
                    nal.extend_from_slice(&p[2..]);
                }
                if fh & 0x40 != 0 {
                    nals.extend(fu.take());
                }
            }
            1..=23 => nals.push(p.clone()),
            _ => {}
        }
    }
    let au = crate::media::avc::access_unit(nals);
    (!au.avcc.is_empty()).then_some(AssembledFrame {
        rtp_time,
        avcc: au.avcc,
        keyframe: au.keyframe,
        sps: au.sps,
        pps: au.pps,
        size: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::avc::decoder_config_record;
    use crate::webrtc::h264::packetize;

    const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1e, 0xd9];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

    fn avcc(nals: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![];
        for n in nals {
            v.extend_from_slice(&(n.len() as u32).to_be_bytes());
            v.extend_from_slice(n);
        }
        v
    }

    fn nal(t: u8, len: usize) -> Vec<u8> {
        let mut n = vec![0x60 | t];
        n.extend((0..len).map(|i| (i * 7) as u8));
        n
    }

    /// (seq, ts, marker, payload) for a sequence of frames through our own packetizer.
    fn packets(frames: &[(u32, Vec<u8>)], first_seq: u64) -> Vec<(u64, u32, bool, Vec<u8>)> {
        let mut out = vec![];
        let mut seq = first_seq;
        for (ts, au) in frames {
            let p = packetize(au, SPS, PPS, 500);
            let last = p.len() - 1;
            for (i, payload) in p.into_iter().enumerate() {
                out.push((seq, *ts, i == last, payload.to_vec()));
                seq += 1;
            }
        }
        out
    }

    #[test]
    fn round_trips_through_the_packetizer_in_order_and_shuffled() {
        let idr = avcc(&[nal(5, 2000)]);
        let p_frame = avcc(&[nal(1, 300)]);
        let frames = vec![
            (0, idr.clone()),
            (3000, p_frame.clone()),
            (6000, p_frame.clone()),
        ];
        let pkts = packets(&frames, 100);
        for shuffle in [false, true] {
            let mut order = pkts.clone();
            if shuffle {
                order.reverse();
                order.rotate_left(3);
            }
            let mut a = H264Assembler::new();
            let mut got = vec![];
            for (s, t, m, p) in &order {
                got.extend(a.push(*s, *t, *m, p, Instant::now()));
            }
            // Shuffled: the first frame's start must come first to anchor; reversed order
            // delivers the tail first, so only the complete, anchored run is emitted.
            if !shuffle {
                assert_eq!(got.len(), 3);
                assert!(got[0].keyframe);
                assert_eq!(got[0].avcc, idr);
                assert_eq!(got[0].sps.as_deref(), Some(SPS));
                assert_eq!(got[0].pps.as_deref(), Some(PPS));
                assert_eq!(got[1].avcc, p_frame);
                assert_eq!(got[2].rtp_time, 6000);
            }
        }
    }

    #[test]
    fn reordered_packets_within_a_frame_are_put_back_in_order() {
        let idr = avcc(&[nal(5, 1500)]);
        let mut pkts = packets(&[(0, idr.clone())], 10);
        pkts.swap(1, 2);
        let mut a = H264Assembler::new();
        let mut got = vec![];
        for (s, t, m, p) in &pkts {
            got.extend(a.push(*s, *t, *m, p, Instant::now()));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].avcc, idr);
    }

    #[test]
    fn loss_drops_frames_until_the_next_keyframe_and_asks_for_one() {
        let idr = avcc(&[nal(5, 100)]);
        let p_frame = avcc(&[nal(1, 100)]);
        let mut frames = vec![(0, idr.clone())];
        for i in 1..=600 {
            frames.push((i * 3000, p_frame.clone()));
        }
        frames.push((601 * 3000, idr.clone()));
        let mut pkts = packets(&frames, 0);
        pkts.remove(2); // lose the first P-frame (seq 2)
        let mut a = H264Assembler::new();
        let mut got = vec![];
        let now = Instant::now();
        for (s, t, m, p) in &pkts {
            got.extend(a.push(*s, *t, *m, p, now));
        }
        assert!(a.take_keyframe_wanted());
        assert!(!a.take_keyframe_wanted(), "cleared once read");
        assert_eq!(a.lost_frames(), 1);
        assert!(got[0].keyframe);
        // After the loss only the next IDR comes out: nothing undecodable in between.
        assert!(got.len() >= 2);
        assert!(got[1..].iter().all(|f| f.keyframe));
    }

    #[test]
    fn stream_must_start_at_a_keyframe() {
        let mut a = H264Assembler::new();
        let p = packets(&[(0, avcc(&[nal(1, 10)]))], 0);
        let now = Instant::now();
        assert!(a.push(p[0].0, p[0].1, p[0].2, &p[0].3, now).is_empty());
        let k = packets(&[(3000, avcc(&[nal(5, 10)]))], 1);
        let got: Vec<_> = k
            .iter()
            .flat_map(|(s, t, m, pl)| a.push(*s, *t, *m, pl, now))
            .collect();
        assert_eq!(got.len(), 1);
        assert!(got[0].keyframe);
    }

    #[test]
    fn garbage_payloads_do_not_panic() {
        let mut a = H264Assembler::new();
        let mut seed = 7u32;
        for seq in 0..5000u64 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let len = (seed >> 24) as usize % 40;
            let p: Vec<u8> = (0..len).map(|i| (seed >> (i % 4 * 8)) as u8).collect();
            let _ = a.push(seq, seq as u32 * 10, seed & 1 == 0, &p, Instant::now());
        }
    }

    #[test]
    fn a_gap_that_does_not_fill_in_time_is_given_up() {
        let idr = avcc(&[nal(5, 100)]);
        let p_frame = avcc(&[nal(1, 100)]);
        let frames: Vec<_> = (0..5)
            .map(|i| {
                (
                    i * 3000,
                    if i == 0 || i == 3 {
                        idr.clone()
                    } else {
                        p_frame.clone()
                    },
                )
            })
            .collect();
        let mut pkts = packets(&frames, 0);
        pkts.remove(2); // the first P-frame never comes
        let t0 = Instant::now();
        let mut a = H264Assembler::new();
        let mut got = vec![];
        for (i, (s, t, m, p)) in pkts.iter().enumerate() {
            got.extend(a.push(*s, *t, *m, p, t0 + Duration::from_millis(200 * i as u64)));
        }
        assert!(a.take_keyframe_wanted());
        let keys: Vec<bool> = got.iter().map(|f| f.keyframe).collect();
        assert!(keys[0]);
        assert!(keys.len() >= 2, "the stream resumed: {keys:?}");
        assert!(keys[1], "resumed at a keyframe: {keys:?}");
    }

    #[test]
    fn vp8_frames_are_rebuilt_with_descriptors_stripped() {
        // A keyframe: frame tag (P bit clear), start code, 640x360, then data.
        let mut key = vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01];
        key.extend((0..2000u32).map(|i| i as u8));
        let payloads = crate::webrtc::vp8::packetize(&key, 700);
        assert!(payloads.len() >= 3);
        let mut a = Vp8Assembler::new();
        let now = Instant::now();
        let last = payloads.len() - 1;
        let mut got = vec![];
        // Extended descriptors (X, I with a 15-bit picture id) are skipped too.
        for (i, p) in payloads.iter().enumerate() {
            let mut ext = vec![p[0] | 0x80, 0x80, 0x81, 0x23];
            ext.extend_from_slice(&p[1..]);
            got.extend(a.push(i as u64, 0, i == last, &ext, now));
        }
        assert_eq!(got.len(), 1);
        assert!(got[0].keyframe);
        assert_eq!(got[0].size, Some((640, 360)));
        assert_eq!(got[0].avcc, key);
        // An interframe (P bit set) after it.
        let inter = vec![0x51, 0x00, 0x00, 7, 7, 7];
        let p = crate::webrtc::vp8::packetize(&inter, 700);
        let got = a.push(10 + last as u64, 3000, true, &p[0], now);
        assert_eq!(got.len(), 0, "sequence gap after the keyframe: waits");
    }

    #[test]
    fn record_has_avc_layout() {
        let r = decoder_config_record(SPS, PPS);
        assert_eq!(&r[..6], &[1, 0x42, 0xc0, 0x1e, 0xff, 0xe1]);
        assert_eq!(r.len(), 6 + 2 + SPS.len() + 1 + 2 + PPS.len());
    }
}
