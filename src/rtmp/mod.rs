//! RTMP: publishers (ingest) and players, on one listener.
//!
//! One task per connection owns the socket and drives rml_rtmp's sans-IO handshake and
//! `ServerSession` with the bytes it reads. A connection either publishes (its frames go to a
//! hub [`Publisher`]) or plays (a hub [`Subscription`] feeds it). Media to players is written
//! as pre-built chunks shared by every viewer ([`chunk`]); control messages go through the
//! session. A parse error or even a panic inside the RTMP library closes only that connection.

pub mod chunk;
pub mod client;
pub mod guard;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult, StreamMetadata,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::auth::hooks::EventKind;
use crate::auth::Action;
use crate::hub::{Hub, Publisher, StreamEvent, Subscription, SubscriptionEnd};
use crate::media::packet::{Encoding, Packet};
use crate::media::{
    aac, avc, flv, AudioConfig, Codec, Frame, Metadata, StreamConfig, StreamKey, Timebase,
    TimestampUnwrapper, VideoConfig,
};
use crate::metrics::{Proto, ProtoCounters};

/// Time a client has to complete the RTMP handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Message stream id whose chunks are cached on the packet (what every common player gets).
const CANONICAL_STREAM_ID: u32 = 1;
/// Socket read buffer per connection.
const READ_BUFFER: usize = 16 * 1024;
/// The chunk stream rml_rtmp uses for AMF data messages.
const RML_DATA_CSID: u8 = 3;
/// A chunk stream rml_rtmp never uses, for status messages we build ourselves (full header,
/// so rml_rtmp's header compression state is not disturbed).
const STATUS_CSID: u8 = 10;
/// The message stream a publisher publishes on: the first `createStream` (rml_rtmp counts
/// from 1; FFmpeg and OBS create one stream).
const PUBLISH_STREAM_ID: u32 = 1;
/// How long a refused or evicted client's connection stays open after the status, for it to
/// read it.
const LINGER: Duration = Duration::from_secs(2);
/// Events gathered into one vectored write when a viewer is behind.
const MAX_BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct RtmpSettings {
    pub chunk_size: u32,
    pub write_timeout: Duration,
    pub max_connections: usize,
    /// SO_SNDBUF for player sockets (0: kernel default).
    pub send_buffer: usize,
    /// Merged write: a player is written at most once per this interval, all frames that
    /// arrived meanwhile in one vectored write (zero: every frame at once).
    pub merged_write: Duration,
    /// What a peer's chunks and AMF may be ([`guard`]).
    pub guard: guard::GuardLimits,
    /// A connection that is not playing and sends nothing this long is closed.
    pub idle_timeout: Duration,
    /// Who may publish and play.
    pub auth: Arc<crate::auth::Auth>,
}

#[derive(Debug, thiserror::Error)]
pub enum RtmpError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0:?}")]
    Handshake(rml_rtmp::handshake::HandshakeError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("protocol error: {0}")]
    Session(String),
    #[error("RTMP parser panicked on input (bug in the parser, input rejected)")]
    ParserPanic,
    #[error("refused input: {0}")]
    Guard(#[from] guard::GuardError),
    #[error("publish of {0} rejected: {1}")]
    Media(StreamKey, String),
    #[error("publish of {0} refused: {1}")]
    PublishRefused(String, String),
    #[error("viewer did not read for {0:?}")]
    WriteTimeout(Duration),
    #[error("{0} refused: {1}")]
    Denied(&'static str, String),
    #[error("sent nothing for {0:?}")]
    IdleTimeout(Duration),
}

impl RtmpError {
    /// The kind of refusal this is, for `meshcast_refused_total` (none: not a refusal).
    fn refusal_kind(&self) -> Option<&'static str> {
        match self {
            RtmpError::Denied(..) => Some("denied"),
            RtmpError::Guard(_) | RtmpError::ParserPanic => Some("bad_input"),
            RtmpError::IdleTimeout(_) => Some("idle"),
            RtmpError::HandshakeTimeout => Some("handshake_timeout"),
            _ => None,
        }
    }
}

/// Accepts RTMP connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    settings: RtmpSettings,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let flush_clock = spawn_flush_clock(settings.merged_write, shutdown.clone());
    loop {
        let (socket, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("rtmp accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "rtmp connection refused: at max_rtmp_connections");
            hub.metrics().count_refused("rtmp", "limit");
            continue;
        };
        hub.metrics().count_connection(Proto::Rtmp);
        let _ = socket.set_nodelay(true);
        // Keepalive finds players whose host vanished (they send nothing we would miss).
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10));
        let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive);
        let conn = Connection::new(
            socket,
            peer,
            hub.clone(),
            settings.clone(),
            flush_clock.clone(),
        );
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("rtmp", %peer, stream = tracing::field::Empty);
        tokio::spawn(
            async move {
                let metrics = conn.hub.metrics().clone();
                match conn.run(shutdown).await {
                    Ok(()) => debug!("connection closed"),
                    Err(e) => {
                        metrics.count_session_error(Proto::Rtmp);
                        if let Some(why) = e.refusal_kind() {
                            metrics.count_refused("rtmp", why);
                        }
                        info!("connection closed: {e}");
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

enum State {
    Idle,
    Publishing(Box<Ingest>),
    Playing(Box<Playback>),
}

struct Connection {
    socket: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    settings: RtmpSettings,
    state: State,
    out: Vec<Bytes>,
    /// Merged write: players write when this node-wide clock ticks.
    flush_clock: Option<watch::Receiver<()>>,
    /// A publisher's eviction ([`Publisher::evicted`]).
    evicted: Option<Pin<Box<dyn Future<Output = String> + Send>>>,
    /// The event hook's notification due when this publish or play ends.
    event_on_close: Option<(EventKind, StreamKey)>,
}

impl Connection {
    fn new(
        socket: TcpStream,
        peer: SocketAddr,
        hub: Arc<Hub>,
        settings: RtmpSettings,
        flush_clock: Option<watch::Receiver<()>>,
    ) -> Self {
        Connection {
            socket,
            peer,
            hub,
            settings,
            state: State::Idle,
            out: Vec::new(),
            flush_clock,
            evicted: None,
            event_on_close: None,
        }
    }

    /// Sends the event hook the end of this publish or play.
    fn end_event(&mut self) {
        if let Some((kind, key)) = self.event_on_close.take() {
            self.settings.auth.notify(kind, "rtmp", &key, self.peer);
        }
    }

    /// Asks [`crate::auth::Auth`] whether this client may `action` the stream; the token
    /// comes from the stream key's query (`demo?token=T`).
    fn authorize(
        &self,
        action: Action,
        key: &StreamKey,
        query: &str,
    ) -> impl Future<Output = Result<(), crate::auth::Denied>> + Send + 'static {
        let auth = self.settings.auth.clone();
        let (peer, key, query) = (self.peer, key.clone(), query.to_string());
        async move {
            let token = crate::auth::token_from_query(&query);
            let access = crate::auth::Access {
                action,
                protocol: "rtmp",
                stream: &key,
                client: peer,
                query: &query,
                token: token.as_deref(),
            };
            auth.check(&access).await
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> Result<(), RtmpError> {
        let remaining = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake())
            .await
            .map_err(|_| RtmpError::HandshakeTimeout)??;
        let mut config = ServerSessionConfig::new();
        config.chunk_size = self.settings.chunk_size;
        let (mut session, results) =
            ServerSession::new(config).map_err(|e| RtmpError::Session(e.to_string()))?;
        self.handle_results(&mut session, results).await?;
        let mut guard = guard::ChunkGuard::new(self.settings.guard);
        if !remaining.is_empty() {
            let results = feed_server(&mut guard, &mut session, &remaining)?;
            self.handle_results(&mut session, results).await?;
        }
        self.flush().await?;

        // Players send only small control messages; publishers refill it as it drains.
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        let idle = self.settings.idle_timeout;
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        loop {
            let playing = matches!(self.state, State::Playing(_));
            tokio::select! {
                _ = &mut idle_timer, if !playing => {
                    info!("closing: sent nothing for {idle:?}");
                    return Err(RtmpError::IdleTimeout(idle));
                }
                r = self.socket.read_buf(&mut buf) => {
                    idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                    if r? == 0 {
                        return Ok(());
                    }
                    let results = feed_server(&mut guard, &mut session, &buf)?;
                    buf.clear();
                    if let Err(e) = self.handle_results(&mut session, results).await {
                        // A refusal is written before the connection closes.
                        self.flush().await?;
                        self.linger().await;
                        return Err(e);
                    }
                    self.flush().await?;
                }
                ev = next_event(&mut self.state, self.flush_clock.as_mut()), if playing => {
                    match ev {
                        Ok(ev) => self.play_events(ev).await?,
                        Err(end) => return self.end_playback(&mut session, end).await,
                    }
                }
                reason = wait_evicted(&mut self.evicted) => return self.end_publish(&reason).await,
                _ = shutdown.cancelled() => return Ok(()),
            }
            if buf.capacity() < 4096 {
                buf.reserve(READ_BUFFER);
            }
        }
    }

    /// Ends an evicted publisher's session: an `onStatus` error the client prints (FFmpeg:
    /// "Server error: ..."), then the connection closes.
    async fn end_publish(&mut self, reason: &str) -> Result<(), RtmpError> {
        warn!("publisher evicted: {reason}");
        self.state = State::Idle;
        self.evicted = None;
        let status = rml_rtmp::messages::RtmpMessage::Amf0Command {
            command_name: "onStatus".into(),
            transaction_id: 0.0,
            command_object: rml_amf0::Amf0Value::Null,
            additional_arguments: vec![rml_amf0::Amf0Value::Object(
                [
                    ("level", "error"),
                    ("code", "NetStream.Publish.BadName"),
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
        self.out.push(chunk::encode_message(
            STATUS_CSID,
            payload.type_id,
            0,
            PUBLISH_STREAM_ID,
            &payload.data,
            self.settings.chunk_size as usize,
        ));
        self.flush().await?;
        self.linger().await;
        Err(RtmpError::PublishRefused(
            "publish".into(),
            reason.to_string(),
        ))
    }

    /// Before closing on a client with an error status: publishers read server messages
    /// between writes (FFmpeg on each write), so give it time to read the status and hang up
    /// itself, rather than see a bare broken pipe (or a reset that loses the status).
    async fn linger(&mut self) {
        let mut sink = vec![0u8; READ_BUFFER];
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(self.socket.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    async fn handshake(&mut self) -> Result<Vec<u8>, RtmpError> {
        let mut hs = Handshake::new(PeerType::Server);
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.socket.read(&mut buf).await?;
            if n == 0 {
                return Err(RtmpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            match hs.process_bytes(&buf[..n]).map_err(RtmpError::Handshake)? {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    self.socket.write_all(&response_bytes).await?;
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    self.socket.write_all(&response_bytes).await?;
                    return Ok(remaining_bytes);
                }
            }
        }
    }

    async fn handle_results(
        &mut self,
        session: &mut ServerSession,
        results: Vec<ServerSessionResult>,
    ) -> Result<(), RtmpError> {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => self.out.push(Bytes::from(p.bytes)),
                ServerSessionResult::RaisedEvent(ev) => self.handle_event(session, ev).await?,
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(())
    }

    async fn handle_event(
        &mut self,
        session: &mut ServerSession,
        event: ServerSessionEvent,
    ) -> Result<(), RtmpError> {
        match event {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                let results = session_call(session.accept_request(request_id))?;
                self.handle_plain_results(results);
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                app_name,
                stream_key,
                ..
            } => {
                self.on_publish(session, request_id, &app_name, &stream_key)
                    .await?
            }
            ServerSessionEvent::PublishStreamFinished { .. } => {
                if matches!(self.state, State::Publishing(_)) {
                    info!("publisher finished");
                    self.state = State::Idle;
                    self.evicted = None;
                    self.end_event();
                }
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                if let State::Publishing(ingest) = &mut self.state {
                    ingest.on_metadata(&metadata);
                }
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => {
                if let State::Publishing(ingest) = &mut self.state {
                    ingest.on_video(data, timestamp.value)?;
                }
            }
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => {
                if let State::Publishing(ingest) = &mut self.state {
                    ingest.on_audio(data, timestamp.value)?;
                }
            }
            ServerSessionEvent::PlayStreamRequested {
                request_id,
                app_name,
                stream_key,
                stream_id,
                ..
            } => {
                self.on_play(session, request_id, &app_name, &stream_key, stream_id)
                    .await?
            }
            ServerSessionEvent::PlayStreamFinished { .. } => {
                if matches!(self.state, State::Playing(_)) {
                    info!("player stopped");
                    if let State::Playing(play) = &self.state {
                        play.counters.viewers.dec();
                    }
                    self.state = State::Idle;
                    self.end_event();
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn handle_plain_results(&mut self, results: Vec<ServerSessionResult>) {
        for r in results {
            if let ServerSessionResult::OutboundResponse(p) = r {
                self.out.push(Bytes::from(p.bytes));
            }
        }
    }

    async fn on_publish(
        &mut self,
        session: &mut ServerSession,
        request_id: u32,
        app: &str,
        stream_key: &str,
    ) -> Result<(), RtmpError> {
        let (app, name, query) = rtmp_names(app, stream_key);
        let (app, name, query) = (app.as_str(), name.as_str(), query.as_str());
        let reject = |this: &mut Self, session: &mut ServerSession, code, why: String| {
            warn!("publish {app}/{name} refused: {why}");
            let results = session_call(session.reject_request(request_id, code, &why))?;
            this.handle_plain_results(results);
            Err(RtmpError::PublishRefused(format!("{app}/{name}"), why))
        };
        if !matches!(self.state, State::Idle) {
            return reject(
                self,
                session,
                "NetStream.Publish.BadConnection",
                "connection is already publishing or playing".into(),
            );
        }
        let key = match StreamKey::new(app, name) {
            Ok(k) => k,
            Err(e) => return reject(self, session, "NetStream.Publish.BadName", e.to_string()),
        };
        if let Err(denied) = self.authorize(Action::Publish, &key, query).await {
            let _ = reject(
                self,
                session,
                "NetStream.Publish.Unauthorized",
                denied.reason.clone(),
            );
            return Err(RtmpError::Denied("publish", denied.reason));
        }
        let publisher = match self.hub.publish_checked(key.clone()).await {
            Ok(p) => p,
            Err(e) => {
                if matches!(e, crate::hub::PublishError::Limit(_)) {
                    self.hub.metrics().count_refused("rtmp", "limit");
                }
                return reject(self, session, "NetStream.Publish.BadName", e.to_string());
            }
        };
        tracing::Span::current().record("stream", tracing::field::display(&key));
        info!("publishing {key}");
        self.settings
            .auth
            .notify(EventKind::Publish, "rtmp", &key, self.peer);
        self.event_on_close = Some((EventKind::Unpublish, key.clone()));
        let results = session_call(session.accept_request(request_id))?;
        self.handle_plain_results(results);
        let (frames_in, bytes_in) = self.hub.metrics().ingest(Proto::Rtmp);
        self.evicted = Some(Box::pin(publisher.evicted()));
        self.state = State::Publishing(Box::new(Ingest {
            key,
            publisher,
            media: IngestMedia::default(),
            frames_in,
            bytes_in,
        }));
        Ok(())
    }

    async fn on_play(
        &mut self,
        session: &mut ServerSession,
        request_id: u32,
        app: &str,
        stream_key: &str,
        stream_id: u32,
    ) -> Result<(), RtmpError> {
        let (app, name, query) = rtmp_names(app, stream_key);
        let (app, name, query) = (app.as_str(), name.as_str(), query.as_str());
        if let Ok(key) = StreamKey::new(app, name) {
            if let Err(denied) = self.authorize(Action::Play, &key, query).await {
                warn!("play {key} refused: {}", denied.reason);
                let results = session_call(session.reject_request(
                    request_id,
                    "NetStream.Play.Unauthorized",
                    &denied.reason,
                ))?;
                self.handle_plain_results(results);
                return Err(RtmpError::Denied("play", denied.reason));
            }
        }
        let ticket =
            match StreamKey::new(app, name).map(|k| self.hub.admit_viewer(&k, "rtmp", self.peer)) {
                Ok(Err(why)) => {
                    warn!("play {app}/{name} refused: {why}");
                    self.hub.metrics().count_refused("rtmp", "limit");
                    let results = session_call(session.reject_request(
                        request_id,
                        "NetStream.Play.Failed",
                        &why,
                    ))?;
                    self.handle_plain_results(results);
                    return Err(RtmpError::Denied("play", why));
                }
                Ok(Ok(t)) => Some(t),
                Err(_) => None,
            };
        let sub = match StreamKey::new(app, name) {
            Err(e) => Err(e.to_string()),
            Ok(key) if !matches!(self.state, State::Idle) => Err(format!(
                "{key}: connection is already publishing or playing"
            )),
            Ok(key) => match crate::bridge::subscribe_with_audio(&self.hub, &key, Codec::Aac).await
            {
                Ok(mut sub) => match crate::bridge::flv_incompatible_video(&sub) {
                    Some(why) => Err(why),
                    None => {
                        if let Some(t) = ticket {
                            sub.hold(t);
                        }
                        Ok((key, sub))
                    }
                },
                Err(e) => Err(e.to_string()),
            },
        };
        let (key, sub) = match sub {
            Ok(x) => x,
            Err(why) => {
                info!("play {app}/{name} refused: {why}");
                let results = session_call(session.reject_request(
                    request_id,
                    "NetStream.Play.StreamNotFound",
                    &why,
                ))?;
                self.handle_plain_results(results);
                return Ok(());
            }
        };
        tracing::Span::current().record("stream", tracing::field::display(&key));
        info!(peer = %self.peer, "playing {key}");
        self.settings
            .auth
            .notify(EventKind::Play, "rtmp", &key, self.peer);
        self.event_on_close = Some((EventKind::Stop, key.clone()));
        let results = session_call(session.accept_request(request_id))?;
        for r in results {
            if let ServerSessionResult::OutboundResponse(p) = r {
                // rml_rtmp also sends `|RtmpSampleAccess` and an `onStatus` *data* message
                // (chunk stream 3, used for nothing else here). FFmpeg's FLV demuxer turns
                // unknown data messages into extra streams, so they are left out.
                if p.bytes.first().map(|b| b & 0x3f) != Some(RML_DATA_CSID) {
                    self.out.push(Bytes::from(p.bytes));
                }
            }
        }
        if self.settings.send_buffer > 0 {
            // A bounded kernel buffer: a stalled viewer fills it quickly and hits the write
            // timeout, instead of parking megabytes in the kernel first.
            let _ = socket2::SockRef::from(&self.socket)
                .set_send_buffer_size(self.settings.send_buffer);
        }
        let counters = self.hub.metrics().proto(Proto::Rtmp);
        counters.viewers.inc();
        self.state = State::Playing(Box::new(Playback {
            sub,
            stream_id,
            chunk_size: self.settings.chunk_size as usize,
            last_ts: 0,
            counters,
        }));
        Ok(())
    }

    /// Writes one event and whatever else is ready, in one vectored write.
    async fn play_events(&mut self, first: StreamEvent) -> Result<(), RtmpError> {
        let State::Playing(play) = &mut self.state else {
            return Ok(());
        };
        let mut frames = play.encode(first, &mut self.out);
        while self.out.len() < MAX_BATCH {
            match play.sub.try_next() {
                Some(Ok(ev)) => frames += play.encode(ev, &mut self.out),
                // The end is seen again by the next `next()`.
                Some(Err(_)) | None => break,
            }
        }
        play.counters.frames_out.inc_by(frames);
        if let Some(clock) = &mut self.flush_clock {
            // Wait for the next tick, not one that passed while writing.
            clock.borrow_and_update();
        }
        self.flush().await
    }

    async fn end_playback(
        &mut self,
        session: &mut ServerSession,
        end: SubscriptionEnd,
    ) -> Result<(), RtmpError> {
        let State::Playing(play) = &mut self.state else {
            return Ok(());
        };
        if end == SubscriptionEnd::TooSlow {
            play.counters.slow_disconnects.inc();
            warn!("viewer stayed too far behind; disconnecting");
            return Ok(());
        }
        if let Ok(p) = session.finish_playing(play.stream_id) {
            self.out.push(Bytes::from(p.bytes));
        }
        info!("stream ended; closing player");
        let _ = self.flush().await;
        let _ = self.socket.shutdown().await;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), RtmpError> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Fast path: the kernel usually takes the whole batch at once, and then no timer is
        // armed at all. Only a full socket buffer waits, bounded by the write timeout.
        let mut bytes = try_write_vectored(&self.socket, &mut self.out)?;
        if !self.out.is_empty() {
            let timeout = self.settings.write_timeout;
            let written =
                tokio::time::timeout(timeout, write_all_vectored(&mut self.socket, &mut self.out))
                    .await;
            let Ok(more) = written else {
                if let State::Playing(play) = &self.state {
                    play.counters.slow_disconnects.inc();
                }
                return Err(RtmpError::WriteTimeout(timeout));
            };
            bytes += more?;
        }
        if let State::Playing(play) = &self.state {
            play.counters.bytes_out.inc_by(bytes as u64);
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let State::Playing(play) = &self.state {
            play.counters.viewers.dec();
        }
        if let Some((kind, key)) = self.event_on_close.take() {
            self.settings.auth.notify(kind, "rtmp", &key, self.peer);
        }
    }
}

/// Next event for a playing connection (only polled while playing).
///
/// With merged writes, waits for the next tick of the node's flush clock first, so that
/// frames arriving meanwhile are written together. Cancel-safe: dropping the future while it
/// waits loses nothing.
async fn next_event(
    state: &mut State,
    flush_clock: Option<&mut watch::Receiver<()>>,
) -> Result<StreamEvent, SubscriptionEnd> {
    match state {
        State::Playing(p) => {
            if let Some(clock) = flush_clock {
                // An error means the clock stopped (shutdown): write at once.
                let _ = clock.changed().await;
            }
            p.sub.next().await
        }
        _ => std::future::pending().await,
    }
}

async fn wait_evicted(
    evicted: &mut Option<Pin<Box<dyn Future<Output = String> + Send>>>,
) -> String {
    match evicted {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Ticks every `interval` while the server runs; players with merged writes flush on it.
/// One timer for the whole node instead of one per player.
fn spawn_flush_clock(
    interval: Duration,
    shutdown: CancellationToken,
) -> Option<watch::Receiver<()>> {
    if interval.is_zero() {
        return None;
    }
    let (tx, rx) = watch::channel(());
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    tx.send_replace(());
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Some(rx)
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
/// a panic inside the parser becomes an error for this connection only. Sans-IO: the
/// connection task and the fuzz target (`fuzz/fuzz_targets/rtmp_server.rs`) both go through
/// here, so the target exercises exactly what a socket's bytes reach.
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

/// Writes every buffer, using vectored writes; returns the bytes written.
async fn write_all_vectored(
    socket: &mut TcpStream,
    bufs: &mut Vec<Bytes>,
) -> std::io::Result<usize> {
    let mut total = 0;
    while !bufs.is_empty() {
        let n = socket.write_vectored(&io_slices(bufs)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        total += n;
        consume(bufs, n);
    }
    Ok(total)
}

/// Writes what the socket takes without waiting; the rest stays in `bufs`.
fn try_write_vectored(socket: &TcpStream, bufs: &mut Vec<Bytes>) -> std::io::Result<usize> {
    let mut total = 0;
    while !bufs.is_empty() {
        match socket.try_write_vectored(&io_slices(bufs)) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                total += n;
                consume(bufs, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

fn io_slices(bufs: &[Bytes]) -> Vec<std::io::IoSlice<'_>> {
    bufs.iter()
        .take(128)
        .map(|b| std::io::IoSlice::new(b))
        .collect()
}

/// Drops the first `n` written bytes from `bufs`.
fn consume(bufs: &mut Vec<Bytes>, mut n: usize) {
    let mut done = 0;
    while n > 0 && done < bufs.len() {
        let first = &mut bufs[done];
        if n >= first.len() {
            n -= first.len();
            done += 1;
        } else {
            first.advance(n);
            n = 0;
        }
    }
    bufs.drain(..done);
}

/// A publishing connection's ingest state: [`IngestMedia`] plus where its frames go.
struct Ingest {
    key: StreamKey,
    publisher: Publisher,
    media: IngestMedia,
    frames_in: prometheus_client::metrics::counter::Counter,
    bytes_in: prometheus_client::metrics::counter::Counter,
}

impl Ingest {
    fn reject(&self, why: impl ToString) -> RtmpError {
        RtmpError::Media(self.key.clone(), why.to_string())
    }

    fn on_metadata(&mut self, m: &StreamMetadata) {
        self.media.config.metadata = Metadata {
            frame_rate: m.video_frame_rate.map(f64::from),
            video_bitrate_kbps: m.video_bitrate_kbps.map(f64::from),
            audio_bitrate_kbps: m.audio_bitrate_kbps.map(f64::from),
            encoder: m.encoder.clone(),
        };
        self.publisher.set_config(self.media.config.clone());
    }

    fn on_video(&mut self, data: Bytes, timestamp: u32) -> Result<(), RtmpError> {
        self.bytes_in.inc_by(data.len() as u64);
        let out = self
            .media
            .on_video(data, timestamp)
            .map_err(|e| self.reject(e))?;
        self.deliver(out);
        Ok(())
    }

    fn on_audio(&mut self, data: Bytes, timestamp: u32) -> Result<(), RtmpError> {
        self.bytes_in.inc_by(data.len() as u64);
        let out = self
            .media
            .on_audio(data, timestamp)
            .map_err(|e| self.reject(e))?;
        self.deliver(out);
        Ok(())
    }

    fn deliver(&mut self, out: Option<IngestOutput>) {
        match out {
            Some(IngestOutput::Config) => self.publisher.set_config(self.media.config.clone()),
            Some(IngestOutput::Frame { frame, body }) => {
                self.frames_in.inc();
                let packet = match body {
                    Some(body) => Packet::with(frame, &flv::BODY, body),
                    None => Packet::new(frame),
                };
                self.publisher.push(packet);
            }
            None => {}
        }
    }
}

/// Why a publisher's audio or video message was refused (the connection closes).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Flv(#[from] flv::FlvError),
    #[error(transparent)]
    Avc(#[from] avc::AvcError),
    #[error(transparent)]
    Aac(#[from] aac::AacError),
}

/// What one audio or video message of a publisher gave.
#[derive(Debug)]
pub enum IngestOutput {
    /// A sequence header changed [`IngestMedia::config`].
    Config,
    /// A frame; `body` is the received FLV body when it still matches the frame (its
    /// timestamps were not adjusted), so players can be sent it as is.
    Frame { frame: Frame, body: Option<Bytes> },
}

/// A publisher's media, sans-IO: the FLV bodies and RTMP timestamps of its audio and video
/// messages in, codec configuration and frames with monotonic timestamps out. It owns the
/// media parsers network input reaches on ingest (FLV tag, AVC decoder configuration, AAC
/// AudioSpecificConfig); it knows nothing of sockets, the hub or metrics.
#[derive(Debug)]
pub struct IngestMedia {
    pub config: StreamConfig,
    video_ts: TimestampUnwrapper,
    audio_ts: TimestampUnwrapper,
    last_video_dts: i64,
    last_audio_dts: i64,
}

impl Default for IngestMedia {
    fn default() -> Self {
        IngestMedia {
            config: StreamConfig::default(),
            video_ts: TimestampUnwrapper::default(),
            audio_ts: TimestampUnwrapper::default(),
            last_video_dts: i64::MIN,
            last_audio_dts: i64::MIN,
        }
    }
}

impl IngestMedia {
    /// One video message body; `None` when it gives nothing (end of sequence, or a frame
    /// before the sequence header).
    pub fn on_video(
        &mut self,
        data: Bytes,
        timestamp: u32,
    ) -> Result<Option<IngestOutput>, IngestError> {
        match flv::parse_video_tag(&data)? {
            flv::VideoTag::SequenceHeader(record) => {
                let c = avc::parse_decoder_config(&record)?;
                info!(
                    width = c.width,
                    height = c.height,
                    profile = c.profile,
                    "H.264 configuration"
                );
                self.config.video = Some(VideoConfig {
                    codec: Codec::H264,
                    record,
                    width: c.width,
                    height: c.height,
                });
                Ok(Some(IngestOutput::Config))
            }
            flv::VideoTag::Frame {
                keyframe,
                cts,
                payload,
            } => {
                if self.config.video.is_none() {
                    debug!("video frame before its sequence header: dropped");
                    return Ok(None);
                }
                let raw = self.video_ts.unwrap(timestamp);
                let dts = raw.max(self.last_video_dts);
                self.last_video_dts = dts;
                let pts = (dts + cts as i64).max(dts);
                let exact = dts == raw && cts >= 0;
                let frame = Frame {
                    codec: Codec::H264,
                    dts,
                    pts,
                    timebase: Timebase::MILLIS,
                    keyframe,
                    payload,
                };
                Ok(Some(IngestOutput::Frame {
                    frame,
                    body: exact.then_some(data),
                }))
            }
            flv::VideoTag::EndOfSequence => Ok(None),
        }
    }

    /// One audio message body; `None` for a frame before the sequence header.
    pub fn on_audio(
        &mut self,
        data: Bytes,
        timestamp: u32,
    ) -> Result<Option<IngestOutput>, IngestError> {
        match flv::parse_audio_tag(&data)? {
            flv::AudioTag::SequenceHeader(specific) => {
                let c = aac::parse_audio_specific_config(&specific)?;
                info!(
                    sample_rate = c.sample_rate,
                    channels = c.channels,
                    "AAC configuration"
                );
                self.config.audio = Some(AudioConfig {
                    codec: Codec::Aac,
                    specific,
                    sample_rate: c.sample_rate,
                    channels: c.channels,
                });
                Ok(Some(IngestOutput::Config))
            }
            flv::AudioTag::Frame(payload) => {
                if self.config.audio.is_none() {
                    return Ok(None);
                }
                let raw = self.audio_ts.unwrap(timestamp);
                let dts = raw.max(self.last_audio_dts);
                self.last_audio_dts = dts;
                let frame = Frame {
                    codec: Codec::Aac,
                    dts,
                    pts: dts,
                    timebase: Timebase::MILLIS,
                    keyframe: true,
                    payload,
                };
                Ok(Some(IngestOutput::Frame {
                    frame,
                    body: (dts == raw).then_some(data),
                }))
            }
        }
    }
}

/// A playing connection's state.
struct Playback {
    sub: Subscription,
    stream_id: u32,
    chunk_size: usize,
    last_ts: u32,
    counters: ProtoCounters,
}

impl Playback {
    /// Appends the bytes for one event to `out`; returns the number of frames.
    fn encode(&mut self, ev: StreamEvent, out: &mut Vec<Bytes>) -> u64 {
        match ev {
            StreamEvent::Config(config) => {
                let ts = self.last_ts;
                out.push(self.message(
                    chunk::CSID_DATA,
                    chunk::MSG_DATA_AMF0,
                    ts,
                    &flv::metadata_body(&config),
                ));
                if let Some(v) = &config.video {
                    let body = flv::video_sequence_header_body(&v.record);
                    out.push(self.message(chunk::CSID_VIDEO, chunk::MSG_VIDEO, ts, &body));
                }
                if let Some(a) = config.audio.as_ref().filter(|a| a.codec.fits_flv()) {
                    let body = flv::audio_sequence_header_body(&a.specific);
                    out.push(self.message(chunk::CSID_AUDIO, chunk::MSG_AUDIO, ts, &body));
                }
                0
            }
            StreamEvent::Frame(packet) if !packet.frame.codec.fits_flv() => 0,
            StreamEvent::Frame(packet) => {
                let ts = packet.frame.dts_ms() as u32;
                self.last_ts = ts;
                let bytes = if self.stream_id == CANONICAL_STREAM_ID {
                    let chunk_size = self.chunk_size;
                    CANONICAL_CHUNKS
                        .get(&packet, |p| {
                            frame_chunks(p, CANONICAL_STREAM_ID, chunk_size)
                        })
                        .clone()
                } else {
                    frame_chunks(&packet, self.stream_id, self.chunk_size)
                };
                out.push(bytes);
                1
            }
            StreamEvent::Discontinuity => {
                self.counters.lag_skips.inc();
                0
            }
        }
    }

    fn message(&self, csid: u8, kind: u8, ts: u32, body: &[u8]) -> Bytes {
        chunk::encode_message(csid, kind, ts, self.stream_id, body, self.chunk_size)
    }
}

/// A frame's RTMP chunks in the node's canonical chunking (stream id
/// [`CANONICAL_STREAM_ID`], the node's chunk size), built once per packet for every player.
static CANONICAL_CHUNKS: Encoding<Bytes> = Encoding::new("rtmp chunks");

fn frame_chunks(p: &Packet, stream_id: u32, chunk_size: usize) -> Bytes {
    let (csid, kind) = match p.frame.codec {
        Codec::H264 => (chunk::CSID_VIDEO, chunk::MSG_VIDEO),
        Codec::Vp8 => (chunk::CSID_VIDEO, chunk::MSG_VIDEO),
        Codec::Aac | Codec::Opus => (chunk::CSID_AUDIO, chunk::MSG_AUDIO),
    };
    chunk::encode_message(
        csid,
        kind,
        p.frame.dts_ms() as u32,
        stream_id,
        flv::body_of(p),
        chunk_size,
    )
}

#[cfg(test)]
mod tests {
    use super::rtmp_names;

    #[test]
    fn tokens_come_off_the_key_or_the_app() {
        let n = rtmp_names;
        assert_eq!(
            n("live", "demo?token=T"),
            ("live".into(), "demo".into(), "token=T".into())
        );
        assert_eq!(
            n("live?token=T", "demo"),
            ("live".into(), "demo".into(), "token=T".into())
        );
        assert_eq!(n("live?a=1", "demo?token=T").2, "token=T&a=1");
        assert_eq!(n("live", "demo").2, "");
    }
}
