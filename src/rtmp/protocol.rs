//! The server side of one RTMP session, sans-IO: bytes a peer sent in, bytes to send and
//! [`ProtocolEvent`]s out.
//!
//! [`ServerProtocol`] wraps rml_rtmp's `ServerSession` behind the [`guard`]
//! and owns every reply the server sends: it accepts `connect` and `createStream`, answers
//! pings and acknowledgements (rml_rtmp does), and turns a `publish` or `play` into a
//! [`ProtocolEvent::PublishRequested`] / [`ProtocolEvent::PlayRequested`] that the driver
//! answers later with [`ServerProtocol::accept_publish`], [`ServerProtocol::accept_play`] or
//! [`ServerProtocol::refuse`]. What the protocol can decide alone it decides here: a name
//! that is no stream key, or a second publish or play on a connection that already
//! publishes, plays or waits for an answer, is refused at once ([`Refused::BadName`],
//! [`Refused::Busy`]) and reported as [`ProtocolEvent::Refused`]. Each [`Refusal`] knows its
//! `onStatus` code ([`status`]) and whether the connection closes after it.
//!
//! **Between a request and its answer** the session keeps being fed: control messages are
//! answered, a second request is refused as busy. Media and `@setDataFrame` sent before a
//! publish is accepted are dropped (rml_rtmp ignores media on a stream that is not
//! publishing): FFmpeg, OBS (librtmp) and GStreamer all wait for `NetStream.Publish.Start`
//! before they send any, and a server that did not read meanwhile dropped it the same way
//! when it arrived in the same read as the `publish`.
//!
//! It does no I/O and reads no clock: the driver ([`super::server`]) feeds it bytes, drains
//! [`ServerProtocol::poll_transmit`] and [`ServerProtocol::poll_event`], and writes.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult, StreamMetadata,
};

use super::{chunk, guard, RtmpError};
use crate::media::StreamKey;

/// The `onStatus` codes of the refusals this server sends (the accepting ones,
/// `NetStream.Publish.Start` and `NetStream.Play.Start`, come from rml_rtmp).
pub mod status {
    /// A publish on a connection that already publishes, plays or waits for an answer.
    pub const PUBLISH_BAD_CONNECTION: &str = "NetStream.Publish.BadConnection";
    /// A publish refused for its name: not a stream key, already live (here or on another
    /// origin), over a limit, or the publisher was evicted.
    pub const PUBLISH_BAD_NAME: &str = "NetStream.Publish.BadName";
    /// A publish that auth refused.
    pub const PUBLISH_UNAUTHORIZED: &str = "NetStream.Publish.Unauthorized";
    /// A play that auth refused.
    pub const PLAY_UNAUTHORIZED: &str = "NetStream.Play.Unauthorized";
    /// A play over the viewer limits.
    pub const PLAY_FAILED: &str = "NetStream.Play.Failed";
    /// A play of a stream that is not live, cannot be played over RTMP, or is no stream key.
    pub const PLAY_STREAM_NOT_FOUND: &str = "NetStream.Play.StreamNotFound";
}

/// The message stream a publisher publishes on: the first `createStream` (rml_rtmp counts
/// from 1; FFmpeg and OBS create one stream). rml_rtmp does not say which stream a publish
/// came on.
const PUBLISH_STREAM_ID: u32 = 1;
/// The chunk stream rml_rtmp uses for AMF data messages.
const RML_DATA_CSID: u8 = 3;
/// A chunk stream rml_rtmp never uses, for status messages built here (full header, so
/// rml_rtmp's header compression state is not disturbed).
const STATUS_CSID: u8 = 10;

/// What a peer asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Publish,
    Play,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Publish => "publish",
            Command::Play => "play",
        }
    }
}

/// Why a publish or play was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The connection already publishes, plays or waits for an answer.
    Busy,
    /// The name is not a stream key.
    BadName,
    /// Auth said no.
    Unauthorized,
    /// Over a stream or viewer limit.
    Limit,
    /// Publish: the name is live already (here or on another origin).
    Taken,
    /// Play: the stream is not live, or cannot be played over RTMP.
    NotFound,
}

/// A refused publish or play: what the peer is told and what happens to its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub command: Command,
    /// `app/name` as asked for (never the query).
    pub stream: String,
    pub why: Refused,
    /// The description the peer is sent.
    pub reason: String,
}

impl Refusal {
    /// The `onStatus` code the peer is sent.
    pub fn code(&self) -> &'static str {
        match (self.command, self.why) {
            (Command::Publish, Refused::Busy) => status::PUBLISH_BAD_CONNECTION,
            (Command::Publish, Refused::Unauthorized) => status::PUBLISH_UNAUTHORIZED,
            (Command::Publish, _) => status::PUBLISH_BAD_NAME,
            (Command::Play, Refused::Unauthorized) => status::PLAY_UNAUTHORIZED,
            (Command::Play, Refused::Limit) => status::PLAY_FAILED,
            (Command::Play, _) => status::PLAY_STREAM_NOT_FOUND,
        }
    }

    /// Whether the connection closes after the refusal (a refused player may ask again).
    pub fn closes(&self) -> bool {
        match self.command {
            Command::Publish => true,
            Command::Play => matches!(self.why, Refused::Unauthorized | Refused::Limit),
        }
    }
}

/// A publish or play waiting for the driver's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub key: StreamKey,
    /// The query of the stream key and the application (`token=...`), never part of `key`.
    pub query: String,
}

/// What the peer did, for the driver.
#[derive(Debug)]
pub enum ProtocolEvent {
    /// Answer with [`ServerProtocol::accept_publish`] or [`ServerProtocol::refuse`].
    PublishRequested(Request),
    /// Answer with [`ServerProtocol::accept_play`] or [`ServerProtocol::refuse`].
    PlayRequested(Request),
    /// Refused by the protocol itself (already answered).
    Refused(Refusal),
    /// The publisher stopped publishing (`FCUnpublish`/`deleteStream`).
    PublishFinished,
    /// The player stopped playing.
    PlayFinished,
    Metadata(StreamMetadata),
    Video {
        data: Bytes,
        timestamp: u32,
    },
    Audio {
        data: Bytes,
        timestamp: u32,
    },
}

/// Where the session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// A request is out with the driver.
    Pending {
        command: Command,
        request_id: u32,
        stream_id: u32,
    },
    Publishing,
    Playing {
        stream_id: u32,
    },
}

/// One RTMP server session (see the module doc).
pub struct ServerProtocol {
    session: ServerSession,
    guard: guard::ChunkGuard,
    chunk_size: usize,
    phase: Phase,
    /// The pending request's `app/name`, for its refusal.
    pending_stream: String,
    transmit: Vec<Bytes>,
    events: VecDeque<ProtocolEvent>,
}

impl ServerProtocol {
    /// A session that sends with `chunk_size` and reads within `limits`; its opening
    /// messages (window size, chunk size) are ready in [`ServerProtocol::poll_transmit`].
    pub fn new(chunk_size: u32, limits: guard::GuardLimits) -> Result<Self, RtmpError> {
        let mut config = ServerSessionConfig::new();
        config.chunk_size = chunk_size;
        let (session, results) = session_call(ServerSession::new(config))?;
        let mut protocol = ServerProtocol {
            session,
            guard: guard::ChunkGuard::new(limits),
            chunk_size: chunk_size as usize,
            phase: Phase::Idle,
            pending_stream: String::new(),
            transmit: Vec::new(),
            events: VecDeque::new(),
        };
        protocol.handle_results(results)?;
        Ok(protocol)
    }

    /// Bytes the peer sent (after the handshake). An error closes the connection.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), RtmpError> {
        let results = feed_server(&mut self.guard, &mut self.session, bytes)?;
        self.handle_results(results)
    }

    /// Moves the bytes to send into `out`, in order.
    pub fn poll_transmit(&mut self, out: &mut Vec<Bytes>) {
        out.append(&mut self.transmit);
    }

    /// The next thing the peer did.
    pub fn poll_event(&mut self) -> Option<ProtocolEvent> {
        self.events.pop_front()
    }

    /// Bytes the guard holds between reads (a header and one command message at most).
    pub fn held_bytes(&self) -> usize {
        self.guard.held_bytes()
    }

    /// Whether a publish or play waits for the driver's answer.
    pub fn awaits_answer(&self) -> bool {
        matches!(self.phase, Phase::Pending { .. })
    }

    pub fn is_playing(&self) -> bool {
        matches!(self.phase, Phase::Playing { .. })
    }

    /// Accepts the pending publish: `NetStream.Publish.Start`, and media flows from now on.
    pub fn accept_publish(&mut self) -> Result<(), RtmpError> {
        let Phase::Pending {
            command: Command::Publish,
            request_id,
            ..
        } = self.phase
        else {
            return Err(RtmpError::Session("no publish to accept".into()));
        };
        let results = session_call(self.session.accept_request(request_id))?;
        self.send(results);
        self.phase = Phase::Publishing;
        Ok(())
    }

    /// Accepts the pending play; returns the message stream to send its media on.
    pub fn accept_play(&mut self) -> Result<u32, RtmpError> {
        let Phase::Pending {
            command: Command::Play,
            request_id,
            stream_id,
        } = self.phase
        else {
            return Err(RtmpError::Session("no play to accept".into()));
        };
        let results = session_call(self.session.accept_request(request_id))?;
        for r in results {
            if let ServerSessionResult::OutboundResponse(p) = r {
                // rml_rtmp also sends `|RtmpSampleAccess` and an `onStatus` *data* message
                // (chunk stream 3, used for nothing else here). FFmpeg's FLV demuxer turns
                // unknown data messages into extra streams, so they are left out.
                if p.bytes.first().map(|b| b & 0x3f) != Some(RML_DATA_CSID) {
                    self.transmit.push(Bytes::from(p.bytes));
                }
            }
        }
        self.phase = Phase::Playing { stream_id };
        Ok(stream_id)
    }

    /// Refuses the pending publish or play with an `_error` status (`why` picks its code);
    /// returns the refusal so the driver can log it and close if it [`Refusal::closes`].
    pub fn refuse(&mut self, why: Refused, reason: String) -> Result<Refusal, RtmpError> {
        let Phase::Pending {
            command,
            request_id,
            ..
        } = self.phase
        else {
            return Err(RtmpError::Session("no request to refuse".into()));
        };
        self.phase = Phase::Idle;
        let refusal = Refusal {
            command,
            stream: std::mem::take(&mut self.pending_stream),
            why,
            reason,
        };
        self.reject(request_id, &refusal)?;
        Ok(refusal)
    }

    /// Ends a publish the hub evicted: an `onStatus` error the client prints (FFmpeg:
    /// "Server error: ..."). The driver closes the connection after it.
    pub fn evict(&mut self, reason: &str) -> Result<(), RtmpError> {
        self.phase = Phase::Idle;
        let status = rml_rtmp::messages::RtmpMessage::Amf0Command {
            command_name: "onStatus".into(),
            transaction_id: 0.0,
            command_object: rml_amf0::Amf0Value::Null,
            additional_arguments: vec![rml_amf0::Amf0Value::Object(
                [
                    ("level", "error"),
                    ("code", status::PUBLISH_BAD_NAME),
                    ("description", reason),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), rml_amf0::Amf0Value::Utf8String(v.into())))
                .collect(),
            )],
        };
        let payload = status
            .into_message_payload(rml_rtmp::time::RtmpTimestamp::new(0), PUBLISH_STREAM_ID)
            .map_err(|e| RtmpError::Session(e.to_string()))?;
        self.transmit.push(chunk::encode_message(
            STATUS_CSID,
            payload.type_id,
            0,
            PUBLISH_STREAM_ID,
            &payload.data,
            self.chunk_size,
        ));
        Ok(())
    }

    /// The played stream ended: `NetStream.Play.Complete`. The driver closes after it.
    pub fn end_of_stream(&mut self) {
        if let Phase::Playing { stream_id } = self.phase {
            self.phase = Phase::Idle;
            if let Ok(p) = self.session.finish_playing(stream_id) {
                self.transmit.push(Bytes::from(p.bytes));
            }
        }
    }

    fn handle_results(&mut self, results: Vec<ServerSessionResult>) -> Result<(), RtmpError> {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => {
                    self.transmit.push(Bytes::from(p.bytes))
                }
                ServerSessionResult::RaisedEvent(ev) => self.on_session_event(ev)?,
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(())
    }

    /// Queues the bytes of an answer (answers raise no events).
    fn send(&mut self, results: Vec<ServerSessionResult>) {
        for r in results {
            if let ServerSessionResult::OutboundResponse(p) = r {
                self.transmit.push(Bytes::from(p.bytes));
            }
        }
    }

    fn on_session_event(&mut self, event: ServerSessionEvent) -> Result<(), RtmpError> {
        let publishing = self.phase == Phase::Publishing;
        match event {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                let results = session_call(self.session.accept_request(request_id))?;
                self.send(results);
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                app_name,
                stream_key,
                ..
            } => self.on_request(
                Command::Publish,
                request_id,
                PUBLISH_STREAM_ID,
                &app_name,
                &stream_key,
            )?,
            ServerSessionEvent::PlayStreamRequested {
                request_id,
                app_name,
                stream_key,
                stream_id,
                ..
            } => self.on_request(Command::Play, request_id, stream_id, &app_name, &stream_key)?,
            ServerSessionEvent::PublishStreamFinished { .. } if publishing => {
                self.phase = Phase::Idle;
                self.events.push_back(ProtocolEvent::PublishFinished);
            }
            ServerSessionEvent::PlayStreamFinished { .. } if self.is_playing() => {
                self.phase = Phase::Idle;
                self.events.push_back(ProtocolEvent::PlayFinished);
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } if publishing => {
                self.events.push_back(ProtocolEvent::Metadata(metadata));
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } if publishing => self.events.push_back(ProtocolEvent::Video {
                data,
                timestamp: timestamp.value,
            }),
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } if publishing => self.events.push_back(ProtocolEvent::Audio {
                data,
                timestamp: timestamp.value,
            }),
            _ => {}
        }
        Ok(())
    }

    /// A publish or play: refused here if the protocol can tell, else out to the driver.
    fn on_request(
        &mut self,
        command: Command,
        request_id: u32,
        stream_id: u32,
        app: &str,
        stream_key: &str,
    ) -> Result<(), RtmpError> {
        let (app, name, query) = rtmp_names(app, stream_key);
        let stream = format!("{app}/{name}");
        let refused = |why, reason: String| Refusal {
            command,
            stream: stream.clone(),
            why,
            reason,
        };
        let refusal = if self.phase != Phase::Idle {
            refused(
                Refused::Busy,
                "connection is already publishing or playing".into(),
            )
        } else {
            match StreamKey::new(&app, &name) {
                Ok(key) => {
                    self.phase = Phase::Pending {
                        command,
                        request_id,
                        stream_id,
                    };
                    self.pending_stream = stream;
                    let request = Request { key, query };
                    self.events.push_back(match command {
                        Command::Publish => ProtocolEvent::PublishRequested(request),
                        Command::Play => ProtocolEvent::PlayRequested(request),
                    });
                    return Ok(());
                }
                Err(e) => refused(Refused::BadName, e.to_string()),
            }
        };
        self.reject(request_id, &refusal)?;
        self.events.push_back(ProtocolEvent::Refused(refusal));
        Ok(())
    }

    fn reject(&mut self, request_id: u32, refusal: &Refusal) -> Result<(), RtmpError> {
        let results = session_call(self.session.reject_request(
            request_id,
            refusal.code(),
            &refusal.reason,
        ))?;
        self.send(results);
        Ok(())
    }
}

/// The application and stream names of a publish or play without their queries, and the
/// query (the token) from either: FFmpeg puts it on the stream key (`live/demo?token=T`),
/// some encoders on the application (`rtmp://host/live?token=T` + key `demo`). A query never
/// becomes part of a name, so a token never reaches a log line through one.
fn rtmp_names(app: &str, stream_key: &str) -> (String, String, String) {
    let (app, app_query) = crate::auth::split_query(app);
    let (name, key_query) = crate::auth::split_query(stream_key);
    let query = match (app_query.is_empty(), key_query.is_empty()) {
        (_, false) if !app_query.is_empty() => format!("{key_query}&{app_query}"),
        (_, false) => key_query.to_string(),
        (false, true) => app_query.to_string(),
        (true, true) => String::new(),
    };
    (app.to_string(), name.to_string(), query)
}

/// Feeds bytes a peer sent after the handshake to the session once the guard passed them;
/// a panic inside the parser becomes an error for this connection only. [`ServerProtocol`]
/// goes through here, and the fuzz target (`fuzz/fuzz_targets/rtmp_server.rs`) drives
/// [`ServerProtocol`] itself, so it exercises exactly what a socket's bytes reach.
pub fn feed_server(
    guard: &mut guard::ChunkGuard,
    session: &mut ServerSession,
    bytes: &[u8],
) -> Result<Vec<ServerSessionResult>, RtmpError> {
    guard.inspect(bytes)?;
    match std::panic::catch_unwind(AssertUnwindSafe(|| session.handle_input(bytes))) {
        Ok(r) => session_call(r),
        Err(_) => Err(RtmpError::ParserPanic),
    }
}

fn session_call<T>(r: Result<T, rml_rtmp::sessions::ServerSessionError>) -> Result<T, RtmpError> {
    r.map_err(|e| RtmpError::Session(e.to_string()))
}

#[cfg(test)]
mod tests;
