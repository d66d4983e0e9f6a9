//! The RTMP server's driver: the listener, and one task per connection that owns its socket,
//! does the handshake, reads into the [`ServerProtocol`], writes what it has to send, and
//! keeps the timeouts (handshake, idle, write).
//!
//! A connection is idle, admitting (a publish or play waits for its answer: [`super::ingest`]
//! and [`super::playback`] decide), publishing or playing. The admission future lives in the
//! connection's state and is polled by the same `select!` that reads the socket, so a slow
//! webhook or publish race never stops the connection being read: pings and
//! acknowledgements are answered meanwhile, a second request is refused as busy, and media
//! sent before the answer is dropped (see [`super::protocol`]). The idle timer does not
//! run while the node, not the peer, is the one deciding.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::ingest::{self, Ingest};
use super::playback::{self, Playback};
use super::protocol::{Command, ProtocolEvent, Refusal, Refused, Request, ServerProtocol};
use super::{RtmpError, RtmpSettings};
use crate::auth::hooks::EventKind;
use crate::hub::{Hub, Publisher, StreamEvent, Subscription, SubscriptionEnd};
use crate::media::StreamKey;
use crate::metrics::Proto;

/// Time a client has to complete the RTMP handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read buffer per connection.
const READ_BUFFER: usize = 16 * 1024;
/// How long a refused or evicted client's connection stays open after the status, for it to
/// read it.
const LINGER: Duration = Duration::from_secs(2);
/// Events gathered into one vectored write when a viewer is behind.
const MAX_BATCH: usize = 256;

/// Accepts RTMP connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    settings: RtmpSettings,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let flush_clock = playback::spawn_flush_clock(settings.merged_write, shutdown.clone());
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
        let shutdown = shutdown.clone();
        let (hub, settings, flush_clock) = (hub.clone(), settings.clone(), flush_clock.clone());
        let span = tracing::info_span!("rtmp", %peer, stream = tracing::field::Empty);
        tokio::spawn(
            async move {
                let metrics = hub.metrics().clone();
                let result = match Connection::new(socket, peer, hub, settings, flush_clock) {
                    Ok(conn) => conn.run(shutdown).await,
                    Err(e) => Err(e),
                };
                match result {
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

/// The answer to a publish or play, for the stream asked for.
enum Admission {
    Publish(StreamKey, Result<Publisher, (Refused, String)>),
    Play(StreamKey, Result<Subscription, (Refused, String)>),
}

enum State {
    Idle,
    /// A publish or play waits for its answer, polled beside the reads.
    Admitting(Pin<Box<dyn Future<Output = Admission> + Send>>),
    Publishing {
        ingest: Box<Ingest>,
        /// Resolves with the reason when the hub evicts the publisher.
        evicted: Pin<Box<dyn Future<Output = String> + Send>>,
    },
    Playing(Box<Playback>),
}

/// What woke a connection besides its socket.
enum Wake {
    Admission(Admission),
    Play(Result<StreamEvent, SubscriptionEnd>),
    Evicted(String),
}

/// Waits for what the connection's state waits on. Cancel-safe: the admission and eviction
/// futures live in the state, and [`playback::next_event`] loses nothing when dropped.
async fn wake(state: &mut State, flush_clock: Option<&mut watch::Receiver<()>>) -> Wake {
    match state {
        State::Idle => std::future::pending().await,
        State::Admitting(answer) => Wake::Admission(answer.as_mut().await),
        State::Publishing { evicted, .. } => Wake::Evicted(evicted.as_mut().await),
        State::Playing(play) => Wake::Play(playback::next_event(play, flush_clock).await),
    }
}

struct Connection {
    socket: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    settings: RtmpSettings,
    protocol: ServerProtocol,
    state: State,
    out: Vec<Bytes>,
    /// Merged write: players write when this node-wide clock ticks.
    flush_clock: Option<watch::Receiver<()>>,
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
    ) -> Result<Self, RtmpError> {
        let protocol = ServerProtocol::new(settings.chunk_size, settings.guard)?;
        Ok(Connection {
            socket,
            peer,
            hub,
            settings,
            protocol,
            state: State::Idle,
            out: Vec::new(),
            flush_clock,
            event_on_close: None,
        })
    }

    /// Sends the event hook the end of this publish or play.
    fn end_event(&mut self) {
        if let Some((kind, key)) = self.event_on_close.take() {
            self.settings.auth.notify(kind, "rtmp", &key, self.peer);
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> Result<(), RtmpError> {
        let remaining = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake())
            .await
            .map_err(|_| RtmpError::HandshakeTimeout)??;
        if !remaining.is_empty() {
            self.protocol.handle_input(&remaining)?;
            self.handle_events()?;
        }
        self.flush().await?;

        // Players send only small control messages; publishers refill it as it drains.
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        let idle = self.settings.idle_timeout;
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        loop {
            // The idle timer runs while the peer is the one expected to send.
            let waiting_on_peer = matches!(self.state, State::Idle | State::Publishing { .. });
            let outcome = tokio::select! {
                _ = &mut idle_timer, if waiting_on_peer => {
                    info!("closing: sent nothing for {idle:?}");
                    return Err(RtmpError::IdleTimeout(idle));
                }
                r = self.socket.read_buf(&mut buf) => {
                    idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                    if r? == 0 {
                        return Ok(());
                    }
                    let fed = self.protocol.handle_input(&buf);
                    buf.clear();
                    fed?;
                    self.handle_events()
                }
                woke = wake(&mut self.state, self.flush_clock.as_mut()) => match woke {
                    Wake::Admission(answer) => {
                        idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                        self.on_admission(answer)
                    }
                    Wake::Play(Ok(ev)) => {
                        self.play_events(ev).await?;
                        continue;
                    }
                    Wake::Play(Err(end)) => return self.end_playback(end).await,
                    Wake::Evicted(reason) => return self.end_publish(reason).await,
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            if let Err(e) = outcome {
                // A refusal is written before the connection closes.
                self.flush().await?;
                self.linger().await;
                return Err(e);
            }
            self.flush().await?;
            if buf.capacity() < 4096 {
                buf.reserve(READ_BUFFER);
            }
        }
    }

    /// Acts on what the peer did.
    fn handle_events(&mut self) -> Result<(), RtmpError> {
        while let Some(event) = self.protocol.poll_event() {
            match event {
                ProtocolEvent::PublishRequested(request) => self.admit(Command::Publish, request),
                ProtocolEvent::PlayRequested(request) => self.admit(Command::Play, request),
                ProtocolEvent::Refused(refusal) => self.refused(refusal)?,
                ProtocolEvent::PublishFinished => {
                    info!("publisher finished");
                    self.state = State::Idle;
                    self.end_event();
                }
                ProtocolEvent::PlayFinished => {
                    info!("player stopped");
                    self.state = State::Idle;
                    self.end_event();
                }
                ProtocolEvent::Metadata(metadata) => {
                    if let State::Publishing { ingest, .. } = &mut self.state {
                        ingest.on_metadata(&metadata);
                    }
                }
                ProtocolEvent::Video { data, timestamp } => {
                    if let State::Publishing { ingest, .. } = &mut self.state {
                        ingest.on_video(data, timestamp)?;
                    }
                }
                ProtocolEvent::Audio { data, timestamp } => {
                    if let State::Publishing { ingest, .. } = &mut self.state {
                        ingest.on_audio(data, timestamp)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts deciding a publish or play; [`Connection::run`] polls the answer beside its reads.
    fn admit(&mut self, command: Command, request: Request) {
        let (hub, auth, peer) = (self.hub.clone(), self.settings.auth.clone(), self.peer);
        let key = request.key.clone();
        self.state = State::Admitting(match command {
            Command::Publish => Box::pin(async move {
                Admission::Publish(key, ingest::admit_publish(hub, auth, peer, request).await)
            }),
            Command::Play => Box::pin(async move {
                Admission::Play(key, playback::admit_play(hub, auth, peer, request).await)
            }),
        });
    }

    /// The answer to a publish or play arrived.
    fn on_admission(&mut self, answer: Admission) -> Result<(), RtmpError> {
        self.state = State::Idle;
        match answer {
            Admission::Publish(key, Ok(publisher)) => {
                tracing::Span::current().record("stream", tracing::field::display(&key));
                info!("publishing {key}");
                self.settings
                    .auth
                    .notify(EventKind::Publish, "rtmp", &key, self.peer);
                self.event_on_close = Some((EventKind::Unpublish, key.clone()));
                self.protocol.accept_publish()?;
                let ingest = Ingest::new(&self.hub, key, publisher);
                let evicted = Box::pin(ingest.evicted());
                self.state = State::Publishing {
                    ingest: Box::new(ingest),
                    evicted,
                };
            }
            Admission::Play(key, Ok(sub)) => {
                tracing::Span::current().record("stream", tracing::field::display(&key));
                info!(peer = %self.peer, "playing {key}");
                self.settings
                    .auth
                    .notify(EventKind::Play, "rtmp", &key, self.peer);
                self.event_on_close = Some((EventKind::Stop, key));
                let stream_id = self.protocol.accept_play()?;
                if self.settings.send_buffer > 0 {
                    // A bounded kernel buffer: a stalled viewer fills it quickly and hits the
                    // write timeout, instead of parking megabytes in the kernel first.
                    let _ = socket2::SockRef::from(&self.socket)
                        .set_send_buffer_size(self.settings.send_buffer);
                }
                let counters = self.hub.metrics().proto(Proto::Rtmp);
                let chunk_size = self.settings.chunk_size as usize;
                self.state = State::Playing(Box::new(Playback::new(
                    sub, stream_id, chunk_size, counters,
                )));
            }
            Admission::Publish(_, Err((why, reason))) | Admission::Play(_, Err((why, reason))) => {
                let refusal = self.protocol.refuse(why, reason)?;
                self.refused(refusal)?;
            }
        }
        Ok(())
    }

    /// Counts and logs a refusal (already answered); an error when it closes the connection.
    fn refused(&mut self, refusal: Refusal) -> Result<(), RtmpError> {
        let Refusal {
            command,
            stream,
            why,
            reason,
        } = refusal.clone();
        if why == Refused::Limit {
            self.hub.metrics().count_refused("rtmp", "limit");
        }
        if !refusal.closes() {
            info!("{} {stream} refused: {reason}", command.name());
            return Ok(());
        }
        warn!("{} {stream} refused: {reason}", command.name());
        Err(match (command, why) {
            (Command::Publish, Refused::Unauthorized) | (Command::Play, _) => {
                RtmpError::Denied(command.name(), reason)
            }
            (Command::Publish, _) => RtmpError::PublishRefused(stream, reason),
        })
    }

    /// Ends an evicted publisher's session: an `onStatus` error the client prints, then the
    /// connection closes.
    async fn end_publish(&mut self, reason: String) -> Result<(), RtmpError> {
        warn!("publisher evicted: {reason}");
        self.state = State::Idle;
        self.protocol.evict(&reason)?;
        self.flush().await?;
        self.linger().await;
        Err(RtmpError::PublishRefused("publish".into(), reason))
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

    async fn end_playback(&mut self, end: SubscriptionEnd) -> Result<(), RtmpError> {
        let State::Playing(play) = &mut self.state else {
            return Ok(());
        };
        if end == SubscriptionEnd::TooSlow {
            play.counters.slow_disconnects.inc();
            warn!("viewer stayed too far behind; disconnecting");
            return Ok(());
        }
        self.protocol.end_of_stream();
        info!("stream ended; closing player");
        let _ = self.flush().await;
        let _ = self.socket.shutdown().await;
        Ok(())
    }

    /// Writes what the protocol and playback have queued, bounded by the write timeout.
    async fn flush(&mut self) -> Result<(), RtmpError> {
        self.protocol.poll_transmit(&mut self.out);
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
        self.end_event();
    }
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
