//! WHEP viewers served in shards: one task per worker thread drives many viewers' peers.
//!
//! A task per viewer woke once per frame per viewer (30 video + 50 audio frames a second),
//! each wake-up a trip through the runtime's scheduler and a timer of its own. A shard
//! instead waits on one [`FrameSignal`] per stream its viewers read: a frame wakes the shard
//! once, and it steps each of that stream's viewers in turn ([`WhepPeer::step`]), which
//! reads its subscription without waiting and writes what str0m sends into the thread's
//! send batch. The batch goes out once per wake-up for all the viewers (`sendmmsg`,
//! [`super::batch`]). The shard has one timer, set to the earliest of its viewers' str0m
//! timeouts, and one queue of incoming datagrams, each tagged with its viewer.
//!
//! A new viewer joins on a *joining shard*, which runs on a thread of its own (not a runtime
//! worker): its ICE checks, its DTLS handshake (the ECDH and ECDSA work) and the cached GOP
//! it is sent at once happen there, so a storm of joins does not hold up the frames of
//! those already watching. Once connected and caught up, the viewer is handed to the media
//! shard with the fewest viewers: its datagrams are routed there, and the few already
//! queued toward the joining shard are forwarded for a while.
//!
//! A sweep every [`SWEEP`] looks for what neither media nor datagrams bring: a DELETE, a
//! connect deadline passed, a layer subscription made on another task (that one also wakes
//! the shard at once).
//!
//! Each viewer keeps its own subscription (its place under the viewer limits, its GOP
//! backlog, its lag policy), so a viewer behaves as it did in a task of its own. A shard
//! never awaits while stepping its viewers.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::io::{Datagram, Io, PeerQueue};
use super::sessions::{SessionEnd, Sessions};
use super::whep::WhepPeer;
use crate::hub::FrameSignal;

/// How often a shard looks for DELETEs and connect deadlines.
const SWEEP: Duration = Duration::from_millis(50);
/// Datagrams queued toward one shard (its viewers send RTCP, STUN and DTLS: a few a
/// second each, more while a storm of them joins). A full queue drops the datagram.
const SHARD_QUEUE: usize = 16_384;
/// Datagrams a shard takes from its queue at once.
const DATAGRAMS_PER_WAKE: usize = 256;
/// New viewers queued toward one shard (the HTTP handler waits when it is full).
const ARRIVALS_QUEUE: usize = 1024;
/// How long a joining shard forwards the datagrams of a viewer it handed over (those the
/// socket reader queued before the viewer's route moved).
const FORWARD_MOVED: Duration = Duration::from_secs(2);
/// Media shards per joining shard (each joining shard is a thread).
const MEDIA_PER_JOINING: usize = 4;
/// The joining threads' nice value: with the cores busy, the kernel runs the frames of
/// those watching before the handshakes of those joining.
const JOINING_NICE: i32 = 10;

/// The shards of a node's WHEP viewers.
pub(crate) struct Shards {
    /// Where new viewers connect, each on a thread of its own.
    joining: Vec<ShardHandle>,
    /// The viewers on the joining shards (`webrtc_viewers_joining`).
    joining_gauge: Gauge,
    next_tag: AtomicU64,
}

#[derive(Clone)]
struct ShardHandle {
    arrivals: mpsc::Sender<Arrival>,
    datagrams: mpsc::Sender<Datagram>,
    wake: Arc<Notify>,
    /// Viewers placed on this shard and not ended.
    load: Arc<AtomicUsize>,
}

/// Where a new viewer will be served: its shard and its tag there.
pub(crate) struct Placement {
    shard: usize,
    tag: u64,
}

/// A viewer handed to its shard.
struct Arrival {
    tag: u64,
    id: String,
    span: tracing::Span,
    peer: WhepPeer,
}

impl Shards {
    /// Starts `count` media shards (at least one) on the current runtime, and a joining
    /// shard per [`MEDIA_PER_JOINING`] of them on threads of their own; they end with
    /// `shutdown`, their viewers first.
    pub(crate) fn start(
        count: usize,
        sessions: Arc<Sessions>,
        io: Arc<Io>,
        joining_gauge: Gauge,
        shutdown: CancellationToken,
    ) -> std::io::Result<Shards> {
        let media: Arc<[ShardHandle]> = (0..count.max(1))
            .map(|_| {
                let (shard, handle, rx) = Shard::new(&sessions, &io, None, None);
                tokio::spawn(shard.run(rx, shutdown.clone()));
                handle
            })
            .collect();
        let joining = (0..count.max(1).div_ceil(MEDIA_PER_JOINING))
            .map(|n| {
                let (shard, handle, rx) = Shard::new(
                    &sessions,
                    &io,
                    Some(media.clone()),
                    Some(joining_gauge.clone()),
                );
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let shutdown = shutdown.clone();
                std::thread::Builder::new()
                    .name(format!("whep-join-{n}"))
                    .spawn(move || {
                        lower_priority(JOINING_NICE);
                        runtime.block_on(shard.run(rx, shutdown))
                    })?;
                Ok(handle)
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Shards {
            joining,
            joining_gauge,
            next_tag: AtomicU64::new(1),
        })
    }

    /// A place for a new viewer, on the joining shard with the fewest viewers.
    pub(crate) fn place(&self) -> Placement {
        let shard = least_loaded(&self.joining);
        self.joining[shard].load.fetch_add(1, Ordering::Relaxed);
        self.joining_gauge.inc();
        Placement {
            shard,
            tag: self.next_tag.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Where the placed viewer's datagrams go (until it is handed over).
    pub(crate) fn queue(&self, place: &Placement) -> PeerQueue {
        PeerQueue {
            tx: self.joining[place.shard].datagrams.clone(),
            tag: place.tag,
        }
    }

    /// What the placed viewer's layer subscriptions wake (until it is handed over).
    pub(crate) fn wake(&self, place: &Placement) -> Arc<Notify> {
        self.joining[place.shard].wake.clone()
    }

    /// Hands the placed viewer (session `id`, logging in `span`) to its shard. False if the
    /// shard is gone (the node is shutting down).
    pub(crate) async fn add(
        &self,
        place: Placement,
        id: String,
        span: tracing::Span,
        peer: WhepPeer,
    ) -> bool {
        let shard = &self.joining[place.shard];
        let arrival = Arrival {
            tag: place.tag,
            id,
            span,
            peer,
        };
        if shard.arrivals.send(arrival).await.is_err() {
            shard.load.fetch_sub(1, Ordering::Relaxed);
            self.joining_gauge.dec();
            return false;
        }
        true
    }
}

/// The shard with the fewest viewers (there is at least one shard).
fn least_loaded(shards: &[ShardHandle]) -> usize {
    (0..shards.len())
        .min_by_key(|&i| shards[i].load.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// Gives the calling thread `nice` (Linux: a thread's own; raising it needs no privilege).
fn lower_priority(nice: i32) {
    // SAFETY: setpriority reads no memory of ours; `who = 0` is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::warn!(
            "webrtc: cannot lower the joining thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One viewer of a shard.
struct Viewer {
    tag: u64,
    id: String,
    span: tracing::Span,
    peer: WhepPeer,
}

type Ringing = Pin<Box<dyn Future<Output = (FrameSignal, bool)> + Send>>;

/// What a shard receives.
struct Inbox {
    arrivals: mpsc::Receiver<Arrival>,
    datagrams: mpsc::Receiver<Datagram>,
    wake: Arc<Notify>,
}

struct Shard {
    viewers: Vec<Viewer>,
    /// Index in `viewers` by tag.
    by_tag: HashMap<u64, usize>,
    /// The streams the shard has a signal for (by stream id).
    signals: HashSet<usize>,
    /// Those signals, each waiting for its stream's next events.
    ringing: FuturesUnordered<Ringing>,
    sessions: Arc<Sessions>,
    io: Arc<Io>,
    load: Arc<AtomicUsize>,
    /// A joining shard's media shards, where its viewers go once connected.
    media: Option<Arc<[ShardHandle]>>,
    /// The viewers a joining shard handed over: their media shard and when.
    moved: HashMap<u64, (usize, Instant)>,
    /// A joining shard's viewers in the node's metrics.
    joining_gauge: Option<Gauge>,
}

impl Shard {
    /// A shard, joining if it has `media` shards to hand its viewers to.
    fn new(
        sessions: &Arc<Sessions>,
        io: &Arc<Io>,
        media: Option<Arc<[ShardHandle]>>,
        joining_gauge: Option<Gauge>,
    ) -> (Shard, ShardHandle, Inbox) {
        let (arrivals, arrivals_rx) = mpsc::channel(ARRIVALS_QUEUE);
        let (datagrams, datagrams_rx) = mpsc::channel(SHARD_QUEUE);
        let wake = Arc::new(Notify::new());
        let load = Arc::new(AtomicUsize::new(0));
        let shard = Shard {
            viewers: Vec::new(),
            by_tag: HashMap::new(),
            signals: HashSet::new(),
            ringing: FuturesUnordered::new(),
            sessions: sessions.clone(),
            io: io.clone(),
            load: load.clone(),
            media,
            moved: HashMap::new(),
            joining_gauge,
        };
        let handle = ShardHandle {
            arrivals,
            datagrams,
            wake: wake.clone(),
            load,
        };
        let inbox = Inbox {
            arrivals: arrivals_rx,
            datagrams: datagrams_rx,
            wake,
        };
        (shard, handle, inbox)
    }

    async fn run(mut self, inbox: Inbox, shutdown: CancellationToken) {
        let Inbox {
            mut arrivals,
            mut datagrams,
            wake,
        } = inbox;
        let mut received = Vec::with_capacity(DATAGRAMS_PER_WAKE);
        let mut next_sweep = Instant::now() + SWEEP;
        let sleep = tokio::time::sleep_until(next_sweep.into());
        tokio::pin!(sleep);
        loop {
            let deadline = self.earliest_timeout().min(next_sweep);
            sleep.as_mut().reset(deadline.into());
            // Arrivals come before datagrams: a viewer's first datagram can only follow its
            // answer, sent after its arrival was queued.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                a = arrivals.recv() => match a {
                    Some(a) => self.admit(a),
                    None => break,
                },
                Some((signal, live)) = self.ringing.next(), if !self.ringing.is_empty() => {
                    self.ring(signal, live);
                }
                n = datagrams.recv_many(&mut received, DATAGRAMS_PER_WAKE) => {
                    if n == 0 {
                        break;
                    }
                    self.receive(&mut received);
                }
                _ = wake.notified() => self.sweep(),
                _ = &mut sleep => {
                    let now = Instant::now();
                    self.timeouts(now);
                    if now >= next_sweep {
                        self.sweep();
                        next_sweep = now + SWEEP;
                    }
                }
            }
            self.io.flush();
        }
        // Shutting down: the viewers' tokens are cancelled with the node's, and each ends
        // as deleted.
        for i in (0..self.viewers.len()).rev() {
            self.step(i);
        }
        self.io.flush();
    }

    fn earliest_timeout(&self) -> Instant {
        let far = Instant::now() + SWEEP;
        self.viewers
            .iter()
            .map(|v| v.peer.timeout())
            .min()
            .map_or(far, |t| t.min(far))
    }

    fn admit(&mut self, a: Arrival) {
        self.by_tag.insert(a.tag, self.viewers.len());
        self.viewers.push(Viewer {
            tag: a.tag,
            id: a.id,
            span: a.span,
            peer: a.peer,
        });
        let i = self.viewers.len() - 1;
        self.listen(i);
        self.step(i);
    }

    /// Makes sure the shard has a signal for each stream viewer `i` reads.
    fn listen(&mut self, i: usize) {
        for sub in self.viewers[i].peer.subscriptions() {
            if self.signals.insert(sub.stream_id()) {
                let mut signal = sub.signal();
                self.ringing.push(Box::pin(async move {
                    let live = signal.wait().await;
                    (signal, live)
                }));
            }
        }
    }

    /// A stream has new events: steps its viewers, and waits for the next ones while any
    /// viewer reads it.
    fn ring(&mut self, mut signal: FrameSignal, live: bool) {
        let id = signal.stream_id();
        let mut readers = 0;
        // Backwards: an ended viewer is swapped with the last one, already stepped.
        for i in (0..self.viewers.len()).rev() {
            if self.viewers[i].peer.reads(id) {
                readers += 1;
                self.step(i);
            }
        }
        if live && readers > 0 {
            self.ringing.push(Box::pin(async move {
                let live = signal.wait().await;
                (signal, live)
            }));
        } else {
            self.signals.remove(&id);
        }
    }

    fn receive(&mut self, received: &mut Vec<Datagram>) {
        for d in received.drain(..) {
            let Some(&i) = self.by_tag.get(&d.tag) else {
                self.forward(d);
                continue;
            };
            match self.viewers[i].peer.receive(&d) {
                Ok(()) => self.step(i),
                Err(e) => self.end(i, Err(e)),
            }
        }
    }

    fn timeouts(&mut self, now: Instant) {
        for i in (0..self.viewers.len()).rev() {
            if self.viewers[i].peer.timeout() > now {
                continue;
            }
            match self.viewers[i].peer.handle_timeout(now) {
                Ok(()) => self.step(i),
                Err(e) => self.end(i, Err(e)),
            }
        }
    }

    /// A datagram for a viewer this shard handed over goes after it (a full queue drops
    /// it, as the socket reader would); one for an ended viewer is dropped.
    fn forward(&mut self, d: Datagram) {
        if let (Some(&(to, _)), Some(media)) = (self.moved.get(&d.tag), &self.media) {
            let _ = media[to].datagrams.try_send(d);
        }
    }

    fn sweep(&mut self) {
        self.moved.retain(|_, (_, at)| at.elapsed() < FORWARD_MOVED);
        for i in (0..self.viewers.len()).rev() {
            if self.viewers[i].peer.needs_step() {
                self.step(i);
            }
        }
    }

    fn step(&mut self, i: usize) {
        let v = &mut self.viewers[i];
        let end = {
            let _entered = v.span.enter();
            v.peer.step()
        };
        if let Some(end) = end {
            return self.end(i, end);
        }
        if self.media.is_some() && self.viewers[i].peer.is_live() {
            return self.hand_over(i);
        }
        if self.viewers[i].peer.take_subscribed() {
            self.listen(i);
        }
    }

    /// Hands a connected viewer, sent what it was waiting for, from this joining shard to
    /// the media shard with the fewest viewers. With that shard's queue of arrivals full,
    /// the viewer stays here until its next step.
    fn hand_over(&mut self, i: usize) {
        let Some(media) = self.media.clone() else {
            return;
        };
        let to = least_loaded(&media);
        let target = &media[to];
        let Ok(permit) = target.arrivals.try_reserve() else {
            return;
        };
        let mut v = self.take(i);
        self.load.fetch_sub(1, Ordering::Relaxed);
        target.load.fetch_add(1, Ordering::Relaxed);
        v.peer.set_wake(target.wake.clone());
        let (tag, id) = (v.tag, v.id.clone());
        // The arrival first: the media shard takes arrivals before datagrams, so it knows
        // the viewer by the time its datagrams come; those still on their way here are
        // forwarded.
        permit.send(Arrival {
            tag,
            id: v.id,
            span: v.span,
            peer: v.peer,
        });
        self.sessions.reroute(
            &id,
            PeerQueue {
                tx: target.datagrams.clone(),
                tag,
            },
        );
        self.moved.insert(tag, (to, Instant::now()));
    }

    /// Takes viewer `i` out (the last one takes its place).
    fn take(&mut self, i: usize) -> Viewer {
        let v = self.viewers.swap_remove(i);
        self.by_tag.remove(&v.tag);
        if let Some(moved) = self.viewers.get(i) {
            self.by_tag.insert(moved.tag, i);
        }
        if let Some(g) = &self.joining_gauge {
            g.dec();
        }
        v
    }

    fn end(&mut self, i: usize, end: SessionEnd) {
        let v = self.take(i);
        v.span.in_scope(|| match end {
            Ok(reason) => info!("session ended: {reason}"),
            Err(e) => info!("session failed: {e}"),
        });
        self.sessions.remove(&v.id);
        self.load.fetch_sub(1, Ordering::Relaxed);
    }
}
