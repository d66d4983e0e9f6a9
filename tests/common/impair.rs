//! A user-space network impairment relay (the kernel here has no netem): UDP datagrams
//! between one client and one server pass through it with a bandwidth limit, delay, jitter
//! (which also reorders) and random loss, each direction set on its own.
//!
//! The client sends to [`Relay::addr`]; the relay sends on to the server from its own
//! socket, so the server sees the relay as the client. Deterministic: the loss pattern comes
//! from a fixed seed.

#![allow(dead_code)]

use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, Default)]
pub struct Impairment {
    /// Bits per second; packets beyond it queue, and are dropped past `queue`.
    pub rate_bps: Option<u64>,
    /// The longest a packet may wait for the rate limit (tail drop beyond).
    pub queue: Duration,
    pub delay: Duration,
    /// Extra delay, uniform in [0, jitter): packets closer than this may be reordered.
    pub jitter: Duration,
    /// Probability in [0, 1] that a packet is lost.
    pub loss: f64,
}

impl Impairment {
    pub fn rate(bps: u64) -> Self {
        Impairment {
            rate_bps: Some(bps),
            queue: Duration::from_millis(100),
            ..Default::default()
        }
    }
}

/// Counters of one direction.
#[derive(Default)]
pub struct DirectionStats {
    pub passed: AtomicU64,
    pub dropped: AtomicU64,
    pub bytes: AtomicU64,
}

impl DirectionStats {
    /// Datagrams passed and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.passed.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

pub struct Relay {
    pub addr: SocketAddr,
    /// Client → server.
    pub up: Arc<DirectionStats>,
    /// Server → client.
    pub down: Arc<DirectionStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Pending {
    due: Instant,
    seq: u64,
    to_server: bool,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    /// Earliest due first out of the (max-)heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// One direction's shaping state.
struct Shaper {
    imp: Impairment,
    /// When the rate-limited link is free again.
    free_at: Instant,
    stats: Arc<DirectionStats>,
}

impl Shaper {
    /// When a packet of `len` bytes arriving at `now` comes out, or None if it is lost.
    fn schedule(&mut self, now: Instant, len: usize, rng: &mut impl Rng) -> Option<Instant> {
        if self.imp.loss > 0.0 && rng.random_bool(self.imp.loss.min(1.0)) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut out = now;
        if let Some(bps) = self.imp.rate_bps {
            let start = self.free_at.max(now);
            if start.duration_since(now) > self.imp.queue {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            self.free_at = start + Duration::from_secs_f64(len as f64 * 8.0 / bps as f64);
            out = self.free_at;
        }
        let jitter = if self.imp.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.imp.jitter.mul_f64(rng.random::<f64>())
        };
        self.stats.passed.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
        Some(out + self.imp.delay + jitter)
    }
}

impl Relay {
    /// Relays to `server` with `up` (client → server) and `down` (server → client).
    pub fn start(server: SocketAddr, up: Impairment, down: Impairment) -> Relay {
        let front = UdpSocket::bind((server.ip(), 0)).unwrap();
        let back = UdpSocket::bind((server.ip(), 0)).unwrap();
        front.set_nonblocking(true).unwrap();
        back.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let now = Instant::now();
        let mut shapers = [
            Shaper {
                imp: up,
                free_at: now,
                stats: Arc::default(),
            },
            Shaper {
                imp: down,
                free_at: now,
                stats: Arc::default(),
            },
        ];
        let (up_stats, down_stats) = (shapers[0].stats.clone(), shapers[1].stats.clone());
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut heap = BinaryHeap::new();
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            let mut seq = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let now = Instant::now();
                for (dir, socket) in [&front, &back].into_iter().enumerate() {
                    let to_server = dir == 0;
                    while let Ok((n, from)) = socket.recv_from(&mut buf) {
                        if to_server {
                            client = Some(from);
                        }
                        if let Some(due) = shapers[dir].schedule(now, n, &mut rng) {
                            seq += 1;
                            heap.push(Pending {
                                due,
                                seq,
                                to_server,
                                data: buf[..n].to_vec(),
                            });
                        }
                    }
                }
                while heap.peek().is_some_and(|p| p.due <= now) {
                    let p = heap.pop().unwrap();
                    if p.to_server {
                        let _ = back.send_to(&p.data, server);
                    } else if let Some(c) = client {
                        let _ = front.send_to(&p.data, c);
                    }
                }
                let next = heap.peek().map_or(Duration::from_millis(1), |p| {
                    p.due.saturating_duration_since(now)
                });
                std::thread::sleep(next.min(Duration::from_millis(1)));
            }
        });
        Relay {
            addr,
            up: up_stats,
            down: down_stats,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
