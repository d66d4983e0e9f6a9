//! The RTMP server protocol after the handshake, fed raw bytes the way a connection feeds
//! them: `rtmp::protocol::ServerProtocol` (the `ChunkGuard` in front of rml_rtmp's
//! `ServerSession`, and the node's own answers), with every publish and play answered as
//! the input's first byte says (accepted, or refused for one of the reasons the driver
//! has), and audio/video given to the ingest's media parsers (`rtmp::IngestMedia`: FLV tag,
//! AVC decoder configuration and SPS, AAC AudioSpecificConfig).
//!
//! Input: one byte choosing how the rest is split into reads (bits 0-6: 0 one read, n reads
//! of n bytes) and whether requests are refused (bit 7), then the bytes a client sends
//! after the handshake.
//!
//! Invariants: no panic or abort (the libFuzzer panic hook aborts even on a panic that the
//! protocol would catch: a parser panic is a finding too); the guard never holds more than
//! a header and one command message; no media message larger than the guard's bound
//! reaches the application.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshcast::rtmp::guard::GuardLimits;
use meshcast::rtmp::protocol::{ProtocolEvent, Refused, ServerProtocol};
use meshcast::rtmp::IngestMedia;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let limits = GuardLimits::default();
    // The server's default `rtmp.chunk_size`.
    let Ok(mut protocol) = ServerProtocol::new(4096, limits) else {
        return;
    };
    let refuse = mode & 0x80 != 0;
    let step = match (mode & 0x7f) as usize {
        0 => bytes.len().max(1),
        n => n,
    };
    let mut media: Option<IngestMedia> = None;
    let mut out = Vec::new();
    for read in bytes.chunks(step) {
        if protocol.handle_input(read).is_err() {
            return; // the connection closes
        }
        assert!(protocol.held_bytes() <= 18 + limits.max_command_message);
        while let Some(ev) = protocol.poll_event() {
            if handle(&mut protocol, &mut media, ev, refuse, &limits).is_err() {
                return;
            }
        }
        protocol.poll_transmit(&mut out);
        out.clear();
    }
});

/// What the connection driver does with each event, minus the hub and auth. An error
/// closes the connection.
fn handle(
    protocol: &mut ServerProtocol,
    media: &mut Option<IngestMedia>,
    ev: ProtocolEvent,
    refuse: bool,
    limits: &GuardLimits,
) -> Result<(), ()> {
    match ev {
        ProtocolEvent::PublishRequested(_) if refuse => {
            let refusal = protocol
                .refuse(Refused::Unauthorized, "no".into())
                .map_err(drop)?;
            if refusal.closes() {
                return Err(());
            }
        }
        ProtocolEvent::PublishRequested(_) => {
            protocol.accept_publish().map_err(drop)?;
            *media = Some(IngestMedia::default());
        }
        ProtocolEvent::PlayRequested(_) if refuse => {
            let refusal = protocol
                .refuse(Refused::NotFound, "no".into())
                .map_err(drop)?;
            if refusal.closes() {
                return Err(());
            }
        }
        ProtocolEvent::PlayRequested(_) => {
            protocol.accept_play().map_err(drop)?;
        }
        ProtocolEvent::Refused(r) if r.closes() => return Err(()),
        ProtocolEvent::PublishFinished => *media = None,
        ProtocolEvent::Video { data, timestamp } => {
            assert!(data.len() <= limits.max_media_message);
            if let Some(m) = media.as_mut() {
                m.on_video(data, timestamp).map_err(drop)?;
            }
        }
        ProtocolEvent::Audio { data, timestamp } => {
            assert!(data.len() <= limits.max_media_message);
            if let Some(m) = media.as_mut() {
                m.on_audio(data, timestamp).map_err(drop)?;
            }
        }
        _ => {}
    }
    Ok(())
}
