//! The RTMP server session after the handshake, fed raw bytes through the path a socket's
//! bytes take: `rtmp::feed_server` (the `ChunkGuard` in front of rml_rtmp's
//! `ServerSession`), every connect, publish and play request accepted as the server does,
//! and audio/video messages given to the ingest's media parsers (`rtmp::IngestMedia`: FLV
//! tag, AVC decoder configuration and SPS, AAC AudioSpecificConfig).
//!
//! Input: one byte choosing how the rest is split into reads (0: one read; n: reads of n
//! bytes), then the bytes a client sends after the handshake.
//!
//! Invariants: no panic or abort (the libFuzzer panic hook aborts even on a panic that
//! `feed_server` would catch: a parser panic is a finding too); the guard never holds more
//! than a header and one command message; no media message larger than the guard's bound
//! reaches the application.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meshcast::media::StreamKey;
use meshcast::rtmp::guard::{ChunkGuard, GuardLimits};
use meshcast::rtmp::{feed_server, IngestMedia};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let limits = GuardLimits::default();
    let mut config = ServerSessionConfig::new();
    config.chunk_size = 4096; // the server's default `rtmp.chunk_size`
    let Ok((mut session, _)) = ServerSession::new(config) else {
        return;
    };
    let mut guard = ChunkGuard::new(limits);
    let mut media: Option<IngestMedia> = None;
    let step = if split == 0 {
        bytes.len().max(1)
    } else {
        split as usize
    };
    for read in bytes.chunks(step) {
        let results = feed_server(&mut guard, &mut session, read);
        assert!(guard.held_bytes() <= 18 + limits.max_command_message);
        let Ok(results) = results else {
            return; // the connection closes
        };
        if handle(&mut session, &mut media, results, &limits).is_err() {
            return;
        }
    }
});

/// What `Connection::handle_event` does with each event, minus the hub and auth (every
/// request is allowed). An error closes the connection.
fn handle(
    session: &mut ServerSession,
    media: &mut Option<IngestMedia>,
    results: Vec<ServerSessionResult>,
    limits: &GuardLimits,
) -> Result<(), ()> {
    for r in results {
        let ServerSessionResult::RaisedEvent(ev) = r else {
            continue;
        };
        match ev {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                session.accept_request(request_id).map_err(drop)?;
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                app_name,
                stream_key,
                ..
            } => {
                let (name, query) = meshcast::auth::split_query(&stream_key);
                let _ = meshcast::auth::token_from_query(query);
                if media.is_some() || StreamKey::new(&app_name, name).is_err() {
                    let _ = session.reject_request(request_id, "NetStream.Publish.BadName", "no");
                    return Err(());
                }
                session.accept_request(request_id).map_err(drop)?;
                *media = Some(IngestMedia::default());
            }
            ServerSessionEvent::PlayStreamRequested {
                request_id,
                app_name,
                stream_key,
                ..
            } => {
                let (name, query) = meshcast::auth::split_query(&stream_key);
                let _ = meshcast::auth::token_from_query(query);
                if StreamKey::new(&app_name, name).is_ok() {
                    session.accept_request(request_id).map_err(drop)?;
                } else {
                    session
                        .reject_request(request_id, "NetStream.Play.StreamNotFound", "no")
                        .map_err(drop)?;
                }
            }
            ServerSessionEvent::PublishStreamFinished { .. } => *media = None,
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => {
                assert!(data.len() <= limits.max_media_message);
                if let Some(m) = media.as_mut() {
                    m.on_video(Bytes::clone(&data), timestamp.value)
                        .map_err(drop)?;
                }
            }
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => {
                assert!(data.len() <= limits.max_media_message);
                if let Some(m) = media.as_mut() {
                    m.on_audio(Bytes::clone(&data), timestamp.value)
                        .map_err(drop)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}
