//! RTMP client side: the connection start shared by playing and publishing ([`ClientConn`],
//! used by RTMP egress), and a minimal player for tests and the load generator: connects, asks to play, then
//! either parses the media (counting frames) or only counts bytes (cheap enough to run
//! a thousand at once next to the server), or stops reading to simulate a stalled viewer.

use std::time::Duration;

use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a player does once playback is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlayMode {
    /// Parse RTMP messages and count audio/video frames.
    Parse,
    /// Count bytes only (the load generator).
    CountBytes,
}

#[derive(Clone, Debug, Default)]
pub struct PlayStats {
    pub bytes: u64,
    pub video_frames: u64,
    pub audio_frames: u64,
    /// Whether the server closed the connection (rather than our deadline ending it).
    pub closed_by_server: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlayError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("rtmp: {0}")]
    Rtmp(String),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("timed out before playback started")]
    Timeout,
}

/// A player that completed the play request and is ready to receive media.
pub struct Player {
    socket: TcpStream,
    session: ClientSession,
    pending: Vec<u8>,
}

fn rtmp<E: std::fmt::Debug>(e: E) -> PlayError {
    PlayError::Rtmp(format!("{e:?}"))
}

/// An RTMP client connection whose `connect` was accepted: the common start of playing and
/// publishing.
pub struct ClientConn {
    pub socket: TcpStream,
    pub session: ClientSession,
    /// Reads the server's bytes before rml_rtmp does (a hostile server can send what a
    /// hostile client can: see [`super::guard`]).
    guard: super::guard::ChunkGuard,
}

impl ClientConn {
    /// Connects to `addr` (`host:port`), handshakes and connects to application `app`.
    pub async fn connect(
        addr: &str,
        app: &str,
        tc_url: Option<String>,
        recv_buffer: Option<u32>,
    ) -> Result<ClientConn, PlayError> {
        let addr: std::net::SocketAddr = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| PlayError::Rtmp("address did not resolve".into()))?;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        let mut socket = socket.connect(addr).await?;
        socket.set_nodelay(true)?;
        let mut hs = Handshake::new(PeerType::Client);
        socket
            .write_all(&hs.generate_outbound_p0_and_p1().map_err(rtmp)?)
            .await?;
        let mut buf = vec![0u8; 64 * 1024];
        let remaining = loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                return Err(PlayError::Rtmp("closed during handshake".into()));
            }
            match hs.process_bytes(&buf[..n]).map_err(rtmp)? {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    socket.write_all(&response_bytes).await?
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    socket.write_all(&response_bytes).await?;
                    break remaining_bytes;
                }
            }
        };
        let mut config = ClientSessionConfig::new();
        config.tc_url = tc_url;
        let (session, initial) = ClientSession::new(config).map_err(rtmp)?;
        let mut conn = ClientConn {
            socket,
            session,
            guard: super::guard::ChunkGuard::new(super::guard::GuardLimits::default()),
        };
        let mut out = Vec::new();
        collect(&initial, &mut out);
        let r = conn
            .session
            .request_connection(app.to_string())
            .map_err(rtmp)?;
        collect(std::slice::from_ref(&r), &mut out);
        conn.socket.write_all(&out).await?;
        conn.until(remaining, |ev| match ev {
            ClientSessionEvent::ConnectionRequestAccepted => Some(Ok(())),
            ClientSessionEvent::ConnectionRequestRejected { description } => {
                Some(Err(PlayError::Refused(description.clone())))
            }
            _ => None,
        })
        .await?;
        Ok(conn)
    }

    /// Sends one session result's bytes.
    pub async fn send(
        &mut self,
        r: Result<ClientSessionResult, rml_rtmp::sessions::ClientSessionError>,
    ) -> Result<(), PlayError> {
        let r = r.map_err(rtmp)?;
        let mut out = Vec::new();
        collect(std::slice::from_ref(&r), &mut out);
        self.socket.write_all(&out).await?;
        Ok(())
    }

    /// Feeds bytes from the server to the session once the guard passed them; a panic in
    /// the parser is an error for this connection only.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<ClientSessionResult>, PlayError> {
        self.guard
            .inspect(bytes)
            .map_err(|e| PlayError::Rtmp(format!("refused input: {e}")))?;
        let session = &mut self.session;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.handle_input(bytes)))
        {
            Ok(r) => r.map_err(rtmp),
            Err(_) => Err(PlayError::Rtmp(
                "RTMP parser panicked on input (input rejected)".into(),
            )),
        }
    }

    /// Feeds `input`, then what the server sends, to the session (answering what it asks)
    /// until `want` decides on a raised event.
    pub async fn until<T>(
        &mut self,
        mut input: Vec<u8>,
        mut want: impl FnMut(&ClientSessionEvent) -> Option<Result<T, PlayError>>,
    ) -> Result<T, PlayError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !input.is_empty() {
                let results = self.feed(&input)?;
                input.clear();
                let mut out = Vec::new();
                collect(&results, &mut out);
                if !out.is_empty() {
                    self.socket.write_all(&out).await?;
                }
                for r in &results {
                    if let ClientSessionResult::RaisedEvent(ev) = r {
                        if let Some(decided) = want(ev) {
                            return decided;
                        }
                    }
                }
            }
            let n = self.socket.read(&mut buf).await?;
            if n == 0 {
                return Err(PlayError::Refused("server closed the connection".into()));
            }
            input.extend_from_slice(&buf[..n]);
        }
    }
}

impl Player {
    /// Connects to `addr` and plays `app/stream`.
    pub async fn connect(addr: &str, app: &str, stream: &str) -> Result<Player, PlayError> {
        Self::connect_with_buffer(addr, app, stream, None).await
    }

    /// Like [`connect`](Self::connect), with the socket's receive buffer set first (a small
    /// one makes a stalled player fill up quickly).
    pub async fn connect_with_buffer(
        addr: &str,
        app: &str,
        stream: &str,
        recv_buffer: Option<u32>,
    ) -> Result<Player, PlayError> {
        tokio::time::timeout(
            Duration::from_secs(15),
            Self::connect_inner(addr, app, stream, recv_buffer),
        )
        .await
        .map_err(|_| PlayError::Timeout)?
    }

    async fn connect_inner(
        addr: &str,
        app: &str,
        stream: &str,
        recv_buffer: Option<u32>,
    ) -> Result<Player, PlayError> {
        let mut conn = ClientConn::connect(addr, app, None, recv_buffer).await?;
        let r = conn.session.request_playback(stream.to_string());
        conn.send(r).await?;
        conn.until(Vec::new(), |ev| match ev {
            ClientSessionEvent::PlaybackRequestAccepted => Some(Ok(())),
            ClientSessionEvent::UnhandleableAmf0Command {
                command_name,
                additional_values,
                ..
            } if command_name == "onStatus" => {
                let text = format!("{additional_values:?}");
                (text.contains("StreamNotFound") || text.contains("error"))
                    .then_some(Err(PlayError::Refused(text)))
            }
            _ => None,
        })
        .await?;
        Ok(Player {
            socket: conn.socket,
            session: conn.session,
            pending: Vec::new(),
        })
    }

    /// Receives for `duration` (or until the server closes).
    pub async fn receive(
        mut self,
        mode: PlayMode,
        duration: Duration,
    ) -> Result<PlayStats, PlayError> {
        let mut stats = PlayStats::default();
        let deadline = tokio::time::Instant::now() + duration;
        let mut buf = vec![0u8; 64 * 1024];
        let mut since_ack = 0u64;
        let mut pending = std::mem::take(&mut self.pending);
        loop {
            let n = match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Err(_) => return Ok(stats),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    stats.closed_by_server = true;
                    return Ok(stats);
                }
                Ok(Ok(n)) => n,
            };
            stats.bytes += n as u64;
            since_ack += n as u64;
            match mode {
                PlayMode::CountBytes => {
                    if since_ack >= 1 << 20 {
                        // Acknowledgement (type 3) on chunk stream 2, as players send.
                        let mut ack = vec![2, 0, 0, 0, 0, 0, 4, 3, 0, 0, 0, 0];
                        ack.extend_from_slice(&(stats.bytes as u32).to_be_bytes());
                        self.socket.write_all(&ack).await?;
                        since_ack = 0;
                    }
                }
                PlayMode::Parse => {
                    pending.extend_from_slice(&buf[..n]);
                    let results = self.session.handle_input(&pending).map_err(rtmp)?;
                    pending.clear();
                    let mut out = Vec::new();
                    collect(&results, &mut out);
                    for r in results {
                        if let ClientSessionResult::RaisedEvent(ev) = r {
                            match ev {
                                ClientSessionEvent::VideoDataReceived { .. } => {
                                    stats.video_frames += 1
                                }
                                ClientSessionEvent::AudioDataReceived { .. } => {
                                    stats.audio_frames += 1
                                }
                                _ => {}
                            }
                        }
                    }
                    if !out.is_empty() {
                        self.socket.write_all(&out).await?;
                    }
                }
            }
        }
    }

    /// Keeps the connection open without reading anything for `duration` (a stalled viewer),
    /// then reads what is left; reports whether the server closed the connection.
    pub async fn stall(mut self, duration: Duration) -> Result<PlayStats, PlayError> {
        tokio::time::sleep(duration).await;
        let mut stats = PlayStats::default();
        let mut buf = vec![0u8; 256 * 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Err(_) => return Ok(stats),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    stats.closed_by_server = true;
                    return Ok(stats);
                }
                Ok(Ok(n)) => stats.bytes += n as u64,
            }
        }
    }

    /// Shrinks the socket's receive buffer (before stalling) so the server sees it fill fast.
    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }
}

pub fn collect(results: &[ClientSessionResult], out: &mut Vec<u8>) {
    for r in results {
        if let ClientSessionResult::OutboundResponse(p) = r {
            out.extend_from_slice(&p.bytes);
        }
    }
}
