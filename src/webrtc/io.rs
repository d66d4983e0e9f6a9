//! The WebRTC port's IO: one UDP socket shared by every peer, and ICE-TCP connections on the
//! same port number; reading and routing what arrives, and sending what peers hand over.
//!
//! Reading: one task reads the UDP socket and routes each datagram to its peer's queue
//! ([`super::demux`]): by source address once known, else by the ufrag of a STUN binding
//! request (we chose each session's ufrag, so it names the session). An ICE-TCP connection
//! (RFC 4571 framing: 16-bit length prefix) is routed the same way, by the ufrag of its first
//! STUN request, and each of its frames becomes a [`Datagram`].
//!
//! Sending: peers send without waiting. A full socket buffer or connection queue drops the
//! packet, as a congested link would, and NACK/RTX repairs it. UDP sends are batched per
//! worker thread ([`super::batch`]): a shard of viewers fills the batch for a whole frame,
//! sent with `sendmmsg`, each destination's run of datagrams one GSO message.
//!
//! This module knows no sessions, streams or peers' state: only queues keyed by ufrag.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use str0m::net::{Protocol, Receive};
use str0m::{Input, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::batch::Batch;
use super::demux::Routes;

/// Receive buffer of the shared socket: a burst of joins overflowed the 208 KB default.
const SOCKET_RCVBUF: usize = 4 << 20;
/// Packets queued toward one ICE-TCP connection before it drops them.
const TCP_QUEUE: usize = 512;
/// A TCP connection must name its session (a STUN request) within this time.
const TCP_FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages per `sendmmsg` call.
#[cfg(target_os = "linux")]
const MMSG_CHUNK: usize = 64;

/// A control message buffer, aligned for `cmsghdr`.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy)]
struct CmsgBuf([u64; 3]);

thread_local! {
    /// The send batch of the peers (or the shard) running on this thread: they fill and
    /// flush it without awaiting in between.
    static BATCH: std::cell::RefCell<Batch> = std::cell::RefCell::default();
}

/// A datagram (or RFC 4571 frame) for a peer.
pub(crate) struct Datagram {
    /// The tag of the queue it was routed to (which peer of a shared queue).
    pub(crate) tag: u64,
    at: Instant,
    from: SocketAddr,
    proto: Protocol,
    data: Vec<u8>,
}

impl Datagram {
    /// Its size on the wire (the datagram, or the frame without its length prefix).
    pub(crate) fn len(&self) -> usize {
        self.data.len()
    }

    /// Feeds it to a peer's `Rtc` as received at `local_addr`; an unparsable one is
    /// dropped.
    pub(crate) fn feed(
        &self,
        rtc: &mut Rtc,
        local_addr: SocketAddr,
    ) -> Result<(), str0m::RtcError> {
        match Receive::new(self.proto, self.from, local_addr, &self.data) {
            Ok(r) => rtc.handle_input(Input::Receive(self.at, r)),
            Err(e) => {
                debug!("unparsable datagram: {e}");
                Ok(())
            }
        }
    }
}

/// Where one peer's incoming datagrams go: a queue (its own, or its shard's) and the tag
/// that names the peer there.
#[derive(Clone)]
pub(crate) struct PeerQueue {
    pub(crate) tx: mpsc::Sender<Datagram>,
    pub(crate) tag: u64,
}

impl PeerQueue {
    /// Queues `data` without waiting: a full queue drops it, like a congested link would.
    fn try_send(
        &self,
        from: SocketAddr,
        proto: Protocol,
        data: &[u8],
    ) -> Result<(), mpsc::error::TrySendError<Datagram>> {
        self.tx.try_send(Datagram {
            tag: self.tag,
            at: Instant::now(),
            from,
            proto,
            data: data.to_vec(),
        })
    }
}

/// The shared UDP socket, the writers of ICE-TCP connections (which take packets already
/// framed), and the routes from both to peers' queues.
pub(crate) struct Io {
    udp: UdpSocket,
    /// The socket's GSO limit (and sends where `sendmmsg` is missing).
    udp_state: quinn_udp::UdpSocketState,
    /// IPv4 destinations are written as IPv4-mapped addresses on an IPv6 socket.
    ipv6: bool,
    tcp: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    routes: Mutex<Routes<PeerQueue>>,
}

impl Io {
    /// Binds the UDP socket on `listen` (and a TCP listener on the same address if `tcp`).
    pub(crate) async fn bind(
        listen: SocketAddr,
        tcp: bool,
    ) -> std::io::Result<(Io, Option<tokio::net::TcpListener>)> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(listen),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if let Err(e) = socket.set_recv_buffer_size(SOCKET_RCVBUF) {
            warn!("webrtc: cannot set SO_RCVBUF: {e}");
        }
        let _ = socket.set_send_buffer_size(SOCKET_RCVBUF);
        socket.set_nonblocking(true)?;
        socket.bind(&listen.into())?;
        let udp = UdpSocket::from_std(socket.into())?;
        let listener = if tcp {
            Some(crate::net::bind_listener(udp.local_addr()?)?)
        } else {
            None
        };
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into())?;
        // quinn-udp turns on receive offload (UDP_GRO), which would hand the reader several
        // datagrams in one buffer; this socket's reader takes them one at a time.
        disable_udp_gro(&udp);
        let ipv6 = listen.is_ipv6();
        let io = Io {
            udp,
            udp_state,
            ipv6,
            tcp: Mutex::new(HashMap::new()),
            routes: Mutex::new(Routes::default()),
        };
        Ok((io, listener))
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Routes datagrams naming `ufrag` (and then their source address) to `queue`.
    pub(crate) fn add_route(&self, ufrag: String, queue: PeerQueue) {
        self.routes.lock().insert(ufrag, queue);
    }

    pub(crate) fn remove_route(&self, ufrag: &str) {
        self.routes.lock().remove(ufrag);
    }

    /// Sends one of a peer's packets without waiting (see the module notes). UDP packets
    /// join this thread's batch, which [`Io::flush`] must send before the peer (or its
    /// shard) waits.
    pub(crate) fn transmit(&self, t: &str0m::net::Transmit) {
        if t.proto != Protocol::Udp {
            return self.send_tcp(t);
        }
        let max_segments = self.udp_state.max_gso_segments();
        BATCH.with_borrow_mut(|b| {
            if !b.push(t.destination, &t.contents, max_segments) {
                self.send_batch(b);
                b.push(t.destination, &t.contents, max_segments);
            }
        });
    }

    /// Sends this thread's batch.
    pub(crate) fn flush(&self) {
        BATCH.with_borrow_mut(|b| self.send_batch(b));
    }

    fn send_batch(&self, b: &mut Batch) {
        if !b.is_empty() {
            self.send_runs(b);
            b.clear();
        }
    }

    /// Sends a batch's runs with `sendmmsg`, up to [`MMSG_CHUNK`] messages a call. A full
    /// socket buffer drops what is left (see the module notes); a message the kernel
    /// refuses (e.g. ICMP news about its destination) is skipped.
    #[cfg(target_os = "linux")]
    fn send_runs(&self, b: &Batch) {
        use std::os::fd::AsRawFd;
        let fd = self.udp.as_raw_fd();
        // The control message of a run sent as GSO segments: a u16 segment size.
        // SAFETY (CMSG_*): pure size computations.
        let (cmsg_space, cmsg_len) =
            unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
        debug_assert!(cmsg_space <= std::mem::size_of::<CmsgBuf>());
        for chunk in b.runs().chunks(MMSG_CHUNK) {
            // SAFETY: plain C structs, valid when zeroed.
            let mut msgs: [libc::mmsghdr; MMSG_CHUNK] = unsafe { std::mem::zeroed() };
            let mut iovs: [libc::iovec; MMSG_CHUNK] = unsafe { std::mem::zeroed() };
            // Room for an IPv4 or IPv6 address (a sockaddr_storage is 4x larger, and the
            // arrays are zeroed per call).
            let mut addrs: [libc::sockaddr_in6; MMSG_CHUNK] = unsafe { std::mem::zeroed() };
            let mut ctrl = [CmsgBuf([0; 3]); MMSG_CHUNK];
            for (k, run) in chunk.iter().enumerate() {
                let contents = b.contents(run);
                let addr = socket2::SockAddr::from(self.wire_address(run.destination));
                let len = (addr.len() as usize).min(std::mem::size_of::<libc::sockaddr_in6>());
                // SAFETY: `addr` holds `len` valid bytes (an IPv4 or IPv6 address: they fit).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        addr.as_ptr().cast::<u8>(),
                        (&mut addrs[k] as *mut libc::sockaddr_in6).cast::<u8>(),
                        len,
                    );
                }
                iovs[k] = libc::iovec {
                    iov_base: contents.as_ptr() as *mut libc::c_void,
                    iov_len: contents.len(),
                };
                let h = &mut msgs[k].msg_hdr;
                h.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in6).cast();
                h.msg_namelen = len as libc::socklen_t;
                h.msg_iov = &mut iovs[k];
                h.msg_iovlen = 1;
                if run.count > 1 {
                    let cm = ctrl[k].0.as_mut_ptr().cast::<libc::cmsghdr>();
                    // SAFETY: `ctrl[k]` is 8-aligned and holds CMSG_SPACE(2) bytes.
                    unsafe {
                        (*cm).cmsg_len = cmsg_len as _;
                        (*cm).cmsg_level = libc::SOL_UDP;
                        (*cm).cmsg_type = libc::UDP_SEGMENT;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(cm).cast::<u16>(),
                            run.segment as u16,
                        );
                    }
                    h.msg_control = cm.cast();
                    h.msg_controllen = cmsg_space as _;
                }
            }
            let n = chunk.len();
            let mut sent = 0;
            while sent < n {
                // SAFETY: `msgs[sent..n]` point into buffers that live until the call returns.
                let r =
                    unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr().add(sent), (n - sent) as _, 0) };
                if r > 0 {
                    sent += r as usize;
                    continue;
                }
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => {}
                    std::io::ErrorKind::WouldBlock => return,
                    _ => {
                        debug!("webrtc send to {}: {e}", chunk[sent].destination);
                        sent += 1;
                    }
                }
            }
        }
    }

    /// Sends a batch's runs one message each (where `sendmmsg` is missing).
    #[cfg(not(target_os = "linux"))]
    fn send_runs(&self, b: &Batch) {
        for run in b.runs() {
            let t = quinn_udp::Transmit {
                destination: run.destination,
                ecn: None,
                contents: b.contents(run),
                segment_size: (run.count > 1).then_some(run.segment),
                src_ip: None,
            };
            let _ = self.udp.try_io(tokio::io::Interest::WRITABLE, || {
                self.udp_state.send((&self.udp).into(), &t)
            });
        }
    }

    /// `destination` as this socket writes it.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn wire_address(&self, destination: SocketAddr) -> SocketAddr {
        match destination {
            SocketAddr::V4(a) if self.ipv6 => {
                SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port())
            }
            a => a,
        }
    }

    /// Sends over an ICE-TCP connection (RFC 4571 framing, built here so the packet is
    /// copied once); a full connection queue drops the packet.
    fn send_tcp(&self, t: &str0m::net::Transmit) {
        if let Some(tx) = self.tcp.lock().get(&t.destination) {
            let mut framed = Vec::with_capacity(2 + t.contents.len());
            framed.extend_from_slice(&(t.contents.len() as u16).to_be_bytes());
            framed.extend_from_slice(&t.contents);
            let _ = tx.try_send(framed);
        }
    }

    /// The queue of the peer a packet from `from` belongs to.
    fn route(&self, from: SocketAddr, packet: &[u8]) -> Option<PeerQueue> {
        self.routes.lock().route(from, packet)
    }

    /// Reads the UDP socket until `shutdown`, routing each datagram to its peer.
    pub(crate) async fn read_udp(self: Arc<Self>, shutdown: CancellationToken) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, from) = tokio::select! {
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors surface here on Linux; they concern one peer only.
                        debug!("webrtc recv: {e}");
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let packet = &buf[..n];
            let Some(queue) = self.route(from, packet) else {
                continue;
            };
            let _ = queue.try_send(from, Protocol::Udp, packet);
        }
    }

    /// Accepts ICE-TCP connections until `shutdown`, each served by its own task.
    pub(crate) async fn accept_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) {
        loop {
            let (stream, from) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!("webrtc tcp accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                match me.serve_tcp(stream, from, shutdown).await {
                    Ok(()) => debug!(%from, "ICE-TCP connection closed"),
                    Err(e) => debug!(%from, "ICE-TCP connection ended: {e}"),
                }
                me.tcp.lock().remove(&from);
            });
        }
    }

    /// One ICE-TCP connection: RFC 4571 frames in, routed like datagrams; the peer's
    /// packets for `from` out through a bounded queue. Ends when either side closes, when
    /// its session is gone, or when its first frame names no session.
    async fn serve_tcp(
        &self,
        stream: tokio::net::TcpStream,
        from: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        self.tcp.lock().insert(from, tx);
        let writer = async move {
            while let Some(framed) = rx.recv().await {
                wr.write_all(&framed).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let reader = async {
            let mut buf = vec![0u8; u16::MAX as usize];
            let mut first = true;
            loop {
                let read = async {
                    let len = rd.read_u16().await? as usize;
                    rd.read_exact(&mut buf[..len]).await?;
                    Ok::<usize, std::io::Error>(len)
                };
                let len = if first {
                    tokio::time::timeout(TCP_FIRST_PACKET_TIMEOUT, read)
                        .await
                        .map_err(|_| std::io::Error::other("no STUN request in time"))??
                } else {
                    read.await?
                };
                let packet = &buf[..len];
                let Some(queue) = self.route(from, packet) else {
                    if first {
                        return Err(std::io::Error::other("first frame names no session"));
                    }
                    return Ok(()); // the session ended: its route is gone
                };
                first = false;
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    queue.try_send(from, Protocol::Tcp, packet)
                {
                    return Ok(()); // the session ended
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
            _ = shutdown.cancelled() => Ok(()),
        }
    }
}

/// Turns off `UDP_GRO` on `socket` (Linux; elsewhere there is nothing to turn off).
fn disable_udp_gro(socket: &UdpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let off: libc::c_int = 0;
        // SAFETY: a valid socket descriptor and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            debug!("webrtc: UDP_GRO off: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}
