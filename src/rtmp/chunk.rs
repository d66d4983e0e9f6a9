//! RTMP chunk encoding for media sent to players, built once per frame per node.
//!
//! rml_rtmp's serializer compresses headers against per-connection state, so its bytes differ
//! per viewer. Media to players instead always starts with a type-0 (full) header on chunk
//! streams rml_rtmp never uses, which makes a frame's chunks identical for every viewer with
//! the same message stream id and chunk size: they are built once and the same `Bytes` is
//! written to every socket.

use bytes::{BufMut, Bytes, BytesMut};

/// Chunk stream for video messages to players (rml_rtmp uses 2-6).
pub const CSID_VIDEO: u8 = 7;
/// Chunk stream for audio messages to players.
pub const CSID_AUDIO: u8 = 8;
/// Chunk stream for data (metadata) messages to players.
pub const CSID_DATA: u8 = 9;

pub const MSG_AUDIO: u8 = 8;
pub const MSG_VIDEO: u8 = 9;
pub const MSG_DATA_AMF0: u8 = 18;

/// Encodes one RTMP message as chunks with a full header.
pub fn encode_message(
    csid: u8,
    message_type: u8,
    timestamp: u32,
    message_stream_id: u32,
    payload: &[u8],
    chunk_size: usize,
) -> Bytes {
    debug_assert!((2..64).contains(&csid));
    let extended = timestamp >= 0xff_ffff;
    let chunks = payload.len().div_ceil(chunk_size).max(1);
    let per_chunk_header = 1 + if extended { 4 } else { 0 };
    let mut b = BytesMut::with_capacity(11 + chunks * per_chunk_header + payload.len());
    b.put_u8(csid); // fmt 0
    b.put_uint(
        if extended {
            0xff_ffff
        } else {
            timestamp as u64
        },
        3,
    );
    b.put_uint(payload.len() as u64 & 0xff_ffff, 3);
    b.put_u8(message_type);
    b.put_u32_le(message_stream_id);
    if extended {
        b.put_u32(timestamp);
    }
    for (i, chunk) in payload.chunks(chunk_size).enumerate() {
        if i > 0 {
            b.put_u8(0xc0 | csid); // fmt 3: continuation
            if extended {
                // Like FFmpeg and librtmp, repeat the extended timestamp on continuations.
                b.put_u32(timestamp);
            }
        }
        b.put_slice(chunk);
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rml_rtmp::chunk_io::ChunkDeserializer;

    #[test]
    fn single_chunk_layout() {
        let b = encode_message(CSID_VIDEO, MSG_VIDEO, 0x010203, 1, &[0xaa, 0xbb], 4096);
        assert_eq!(&b[..], &[7, 1, 2, 3, 0, 0, 2, 9, 1, 0, 0, 0, 0xaa, 0xbb]);
    }

    #[test]
    fn multi_chunk_with_extended_timestamp_parses_in_rml_rtmp() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let ts = 0x0123_4567;
        let b = encode_message(CSID_AUDIO, MSG_AUDIO, ts, 1, &payload, 128);
        let mut d = ChunkDeserializer::new();
        d.set_max_chunk_size(128).unwrap();
        let msg = d.get_next_message(&b).unwrap().expect("one whole message");
        assert_eq!(msg.timestamp.value, ts);
        assert_eq!(msg.type_id, MSG_AUDIO);
        assert_eq!(msg.message_stream_id, 1);
        assert_eq!(&msg.data[..], &payload[..]);
    }

    #[test]
    fn consecutive_messages_parse_back_to_back() {
        let mut all = BytesMut::new();
        for ts in [0u32, 40, 80] {
            all.put_slice(&encode_message(
                CSID_VIDEO,
                MSG_VIDEO,
                ts,
                1,
                &[ts as u8; 300],
                128,
            ));
        }
        let mut d = ChunkDeserializer::new();
        d.set_max_chunk_size(128).unwrap();
        let first = d.get_next_message(&all).unwrap().unwrap();
        assert_eq!(first.timestamp.value, 0);
        for ts in [40, 80] {
            let m = d.get_next_message(&[]).unwrap().unwrap();
            assert_eq!(m.timestamp.value, ts);
            assert_eq!(m.data.len(), 300);
        }
    }
}
