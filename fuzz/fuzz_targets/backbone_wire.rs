//! The backbone wire codec (`backbone::wire`): `FrameDecoder` splitting a control or media
//! stream into frames, each frame decoded as a `ControlMessage` and as a `MediaItem`, the
//! `GroupHeader` of a media stream, and `frame_len` (the length logic of `read_item`).
//!
//! Input: one byte choosing the decoder's limit and how the stream is split into reads, 19
//! bytes tried as a group header, then the stream of frames.
//! Invariants: no panic; the decoder never buffers more than was pushed; a frame is never
//! longer than the limit; `frame_len` and `FrameDecoder` agree on a prefix; what decodes,
//! encodes to bytes that decode to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshcast::backbone::wire::{
    self, ControlMessage, FrameDecoder, GroupHeader, MediaItem, GROUP_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if let Some(h) = rest.get(..GROUP_HEADER_LEN) {
        let h: &[u8; GROUP_HEADER_LEN] = h.try_into().unwrap(); // 19 bytes by the slice
        if let Ok(g) = GroupHeader::decode(h) {
            let mut out = BytesMut::new();
            g.encode(&mut out);
            assert_eq!(&out[..], &h[..]);
        }
    }
    // What follows the (would-be) group header is the stream.
    let rest = rest.get(GROUP_HEADER_LEN..).unwrap_or(&[]);
    if let Some(prefix) = rest.get(..4) {
        let prefix: [u8; 4] = prefix.try_into().unwrap(); // 4 bytes by the slice
        let mut d = FrameDecoder::default();
        d.push(&rest[..4]);
        match (wire::frame_len(prefix), d.next_frame()) {
            (Ok(_), Ok(None)) | (Err(_), Err(_)) => {}
            other => panic!("frame_len and FrameDecoder disagree: {other:?}"),
        }
    }
    let limit = match mode & 3 {
        0 => wire::HANDSHAKE_MESSAGE,
        1 => wire::MAX_CONTROL_MESSAGE,
        2 => wire::MAX_MESSAGE,
        _ => 64,
    };
    let step = ((mode >> 2) as usize).max(1) * 3;
    let mut d = FrameDecoder::with_limit(limit);
    let mut pushed = 0;
    for read in rest.chunks(step) {
        d.push(read);
        pushed += read.len();
        loop {
            assert!(d.buffered() <= pushed);
            match d.next_frame() {
                Ok(Some((t, body))) => {
                    assert!(1 + body.len() <= limit);
                    pushed -= 5 + body.len();
                    check_control(t, body.clone());
                    check_media(t, body);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

fn check_control(t: u8, body: bytes::Bytes) {
    let Ok(msg) = ControlMessage::decode(t, body) else {
        return;
    };
    let mut out = BytesMut::new();
    msg.encode(&mut out);
    let mut d = FrameDecoder::with_limit(wire::MAX_MESSAGE);
    d.push(&out);
    let (t2, body2) = d.next_frame().unwrap().unwrap(); // encode writes one whole frame
    assert_eq!(ControlMessage::decode(t2, body2), Ok(msg));
}

fn check_media(kind: u8, body: bytes::Bytes) {
    let Ok(item) = MediaItem::decode(kind, body) else {
        return;
    };
    let mut out = BytesMut::new();
    item.encode(&mut out);
    let mut d = FrameDecoder::with_limit(wire::MAX_MESSAGE);
    d.push(&out);
    let (k2, body2) = d.next_frame().unwrap().unwrap(); // encode writes one whole frame
    let again = MediaItem::decode(k2, body2).unwrap();
    // Compared through Debug: a NaN frame rate is equal to itself there.
    assert_eq!(format!("{again:?}"), format!("{item:?}"));
}
