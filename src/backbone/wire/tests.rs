//! Exact-bytes tests of the wire format.

use super::control::*;
use super::media::*;
use super::*;
use crate::config::Role;
use crate::media::{
    AudioConfig, Codec, Frame, Metadata, SimulcastLayer, StreamConfig, StreamKey, Timebase,
    VideoConfig,
};

fn key() -> StreamKey {
    StreamKey::new("live", "demo").unwrap()
}

fn announcement() -> Announcement {
    Announcement {
        stream: key(),
        timeline: 0x0102,
        started_ms: 1_700_000_000_000,
    }
}

fn all_messages() -> Vec<ControlMessage> {
    vec![
        ControlMessage::Hello {
            version: VERSION,
            node_id: "a".into(),
            role: Role::Origin,
            region: "eu".into(),
            nonce: [7; 32],
        },
        ControlMessage::Challenge {
            version: VERSION,
            node_id: "b".into(),
            role: Role::Edge,
            region: "us".into(),
            nonce: [8; 32],
        },
        ControlMessage::Auth { proof: [9; 32] },
        ControlMessage::Welcome { proof: [10; 32] },
        ControlMessage::Announce(announcement()),
        ControlMessage::NodeState(vec![NodeRecord {
            node: "edge-1".into(),
            role: Role::Edge,
            region: "eu".into(),
            http_url: "http://10.0.0.1:8080".into(),
            rtmp_url: "rtmp://10.0.0.1:1935".into(),
            incarnation: 1_700_000_000_000,
            age_ms: 250,
            viewers: 12,
            load_permille: 120,
            egress: 1,
            out_bps: 2_500_000,
            links: vec![("origin-a".into(), 31_000, 12)],
            streams: vec![key()],
            pulls: vec![("origin-a".into(), 1)],
        }]),
        ControlMessage::Withdraw { stream: key() },
        ControlMessage::Subscribe {
            id: 7,
            stream: key(),
        },
        ControlMessage::SubscribeOk { id: 7, timeline: 9 },
        ControlMessage::SubscribeError {
            id: 7,
            code: code::NOT_FOUND,
            reason: "nope".into(),
        },
        ControlMessage::Unsubscribe { id: 7 },
        ControlMessage::SubscribeDone {
            id: 7,
            code: code::ENDED,
            reason: "ended".into(),
        },
        ControlMessage::KeyframeRequest { id: 7 },
        ControlMessage::GoAway {
            reason: "bye".into(),
        },
        ControlMessage::Bus(Bytes::from_static(b"{\"t\":\"closed\",\"room\":\"x\"}")),
    ]
}

fn decode_all(bytes: &[u8]) -> Result<Vec<ControlMessage>, WireError> {
    let mut d = FrameDecoder::default();
    d.push(bytes);
    let mut out = vec![];
    while let Some((t, body)) = d.next_frame()? {
        out.push(ControlMessage::decode(t, body)?);
    }
    Ok(out)
}

#[test]
fn control_messages_round_trip() {
    let msgs = all_messages();
    let mut buf = BytesMut::new();
    for m in &msgs {
        m.encode(&mut buf);
    }
    assert_eq!(decode_all(&buf).unwrap(), msgs);
}

#[test]
fn a_bus_message_is_its_bytes_and_an_empty_or_huge_one_is_refused() {
    let mut buf = BytesMut::new();
    ControlMessage::Bus(Bytes::from_static(b"hi")).encode(&mut buf);
    assert_eq!(&buf[..], &[0, 0, 0, 3, 0x0f, b'h', b'i']);
    assert!(ControlMessage::decode(0x0f, Bytes::new()).is_err());
    let huge = Bytes::from(vec![b'x'; MAX_BUS_BYTES + 1]);
    assert!(ControlMessage::decode(0x0f, huge).is_err());
}

#[test]
fn subscribe_ok_carries_the_session_after_the_id() {
    let mut buf = BytesMut::new();
    ControlMessage::SubscribeOk { id: 1, timeline: 2 }.encode(&mut buf);
    let expected = [
        0,
        0,
        0,
        17,
        T_SUBSCRIBE_OK,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
    ];
    assert_eq!(&buf[..], &expected[..]);
}

#[test]
fn subscribe_has_exact_bytes() {
    let mut buf = BytesMut::new();
    ControlMessage::Subscribe {
        id: 1,
        stream: key(),
    }
    .encode(&mut buf);
    let mut expected = vec![0, 0, 0, 20, T_SUBSCRIBE, 0, 0, 0, 0, 0, 0, 0, 1, 0, 9];
    expected.extend_from_slice(b"live/demo");
    assert_eq!(&buf[..], &expected[..]);
}

#[test]
fn announce_has_exact_bytes() {
    let mut buf = BytesMut::new();
    ControlMessage::Announce(announcement()).encode(&mut buf);
    let mut expected = vec![0, 0, 0, 28, T_ANNOUNCE, 0, 9];
    expected.extend_from_slice(b"live/demo");
    expected.extend_from_slice(&0x0102u64.to_be_bytes());
    expected.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
    assert_eq!(&buf[..], &expected[..]);
}

#[test]
fn the_earlier_publish_ranks_first_then_the_lower_node_id() {
    let a = announcement();
    let later = Announcement {
        started_ms: a.started_ms + 1,
        ..a.clone()
    };
    assert!(a.rank("origin-z") < later.rank("origin-a"));
    assert!(a.rank("origin-a") < a.rank("origin-b"));
}

#[test]
fn decoder_waits_for_whole_frames_byte_by_byte() {
    let mut buf = BytesMut::new();
    ControlMessage::Announce(announcement()).encode(&mut buf);
    let mut d = FrameDecoder::default();
    for (i, b) in buf.iter().enumerate() {
        d.push(&[*b]);
        let got = d.next_frame().unwrap();
        assert_eq!(got.is_some(), i == buf.len() - 1);
    }
}

#[test]
fn truncated_bodies_are_errors_not_panics() {
    for m in all_messages() {
        if matches!(m, ControlMessage::Bus(_)) {
            // Opaque here: a shorter body is another bus message; the rooms parse it.
            continue;
        }
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        let t = buf[4];
        let body = Bytes::copy_from_slice(&buf[5..]);
        for cut in 0..body.len() {
            assert!(
                ControlMessage::decode(t, body.slice(..cut)).is_err(),
                "{m:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn hello_has_exact_bytes_and_another_version_is_named_not_parsed() {
    let mut buf = BytesMut::new();
    ControlMessage::Hello {
        version: VERSION,
        node_id: "a".into(),
        role: Role::Edge,
        region: "eu".into(),
        nonce: [7; 32],
    }
    .encode(&mut buf);
    let mut expected = vec![0, 0, 0, 43, T_HELLO, 0, 7, 0, 1, b'a', 2, 0, 2, b'e', b'u'];
    expected.extend([7; 32]);
    assert_eq!(&buf[..], &expected[..]);
    // A version-4 hello (it carried the token in the clear): only the version is read.
    let mut v4 = BytesMut::new();
    v4.put_u16(4);
    put_str(&mut v4, "a");
    v4.put_u8(1);
    put_str(&mut v4, "eu");
    put_str(&mut v4, "change-me");
    assert_eq!(
        ControlMessage::decode(T_HELLO, v4.freeze()),
        Err(WireError::Version(4))
    );
}

#[test]
fn decoder_refuses_an_announced_length_over_its_limit_before_the_bytes_arrive() {
    let mut d = FrameDecoder::with_limit(HANDSHAKE_MESSAGE);
    d.push(&(HANDSHAKE_MESSAGE as u32 + 1).to_be_bytes());
    assert_eq!(
        d.next_frame(),
        Err(WireError::TooLarge(HANDSHAKE_MESSAGE + 1))
    );
    // A frame within the limit waits for its bytes, holding only what arrived.
    let mut d = FrameDecoder::with_limit(MAX_CONTROL_MESSAGE);
    d.push(&(MAX_CONTROL_MESSAGE as u32).to_be_bytes());
    d.push(&[T_GOAWAY, 0]);
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(d.buffered(), 6);
    // The limit may tighten or loosen between frames.
    d.set_limit(16);
    assert!(matches!(d.next_frame(), Err(WireError::TooLarge(_))));
}

#[test]
fn rejects_oversized_unknown_and_bad_fields() {
    let mut d = FrameDecoder::default();
    d.push(&[0xff, 0xff, 0xff, 0xff, 1]);
    assert!(matches!(d.next_frame(), Err(WireError::TooLarge(_))));
    assert_eq!(
        ControlMessage::decode(0x7f, Bytes::new()),
        Err(WireError::UnknownType(0x7f))
    );
    // A stream name that would escape a path.
    let mut body = BytesMut::new();
    put_str(&mut body, "../etc");
    assert!(matches!(
        ControlMessage::decode(T_ANNOUNCE, body.freeze()),
        Err(WireError::BadStreamKey(_))
    ));
    // Invalid UTF-8.
    let body = Bytes::from_static(&[0, 2, 0xff, 0xfe]);
    assert_eq!(
        ControlMessage::decode(T_GOAWAY, body),
        Err(WireError::BadString)
    );
    // Trailing garbage.
    let body = Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 1, 9]);
    assert_eq!(
        ControlMessage::decode(T_UNSUBSCRIBE, body),
        Err(WireError::Trailing(1))
    );
}

#[test]
fn media_items_round_trip() {
    let config = StreamConfig {
        video: Some(VideoConfig {
            codec: Codec::H264,
            record: Bytes::from_static(&[1, 2, 3]),
            width: 1920,
            height: 1080,
        }),
        audio: Some(AudioConfig {
            codec: Codec::Aac,
            specific: Bytes::from_static(&[0x12, 0x10]),
            sample_rate: 44100,
            channels: 2,
        }),
        metadata: Metadata {
            frame_rate: Some(30.0),
            video_bitrate_kbps: None,
            audio_bitrate_kbps: Some(128.0),
            encoder: Some("Lavf".into()),
        },
        simulcast: vec![
            SimulcastLayer {
                rid: "q".into(),
                width: 480,
                height: 270,
            },
            SimulcastLayer {
                rid: "f".into(),
                width: 1920,
                height: 1080,
            },
        ],
    };
    let frame = Frame {
        codec: Codec::H264,
        dts: -5,
        pts: 75,
        timebase: Timebase(90_000),
        keyframe: true,
        payload: Bytes::from_static(&[0, 0, 0, 1, 0x65]),
    };
    let items = vec![
        MediaItem::Config(config),
        MediaItem::Publishes(2),
        MediaItem::Frame(frame),
    ];
    let mut buf = BytesMut::new();
    for i in &items {
        i.encode(&mut buf);
    }
    let mut d = FrameDecoder::default();
    d.push(&buf);
    let mut out = vec![];
    while let Some((k, body)) = d.next_frame().unwrap() {
        out.push(MediaItem::decode(k, body).unwrap());
    }
    assert_eq!(out, items);
}

#[test]
fn group_header_round_trips_and_checks_magic() {
    let h = GroupHeader {
        subscription: 3,
        sequence: 42,
    };
    let mut buf = BytesMut::new();
    h.encode(&mut buf);
    let arr: [u8; GROUP_HEADER_LEN] = buf[..].try_into().unwrap();
    assert_eq!(GroupHeader::decode(&arr).unwrap(), h);
    let mut bad = arr;
    bad[0] = b'X';
    assert_eq!(GroupHeader::decode(&bad), Err(WireError::BadGroupHeader));
}

#[test]
fn random_bytes_never_panic() {
    let mut seed = 0xdead_beefu64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 48) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8)
            .collect();
        let t = (seed >> 56) as u8 % 16;
        let _ = ControlMessage::decode(t, Bytes::from(bytes.clone()));
        let _ = MediaItem::decode(t % 4, Bytes::from(bytes));
    }
}

/// `docs/backbone-protocol.md`, which must agree with the constants here.
const PROTOCOL_DOC: &str = include_str!("../../../docs/backbone-protocol.md");

/// The rows of the markdown table that follows `heading`, split into trimmed cells.
fn doc_table(heading: &str) -> Vec<Vec<String>> {
    let start = PROTOCOL_DOC
        .find(heading)
        .unwrap_or_else(|| panic!("the doc has a {heading:?} section"));
    PROTOCOL_DOC[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect()
}

#[test]
fn the_protocol_doc_names_the_versions_in_the_code() {
    let title = format!("# Backbone protocol, version {VERSION}\n");
    assert!(
        PROTOCOL_DOC.starts_with(&title),
        "doc title is not {title:?}"
    );
    let header = format!("\"MG\"  u8 version ({})", VERSION as u8);
    assert!(
        PROTOCOL_DOC.contains(&header),
        "the media-stream header in the doc is not {header:?}"
    );
    let alpn = format!("ALPN `{}`", String::from_utf8_lossy(ALPN));
    assert!(PROTOCOL_DOC.contains(&alpn), "the doc does not say {alpn}");
    let readme = include_str!("../../../README.md");
    let named = format!("the QUIC wire format, version {VERSION}.");
    assert!(readme.contains(&named), "README.md does not say {named:?}");
}

#[test]
fn the_protocol_docs_codec_table_is_the_codes_codec_ids() {
    let rows = doc_table("### Codec ids");
    let documented: Vec<(u8, String)> = rows
        .iter()
        .map(|r| (r[0].parse().expect("a codec id"), r[1].clone()))
        .collect();
    let in_code: Vec<(u8, String)> = (0..=u8::MAX)
        .filter_map(|id| Codec::from_wire_id(id).map(|c| (id, format!("{c:?}"))))
        .collect();
    assert_eq!(documented, in_code);
    for (id, _) in &in_code {
        assert_eq!(Codec::from_wire_id(*id).map(Codec::wire_id), Some(*id));
    }
}

#[test]
fn the_protocol_docs_code_table_is_wire_code() {
    let documented: Vec<(String, u32)> = doc_table("## Codes")
        .iter()
        .map(|r| (r[0].clone(), r[1].parse().expect("a code value")))
        .collect();
    let in_code: Vec<(String, u32)> = [
        ("ENDED", code::ENDED as u32),
        ("NOT_FOUND", code::NOT_FOUND as u32),
        ("MOVED", code::MOVED as u32),
        ("TOO_SLOW", code::TOO_SLOW as u32),
        ("TIMEOUT", code::TIMEOUT as u32),
        ("GONE", code::GONE as u32),
        ("CLOSE_SHUTDOWN", code::CLOSE_SHUTDOWN),
        ("CLOSE_ERROR", code::CLOSE_ERROR),
        ("CLOSE_SILENT", code::CLOSE_SILENT),
        ("STREAM_UNWANTED", code::STREAM_UNWANTED),
        ("STREAM_MALFORMED", code::STREAM_MALFORMED),
        ("STREAM_ABANDONED", code::STREAM_ABANDONED),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v))
    .collect();
    assert_eq!(documented, in_code);
}
