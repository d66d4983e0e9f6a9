//! The WHIP ingest's RTP depacketizers: `webrtc::assemble::FrameAssembler<H264>` and
//! `<Vp8>` fed packets with fuzzed sequence numbers, timestamps, marker bits and payloads,
//! arriving out of order, duplicated, lost and late.
//!
//! Sequence numbers are 16-bit on the wire; the assembler takes them extended to 64 bits by
//! str0m (rollover counting), so the harness extends them the same way: it never hands the
//! assembler a number a peer cannot make str0m produce.
//!
//! Input: one byte (bit 0: H.264 or VP8; the rest: the first sequence number's high byte),
//! then packets: a flags byte (bit 0 marker, bits 1-3 time passing, bits 4-7 with the next
//! byte a signed sequence step), the step byte, a timestamp step byte, a length byte and the
//! payload.
//! Invariants: no panic; a frame is never empty; an H.264 frame is whole 4-byte
//! length-prefixed NAL units; no more frames than packets with a marker; the lost-frame
//! count never goes down.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshcast::webrtc::assemble::{AssembledFrame, FrameAssembler, Vp8, H264};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    if first & 1 == 0 {
        run::<H264>(first, rest, true);
    } else {
        run::<Vp8>(first, rest, false);
    }
});

fn run<D: meshcast::webrtc::assemble::Depacketizer>(first: u8, mut r: &[u8], h264: bool) {
    let mut a = FrameAssembler::<D>::new();
    let mut now = Instant::now();
    let mut wire_seq = (first as u16) << 8;
    let mut last_ext = wire_seq as u64;
    let mut ts = 0u32;
    let (mut markers, mut frames, mut lost) = (0u64, 0u64, 0u64);
    while let [flags, step, ts_step, len, tail @ ..] = r {
        let n = (*len as usize).min(tail.len());
        let (payload, tail) = tail.split_at(n);
        r = tail;
        let delta = i16::from_be_bytes([flags & 0xf0, *step]) >> 4;
        wire_seq = wire_seq.wrapping_add(delta as u16);
        let seq = extend(last_ext, wire_seq);
        last_ext = last_ext.max(seq);
        ts = ts.wrapping_add(*ts_step as u32 * 300);
        now += Duration::from_millis(((flags >> 1) & 7) as u64 * 40);
        let marker = flags & 1 != 0;
        markers += (marker && !payload.is_empty()) as u64;
        for f in a.push(seq, ts, marker, payload, now) {
            check(&f, h264);
            frames += 1;
        }
        assert!(frames <= markers, "{frames} frames from {markers} markers");
        assert!(a.lost_frames() >= lost);
        lost = a.lost_frames();
        let _ = a.take_keyframe_wanted();
    }
}

/// The extended sequence number closest to the last one seen (RFC 3550 A.1 style).
fn extend(last: u64, seq: u16) -> u64 {
    let roc = last >> 16;
    [roc.wrapping_sub(1), roc, roc + 1]
        .into_iter()
        .filter(|&r| r <= roc + 1 && (r != u64::MAX))
        .map(|r| (r << 16) | seq as u64)
        .min_by_key(|&c| c.abs_diff(last))
        .unwrap_or(seq as u64)
}

fn check(f: &AssembledFrame, h264: bool) {
    assert!(!f.avcc.is_empty());
    if h264 {
        let mut at = 0;
        while at < f.avcc.len() {
            let prefix = f.avcc.get(at..at + 4).expect("a whole length prefix");
            let len = u32::from_be_bytes(prefix.try_into().unwrap()) as usize; // 4 bytes
            at += 4 + len;
        }
        assert_eq!(
            at,
            f.avcc.len(),
            "H.264 frame is not whole length-prefixed NAL units"
        );
    }
}
