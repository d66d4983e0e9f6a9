//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/<target>/seed-*`): real byte
//! sequences made by the real encoders, so each target starts from inputs that reach deep
//! (an RTMP publish recorded from rml_rtmp's client, a backbone hello with a valid proof for
//! the target's fixed nonces, RTP from meshcast's own packetizers, a str0m offer...).
//!
//! Run from the repository root: `cargo run --example fuzz_seeds`. Deterministic except for
//! the SDP offers (str0m draws ICE credentials and fingerprints).

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use meshcast::backbone::session::{ControlSession, PeerInfo};
use meshcast::backbone::wire::{Announcement, ControlMessage, GroupHeader, MediaItem, NodeRecord};
use meshcast::config::Role;
use meshcast::media::{
    avc, AudioConfig, Codec, Frame, Metadata, StreamConfig, StreamKey, Timebase, VideoConfig,
};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionResult, PublishRequestType, ServerSession,
    ServerSessionConfig, ServerSessionEvent, ServerSessionResult, StreamMetadata,
};
use rml_rtmp::time::RtmpTimestamp;

// SPS and PPS of `ffmpeg -f lavfi -i testsrc2=size=1280x720 -c:v libx264` (as in avc.rs).
const SPS: &[u8] = &[
    0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00, 0x03, 0x00,
    0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
];
const PPS: &[u8] = &[0x68, 0xeb, 0xe3, 0xcb, 0x22, 0xc0];
/// AAC-LC, 44.1 kHz, stereo.
const ASC: &[u8] = &[0x12, 0x10];
/// The fuzz targets' backbone token and nonces (`fuzz_targets/backbone_session.rs`).
const TOKEN: &str = "a-cluster-token-of-32-characters";
/// The auth target's secret (`fuzz_targets/auth_token.rs`).
const AUTH_SECRET: &str = "fuzz-secret-of-at-least-32-bytes!";

fn main() -> anyhow::Result<()> {
    let root = Path::new("fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(format!("seed-{name}")), bytes)?;
        Ok(())
    };
    let with = |b: u8, rest: &[u8]| [&[b][..], rest].concat();

    // Media bodies.
    let record = avc::decoder_config_record(SPS, PPS);
    let video_header = [&[0x17, 0, 0, 0, 0][..], &record].concat();
    let idr = [&[0, 0, 0, 5, 0x65, 0x88, 0x84, 0x00, 0x33][..]].concat();
    let video_frame = [&[0x17, 1, 0, 0, 0x28][..], &idr].concat();
    let audio_header = [&[0xaf, 0][..], ASC].concat();
    let audio_frame = [&[0xaf, 1][..], &[0x21, 0x10, 0x04, 0x60, 0x8c][..]].concat();

    // RTMP: a whole publish and a play, as rml_rtmp's client sends them.
    let publish = rtmp_client_bytes(
        true,
        &video_header,
        &video_frame,
        &audio_header,
        &audio_frame,
    )?;
    let play = rtmp_client_bytes(false, &[], &[], &[], &[])?;
    write("rtmp_server", "publish", &with(0, &publish))?;
    write("rtmp_server", "publish-split-7", &with(7, &publish))?;
    write("rtmp_server", "play", &with(0, &play))?;

    write("flv_tag", "avc-header", &with(0, &video_header))?;
    write("flv_tag", "avc-idr", &with(0, &video_frame))?;
    write("flv_tag", "aac-header", &with(1, &audio_header))?;
    write("flv_tag", "aac-frame", &with(1, &audio_frame))?;
    write("avc_config", "record-720p", &with(0, &record))?;
    write("avc_config", "sps-720p", &with(1, SPS))?;
    write(
        "avc_config",
        "sps-baseline",
        &with(
            1,
            &[0x67, 0x42, 0xc0, 0x1e, 0xd9, 0x00, 0xa0, 0x47, 0xfe, 0xc8],
        ),
    )?;
    write("aac_config", "lc-44k-stereo", ASC)?;
    write("aac_config", "he-48k", &[0x2b, 0x11, 0x88, 0x00])?;
    write(
        "aac_config",
        "explicit-rate",
        &[0x17, 0x80, 0x00, 0xac, 0x44, 0x10],
    )?;

    // Backbone.
    let key = StreamKey::new("live", "demo")?;
    let config = StreamConfig {
        video: Some(VideoConfig {
            codec: Codec::H264,
            record: Bytes::from(record.clone()),
            width: 1280,
            height: 720,
        }),
        audio: Some(AudioConfig {
            codec: Codec::Aac,
            specific: Bytes::from_static(ASC),
            sample_rate: 44100,
            channels: 2,
        }),
        metadata: Metadata {
            frame_rate: Some(30.0),
            video_bitrate_kbps: Some(2500.0),
            audio_bitrate_kbps: None,
            encoder: Some("obs".into()),
        },
        simulcast: vec![],
    };
    let frame = Frame {
        codec: Codec::H264,
        dts: 40,
        pts: 80,
        timebase: Timebase::MILLIS,
        keyframe: true,
        payload: Bytes::from(idr.clone()),
    };
    let mut group = BytesMut::new();
    GroupHeader {
        subscription: 1,
        sequence: 0,
    }
    .encode(&mut group);
    for item in [
        MediaItem::Publishes(1),
        MediaItem::Config(config.clone()),
        MediaItem::Frame(frame.clone()),
    ] {
        item.encode(&mut group);
    }
    let record_msg = ControlMessage::NodeState(vec![NodeRecord {
        node: "origin-a".into(),
        role: Role::Origin,
        region: "eu".into(),
        http_url: "http://192.0.2.1:8080".into(),
        rtmp_url: "rtmp://192.0.2.1:1935".into(),
        incarnation: 7,
        age_ms: 0,
        viewers: 3,
        load_permille: 120,
        egress: 0,
        out_bps: 1_000_000,
        links: vec![("edge-1".into(), 12_000, 3)],
        streams: vec![key.clone()],
        pulls: vec![("edge-1".into(), 1)],
    }]);
    let mut control = BytesMut::new();
    for m in [
        ControlMessage::Announce(Announcement {
            stream: key.clone(),
            timeline: 9,
            started_ms: 1000,
        }),
        ControlMessage::SubscribeOk { id: 1, timeline: 9 },
        ControlMessage::SubscribeDone {
            id: 1,
            code: 0,
            reason: "ended".into(),
        },
        record_msg.clone(),
    ] {
        m.encode(&mut control);
    }
    write("backbone_wire", "group", &with(2 | (5 << 2), &group))?;
    write(
        "backbone_wire",
        "control",
        &with(1, &[&[0u8; 19][..], &control].concat()),
    )?;

    // Control sessions: what each side of a real pair sends, for the target's modes.
    let info = |id: &str, role| PeerInfo {
        node_id: id.into(),
        role,
        region: "eu".into(),
    };
    let mut dialer = ControlSession::dialer(info("edge-1", Role::Edge), TOKEN, [1; 32], [0; 32]);
    let mut acceptor =
        ControlSession::acceptor(info("origin-a", Role::Origin), TOKEN, [2; 32], [0; 32]);
    let (mut to_acceptor, mut to_dialer) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let b = dialer.poll_transmit().expect("hello, then auth");
        to_acceptor.extend_from_slice(&b);
        acceptor.handle_input(&b)?;
        let b = acceptor.poll_transmit().expect("challenge, then welcome");
        to_dialer.extend_from_slice(&b);
        dialer.handle_input(&b)?;
    }
    let id = dialer.subscribe(key.clone())?;
    dialer.request_keyframe(id)?;
    dialer.node_state(vec![]);
    let after_hello = dialer.poll_transmit().expect("subscribe");
    to_acceptor.extend_from_slice(&after_hello);
    acceptor.handle_input(&after_hello)?;
    acceptor.announce(Announcement {
        stream: key.clone(),
        timeline: 9,
        started_ms: 1000,
    })?;
    acceptor.accept(id, 9)?;
    acceptor.done(id, 0, "ended")?;
    let from_acceptor = acceptor.poll_transmit().expect("announce, ok, done");
    to_dialer.extend_from_slice(&from_acceptor);
    write(
        "backbone_session",
        "acceptor-hello-auth-subscribe",
        &with(0, &to_acceptor),
    )?;
    write(
        "backbone_session",
        "dialer-challenge-welcome-announce",
        &with(1, &to_dialer),
    )?;
    write(
        "backbone_session",
        "ready-acceptor-subscribe",
        &with(2, &after_hello),
    )?;
    write(
        "backbone_session",
        "ready-dialer-answers",
        &with(3, &from_acceptor),
    )?;

    // Group sequencer ops: items of groups 0 and 1 interleaved, an end, time passing.
    let mut ops = Vec::new();
    let item = |ops: &mut Vec<u8>, group: u8, m: &MediaItem| {
        let mut b = BytesMut::new();
        m.encode(&mut b);
        ops.push((group << 4) | 1);
        ops.extend_from_slice(&b);
    };
    item(&mut ops, 0, &MediaItem::Publishes(1));
    item(&mut ops, 1, &MediaItem::Frame(frame.clone()));
    item(&mut ops, 0, &MediaItem::Config(config.clone()));
    ops.push(1 << 3 | 1); // end of group 0
    ops.extend_from_slice(&[(2 << 4) | 1 | 0x0c, 100]); // time passes
    let mut header_op = vec![0u8]; // an item of the group a header names
    let mut h = BytesMut::new();
    GroupHeader {
        subscription: 1,
        sequence: 2,
    }
    .encode(&mut h);
    header_op.extend_from_slice(&h);
    let mut b = BytesMut::new();
    MediaItem::Frame(frame.clone()).encode(&mut b);
    header_op.extend_from_slice(&b);
    ops.extend_from_slice(&header_op);
    write("group_sequencer", "two-groups", &ops)?;

    // STUN: a binding request as a browser sends it (USERNAME, then other attributes).
    let stun = stun_binding_request("abcd:remote12");
    let mut dgrams = Vec::new();
    for src in [1u8, 2] {
        dgrams.extend_from_slice(&[src, stun.len() as u8]);
        dgrams.extend_from_slice(&stun);
        dgrams.extend_from_slice(&[src, 4, 0x80, 0x60, 0, 1]); // then RTP from that address
    }
    write("stun_demux", "binding-then-rtp", &dgrams)?;
    write(
        "stun_demux",
        "other-peer",
        &[&[3u8, 0][..], &[9, 48], &stun_binding_request("wxyz:r")].concat(),
    )?;

    // RTP: a keyframe and a P frame through meshcast's packetizers (small MTU: FU-A).
    let mut avcc = Vec::new();
    for nal in [&[0x65u8; 300][..], &[0x41; 80]] {
        avcc.extend_from_slice(&(nal.len() as u32).to_be_bytes());
        avcc.extend_from_slice(nal);
    }
    let h264 = meshcast::webrtc::h264::packetize(&avcc, SPS, PPS, 120);
    write("rtp_assembler", "h264-idr-fua", &with(0, &rtp_ops(&h264)))?;
    // A VP8 keyframe: frame tag, start code, 640x480.
    let mut vp8_key = vec![0x50, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
    vp8_key.extend_from_slice(&[0x55; 200]);
    let vp8 = meshcast::webrtc::vp8::packetize(&vp8_key, 100);
    write("rtp_assembler", "vp8-key", &with(1, &rtp_ops(&vp8)))?;

    // SDP: offers as str0m makes them (a browser-like WHIP publisher and WHEP viewer), and
    // the hand-written one of tests/webrtc.rs.
    write(
        "sdp_offer",
        "whip-h264-opus",
        &with(0, offer(true).as_bytes()),
    )?;
    write(
        "sdp_offer",
        "whep-recvonly",
        &with(1, offer(false).as_bytes()),
    )?;
    let minimal = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\na=recvonly\r\n";
    write("sdp_offer", "minimal-vp8", &with(1, minimal.as_bytes()))?;

    // Rooms: a participant's frames (0) and another node's bus messages (1).
    write(
        "room_messages",
        "data",
        &with(0, br#"{"type":"data","payload":{"text":"hi"}}"#),
    )?;
    write(
        "room_messages",
        "whisper",
        &with(0, br#"{"type":"data","to":"bob","payload":"psst"}"#),
    )?;
    write(
        "room_messages",
        "mute",
        &with(0, br#"{"type":"mute","kind":"video","muted":true}"#),
    )?;
    write("room_messages", "slice", &with(1, br#"{"t":"slice","room":"r1","node":"n2","stamp":[1,2],"participants":[{"identity":"bob","name":"Bob","session":7,"node":"n2","joined_ms":1,"audio_muted":false,"video_muted":true}],"tracks":[{"stream":"room/r1.bob","node":"n2","level":30}],"reason":"left"}"#))?;
    write("room_messages", "room", &with(1, br#"{"t":"room","info":{"id":"r2","name":"x","max_participants":4,"empty_timeout_s":60,"created_ms":0}}"#))?;
    write(
        "room_messages",
        "closed",
        &with(1, br#"{"t":"closed","room":"r1"}"#),
    )?;
    write(
        "room_messages",
        "bus-data",
        &with(
            1,
            br#"{"t":"data","room":"r1","from":"a","to":"b","payload":1,"id":["n1",5]}"#,
        ),
    )?;

    // Egress.
    write("egress_request", "rtmp", &with(0, br#"{"stream":"live/demo","kind":"rtmp","url":"rtmp://a.rtmp.youtube.com/live2/xxxx-yyyy","on_reconnect":"continue"}"#))?;
    write("egress_request", "record", &with(0, br#"{"stream":"live/demo","kind":"record","format":"mkv","template":"{ns}/{stream}/{start_time}-{seq}.{ext}","segment_seconds":600,"segment_mb":512}"#))?;
    write("egress_request", "rule", &with(1, br#"{"stream":"live/*","kind":"rtmp","url":"rtmp://cdn.example:1936/app/{ns}-{stream}?k=1","transcode_video":true,"wait_seconds":60}"#))?;
    write(
        "egress_paths",
        "url",
        &with(0, b"rtmp://[2001:db8::1]:1936/live/app/key?token=abc"),
    )?;
    write(
        "egress_paths",
        "template",
        &with(
            1,
            b"{ns}/{stream}/{start_time}-{seq}.{ext}\nlive/demo~sim.h",
        ),
    )?;
    write(
        "egress_policy",
        "cdn",
        b"rtmp://*.cdn.example/*\nrtmp://ingest.example:1936/live/*\nrtmp://a.cdn.example/app/key",
    )?;

    // Configs: the shipped ones and the examples (recording to S3 among them), and
    // namespaces with their own auth, limits, egress rules and relay.
    for dir in ["configs", "examples"] {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                write("config_parse", &name, &fs::read(&path)?)?;
            }
        }
    }
    write(
        "config_parse",
        "namespaces",
        b"[namespaces]\nstrict = true\n[[namespace]]\nname = \"a\"\nrelay = false\n\
          recording_root = \"rec-a\"\nauth = { secrets = [\"0123456789abcdef0\"] }\n\
          limits = { max_streams = 2, max_viewers = 9, max_bitrate_kbps = 900 }\n\
          [[namespace.egress]]\nstream = \"*\"\nkind = \"record\"\n[[namespace]]\nname = \"b\"\n",
    )?;

    // Auth: a token this node minted, bare and in a stream key's query.
    let keys = meshcast::auth::Keys::new(&[AUTH_SECRET.to_string()], &[] as &[&str])
        .map_err(anyhow::Error::msg)?;
    let token = keys
        .mint(&meshcast::auth::Claims {
            act: meshcast::auth::token::OneOrMany::One(meshcast::auth::Action::Publish),
            streams: vec!["live/*".into()],
            exp: 4_102_444_800,
            nbf: None,
            iat: None,
            sub: Some("fuzz".into()),
            room: None,
            name: None,
            ns: None,
        })
        .map_err(anyhow::Error::msg)?;
    write("auth_token", "token", token.as_bytes())?;
    write(
        "auth_token",
        "stream-key",
        format!("demo?region=eu&token={token}").as_bytes(),
    )?;
    println!("seeds written under {}", root.display());
    Ok(())
}

/// What an rml_rtmp client sends after the handshake for a publish (with media) or a play,
/// against a server session that accepts everything.
fn rtmp_client_bytes(
    publish: bool,
    video_header: &[u8],
    video_frame: &[u8],
    audio_header: &[u8],
    audio_frame: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let (mut client, first) =
        ClientSession::new(ClientSessionConfig::new()).map_err(|e| err(&e))?;
    let mut config = ServerSessionConfig::new();
    config.chunk_size = 4096;
    let (mut server, greeting) = ServerSession::new(config).map_err(|e| err(&e))?;
    let mut sent = Vec::new();
    let mut to_server: Vec<ClientSessionResult> = first;
    // The server's first messages (its chunk size among them) reach the client first.
    for r in greeting {
        if let ServerSessionResult::OutboundResponse(p) = r {
            to_server.extend(client.handle_input(&p.bytes).map_err(|e| err(&e))?);
        }
    }
    to_server.push(
        client
            .request_connection("live".into())
            .map_err(|e| err(&e))?,
    );
    // Pump until the client is connected, then publishing or playing.
    let mut asked = false;
    for _ in 0..10 {
        let mut replies = Vec::new();
        for r in to_server.drain(..) {
            if let ClientSessionResult::OutboundResponse(p) = r {
                sent.extend_from_slice(&p.bytes);
                for r in server.handle_input(&p.bytes).map_err(|e| err(&e))? {
                    match r {
                        ServerSessionResult::OutboundResponse(p) => replies.push(p.bytes),
                        ServerSessionResult::RaisedEvent(
                            ServerSessionEvent::ConnectionRequested { request_id, .. }
                            | ServerSessionEvent::PublishStreamRequested { request_id, .. }
                            | ServerSessionEvent::PlayStreamRequested { request_id, .. },
                        ) => {
                            for r in server.accept_request(request_id).map_err(|e| err(&e))? {
                                if let ServerSessionResult::OutboundResponse(p) = r {
                                    replies.push(p.bytes);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        for b in replies {
            to_server.extend(client.handle_input(&b).map_err(|e| err(&e))?);
        }
        if !asked && to_server.is_empty() {
            asked = true;
            to_server.push(if publish {
                client
                    .request_publishing("demo?token=abc".into(), PublishRequestType::Live)
                    .map_err(|e| err(&e))?
            } else {
                client
                    .request_playback("demo".into())
                    .map_err(|e| err(&e))?
            });
        }
    }
    if publish {
        let metadata = StreamMetadata {
            video_width: Some(1280),
            video_height: Some(720),
            video_codec_id: Some(7),
            video_frame_rate: Some(30.0),
            video_bitrate_kbps: Some(2500),
            audio_codec_id: Some(10),
            audio_bitrate_kbps: Some(128),
            audio_sample_rate: Some(44100),
            audio_channels: Some(2),
            audio_is_stereo: Some(true),
            encoder: Some("obs-output module".into()),
        };
        let ts = RtmpTimestamp::new;
        let packets = [
            client.publish_metadata(&metadata),
            client.publish_video_data(Bytes::copy_from_slice(video_header), ts(0), false),
            client.publish_audio_data(Bytes::copy_from_slice(audio_header), ts(0), false),
            client.publish_video_data(Bytes::copy_from_slice(video_frame), ts(0), false),
            client.publish_audio_data(Bytes::copy_from_slice(audio_frame), ts(23), false),
            client.publish_video_data(Bytes::copy_from_slice(video_frame), ts(33), false),
        ];
        for p in packets {
            if let ClientSessionResult::OutboundResponse(p) = p.map_err(|e| err(&e))? {
                sent.extend_from_slice(&p.bytes);
            }
        }
        for r in client.stop_publishing().map_err(|e| err(&e))? {
            if let ClientSessionResult::OutboundResponse(p) = r {
                sent.extend_from_slice(&p.bytes);
            }
        }
    }
    Ok(sent)
}

fn stun_binding_request(username: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    // PRIORITY and ICE-CONTROLLING, as browsers add them.
    attrs.extend_from_slice(&[0x00, 0x24, 0, 4, 0x6e, 0x7f, 0x1e, 0xff]);
    attrs.extend_from_slice(&[0x80, 0x2a, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    let mut p = vec![0x00, 0x01];
    p.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    p.extend_from_slice(&[7; 12]);
    p.extend_from_slice(&attrs);
    p
}

/// The target's packet encoding: flags (the marker), sequence step +1, timestamp step 0,
/// length, payload.
fn rtp_ops(payloads: &[std::sync::Arc<[u8]>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let last = i + 1 == payloads.len();
        out.extend_from_slice(&[last as u8, 0x10, 0, p.len().min(255) as u8]);
        out.extend_from_slice(&p[..p.len().min(255)]);
    }
    out
}

/// An offer as a WHIP publisher (send H.264 + Opus) or a WHEP viewer (receive) makes it.
fn offer(publisher: bool) -> String {
    use str0m::media::{Direction, MediaKind};
    let mut rtc = str0m::Rtc::builder().build(std::time::Instant::now());
    let addr: SocketAddr = "192.0.2.20:50000".parse().expect("an address");
    if let Ok(c) = str0m::Candidate::host(addr, "udp") {
        rtc.add_local_candidate(c);
    }
    let dir = if publisher {
        Direction::SendOnly
    } else {
        Direction::RecvOnly
    };
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, dir, None, None, None);
    api.add_media(MediaKind::Audio, dir, None, None, None);
    let (offer, _) = api.apply().expect("something to offer");
    offer.to_sdp_string()
}
