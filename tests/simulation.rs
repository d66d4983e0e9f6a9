//! A deterministic, in-process simulation of a large cluster on virtual time: 20 origins in
//! 4 regions (full mesh), 200 edges (each with its region's origins, nearest first), 1000
//! streams, then the loss of an origin.
//!
//! What is real: the control protocol (meshcast's sans-IO `ControlSession` on both ends of
//! every link, every message encoded and decoded as bytes by `wire`), the stream
//! `Directory` and its announce rank, and the pull decisions the node runs: which link a
//! pull subscribes over (`backbone::select::PullSelection`) and what a pull does when its
//! upstream is lost (`backbone::rehome::Rehome`), the same types `backbone/pull.rs`
//! drives. What is modelled: the network (per-link one-way delay, a virtual clock turned
//! into `Instant`s from a fixed start), link liveness (a dead peer's links close a link
//! timeout after it died), and the hub around the pulls: a relay is shared by every
//! consumer (one pull per stream and node), an origin serves other origins only its own
//! streams, and a subscribe for a name nobody announced yet waits up to the hub's play
//! wait, looking again every 50 ms. Media is not simulated; a served subscription is one
//! copy of the stream over one link.
//!
//! It checks the bounds of `docs/cluster.md`: control messages per stream start, copies
//! per stream (a stream crosses the mesh at most once per origin), and that the directory
//! converges after an origin dies. Run with `--nocapture` to see the numbers.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use bytes::Bytes;
use std::time::{Duration, Instant};

use meshcast::backbone::directory::Directory;
use meshcast::backbone::rehome::{NoUpstream, Rehome};
use meshcast::backbone::select::{LinkedUpstream, PullSelection};
use meshcast::backbone::session::{ControlSession, PeerInfo, SessionEvent};
use meshcast::backbone::wire::{code, Announcement, ControlMessage, FrameDecoder};
use meshcast::config::Role;
use meshcast::media::StreamKey;

const ORIGINS: usize = 20;
const REGIONS: usize = 4;
const EDGES_PER_ORIGIN: usize = 10;
const STREAMS: usize = 1000;
const VIEWER_JOINS: usize = 5000;
/// The backbone's link timeout (a dead peer's link closes this long after it went quiet).
const LINK_TIMEOUT_MS: u64 = 700;
/// How long a publisher takes to reconnect to another origin.
const REPUBLISH_MS: u64 = 1000;
/// The backbone's rehome window (`backbone.rehome_window_ms`).
const REHOME_WINDOW_MS: u64 = 5000;
/// The backbone's return hold-down (`backbone.return_after_ms`).
const RETURN_AFTER_MS: u64 = 3000;
/// The hub's play wait (`limits.play_wait_ms`) and how often it looks again.
const PLAY_WAIT_MS: u64 = 1000;
const PLAY_WAIT_POLL_MS: u64 = 50;

/// A small deterministic generator (no dependency, same numbers every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

struct Link {
    dialer: usize,
    acceptor: usize,
    d: ControlSession,
    a: ControlSession,
    delay_ms: u64,
    up: bool,
    /// When the link came up (virtual ms).
    since: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Pending,
    Live,
}

struct Relay {
    state: Upstream,
    /// (link, subscription id) of the pull.
    upstream: Option<(usize, u64)>,
    /// Downstream subscriptions waiting for the pull to go live: (link, id).
    waiting: Vec<(usize, u64)>,
    /// The node's re-homing decisions for this pull.
    rehome: Rehome,
}

impl Relay {
    fn new(waiting: Vec<(usize, u64)>) -> Relay {
        Relay {
            state: Upstream::Pending,
            upstream: None,
            waiting,
            rehome: Rehome::new(Duration::from_millis(REHOME_WINDOW_MS)),
        }
    }
}

struct Node {
    id: String,
    origin: bool,
    region: usize,
    alive: bool,
    /// The node's pull selection (its role and return hold-down).
    selection: PullSelection,
    dir: Directory,
    local: HashMap<StreamKey, Announcement>,
    relays: HashMap<StreamKey, Relay>,
    /// Links this node dialed, in preference order (edges: their origins, nearest first).
    dials: Vec<usize>,
    /// When the directory last changed.
    dir_changed: u64,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Deliver {
        link: usize,
        to_acceptor: bool,
        bytes: Vec<u8>,
    },
    Publish {
        stream: usize,
        origin: usize,
    },
    Join {
        edge: usize,
        stream: usize,
    },
    Kill {
        node: usize,
    },
    LinkDown {
        link: usize,
    },
    Retry {
        node: usize,
        stream: usize,
    },
    /// The hub's play wait looks again for a subscribe (link, id) it holds.
    PlayWait {
        node: usize,
        link: usize,
        id: u64,
        stream: usize,
        until: u64,
    },
}

#[derive(Default, Clone)]
struct Counts {
    messages: BTreeMap<&'static str, u64>,
    bytes: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.messages.values().sum()
    }
    fn get(&self, name: &str) -> u64 {
        self.messages.get(name).copied().unwrap_or(0)
    }
}

/// The cluster token of every simulated node.
const TOKEN: &str = "simulated-cluster-token";

struct Sim {
    /// The `Instant` virtual time 0 stands for.
    t0: Instant,
    now: u64,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64, Ev)>>,
    nodes: Vec<Node>,
    links: Vec<Link>,
    keys: Vec<StreamKey>,
    /// Served subscriptions: (link, id) -> stream (one copy of the stream over the link).
    served: HashMap<(usize, u64), StreamKey>,
    counts: Counts,
    /// Decoders per (link, direction), to count what really went over the wire.
    decoders: HashMap<(usize, bool), FrameDecoder>,
    failed_pulls: u64,
}

impl Sim {
    fn build() -> Sim {
        let mut nodes = Vec::new();
        for i in 0..ORIGINS {
            nodes.push(Node::new(format!("origin-{i:02}"), true, i % REGIONS));
        }
        for o in 0..ORIGINS {
            for e in 0..EDGES_PER_ORIGIN {
                nodes.push(Node::new(format!("edge-{o:02}-{e}"), false, o % REGIONS));
            }
        }
        let mut sim = Sim {
            t0: Instant::now(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            links: Vec::new(),
            keys: (0..STREAMS)
                .map(|i| StreamKey::new("live", &format!("s{i}")).unwrap())
                .collect(),
            served: HashMap::new(),
            counts: Counts::default(),
            decoders: HashMap::new(),
            failed_pulls: 0,
        };
        // Full mesh: every origin dials every other.
        for i in 0..ORIGINS {
            for j in 0..ORIGINS {
                if i != j {
                    sim.connect(i, j);
                }
            }
        }
        // Each edge dials its own origin, then the next origin of its region.
        for o in 0..ORIGINS {
            let backup = (o + REGIONS) % ORIGINS;
            for e in 0..EDGES_PER_ORIGIN {
                let edge = ORIGINS + o * EDGES_PER_ORIGIN + e;
                sim.connect(edge, o);
                sim.connect(edge, backup);
            }
        }
        sim
    }

    /// One-way delay: 2 ms within a region, 20-80 ms between regions.
    fn delay(&self, a: usize, b: usize) -> u64 {
        let (ra, rb) = (self.nodes[a].region, self.nodes[b].region);
        if ra == rb {
            2
        } else {
            20 * (ra.abs_diff(rb) as u64 + 1)
        }
    }

    fn connect(&mut self, dialer: usize, acceptor: usize) {
        let info = |n: &Node| PeerInfo {
            node_id: n.id.clone(),
            role: if n.origin { Role::Origin } else { Role::Edge },
            region: format!("r{}", n.region),
        };
        // Nonces need only differ per session here (the driver draws them from the OS).
        let nonce = |side: u64| {
            let mut n = [0u8; 32];
            n[..8].copy_from_slice(&(self.links.len() as u64 * 2 + side).to_be_bytes());
            n
        };
        let link = Link {
            dialer,
            acceptor,
            d: ControlSession::dialer(info(&self.nodes[dialer]), TOKEN, nonce(0), [0; 32]),
            a: ControlSession::acceptor(info(&self.nodes[acceptor]), TOKEN, nonce(1), [0; 32]),
            delay_ms: self.delay(dialer, acceptor),
            up: true,
            since: self.now,
        };
        self.links.push(link);
        let l = self.links.len() - 1;
        self.nodes[dialer].dials.push(l);
        self.flush(l);
    }

    /// Virtual time as the node's machines take it.
    fn instant(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.t0).as_millis() as u64
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(std::cmp::Reverse((at, self.seq, ev)));
    }

    /// Sends what both ends of link `l` have queued, counting every message.
    fn flush(&mut self, l: usize) {
        for to_acceptor in [true, false] {
            loop {
                let link = &mut self.links[l];
                let out: Option<Bytes> = if to_acceptor {
                    link.d.poll_transmit()
                } else {
                    link.a.poll_transmit()
                };
                let Some(bytes) = out else { break };
                if !link.up {
                    continue;
                }
                let at = self.now + link.delay_ms;
                self.count(l, to_acceptor, &bytes);
                self.push(
                    at,
                    Ev::Deliver {
                        link: l,
                        to_acceptor,
                        bytes: bytes.to_vec(),
                    },
                );
            }
        }
    }

    fn count(&mut self, l: usize, dir: bool, bytes: &[u8]) {
        self.counts.bytes += bytes.len() as u64;
        let dec = self.decoders.entry((l, dir)).or_default();
        dec.push(bytes);
        while let Some((t, body)) = dec.next_frame().unwrap() {
            let m = ControlMessage::decode(t, body).expect("valid wire bytes");
            *self.counts.messages.entry(m.name()).or_default() += 1;
        }
    }

    fn run_until(&mut self, t: u64) {
        while let Some(std::cmp::Reverse((at, _, _))) = self.queue.peek() {
            if *at > t {
                break;
            }
            let std::cmp::Reverse((at, _, ev)) = self.queue.pop().unwrap();
            self.now = at;
            self.handle(ev);
        }
        self.now = t;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                link,
                to_acceptor,
                bytes,
            } => {
                let l = &mut self.links[link];
                if !l.up {
                    return;
                }
                let events = if to_acceptor {
                    l.a.handle_input(&bytes)
                } else {
                    l.d.handle_input(&bytes)
                }
                .expect("sessions agree");
                for e in events {
                    if to_acceptor {
                        self.on_acceptor(link, e);
                    } else {
                        self.on_dialer(link, e);
                    }
                }
                self.flush(link);
            }
            Ev::Publish { stream, origin } => self.publish(stream, origin),
            Ev::Join { edge, stream } => self.join(edge, stream),
            Ev::Kill { node } => {
                self.nodes[node].alive = false;
                let links: Vec<usize> = (0..self.links.len())
                    .filter(|&l| self.links[l].dialer == node || self.links[l].acceptor == node)
                    .collect();
                for l in links {
                    self.links[l].up = false;
                    // Its peers notice by silence, a link timeout later.
                    self.push(self.now + LINK_TIMEOUT_MS, Ev::LinkDown { link: l });
                }
            }
            Ev::LinkDown { link } => self.link_down(link),
            Ev::Retry { node, stream } => self.pull(node, stream),
            Ev::PlayWait {
                node,
                link,
                id,
                stream,
                until,
            } => self.play_wait(node, link, id, stream, until),
        }
    }

    fn publish(&mut self, stream: usize, origin: usize) {
        let key = self.keys[stream].clone();
        let a = Announcement {
            stream: key.clone(),
            timeline: stream as u64 + 1,
            started_ms: 1_700_000_000_000 + self.now,
        };
        self.nodes[origin].local.insert(key.clone(), a.clone());
        // `Hub::publish` + `run_pull`: a relay of the name on this node now feeds from the
        // local publish, and serves whoever waited for it.
        let now = self.instant(self.now);
        if let Some(r) = self.nodes[origin].relays.get_mut(&key) {
            r.rehome.taken_over_locally(now);
            r.state = Upstream::Live;
            r.upstream = None;
            let waiting = std::mem::take(&mut r.waiting);
            for (wl, wid) in waiting {
                self.serve(wl, wid, &key);
            }
        }
        // run_inbound: a local publish is announced on every link an origin dialed to us.
        for l in 0..self.links.len() {
            let link = &self.links[l];
            if link.acceptor == origin && link.up && self.nodes[link.dialer].origin {
                self.links[l].a.announce(a.clone()).unwrap();
                self.flush(l);
            }
        }
    }

    fn join(&mut self, edge: usize, stream: usize) {
        let key = self.keys[stream].clone();
        if self.nodes[edge].relays.contains_key(&key) {
            return; // A viewer more of a stream the edge already pulls: no message.
        }
        self.nodes[edge].relays.insert(key, Relay::new(Vec::new()));
        self.pull(edge, stream);
    }

    /// The link `node`'s [`PullSelection`] picks for `key`, from its dialed links in
    /// preference order and its directory's owner of the stream.
    fn choose_link(&self, node: usize, key: &StreamKey) -> Option<usize> {
        let n = &self.nodes[node];
        let view: Vec<Option<LinkedUpstream>> = n
            .dials
            .iter()
            .map(|&l| {
                let link = &self.links[l];
                link.up.then(|| LinkedUpstream {
                    node: &self.nodes[link.acceptor].id,
                    since: self.instant(link.since),
                })
            })
            .collect();
        let owner = n.dir.owner(key).map(|o| o.node.as_str());
        n.selection.choose(&view, owner).map(|i| n.dials[i])
    }

    /// A pull's attempt (`Backbone::run_pull`): subscribe over the chosen link, or ask the
    /// pull's [`Rehome`] what to do without one.
    fn pull(&mut self, node: usize, stream: usize) {
        let key = self.keys[stream].clone();
        if !self.nodes[node].alive {
            return;
        }
        let Some(relay) = self.nodes[node].relays.get(&key) else {
            return;
        };
        if relay.upstream.is_some() || self.nodes[node].local.contains_key(&key) {
            return;
        }
        match self.choose_link(node, &key) {
            Some(l) => {
                let id = self.links[l].d.subscribe(key.clone()).unwrap();
                self.nodes[node].relays.get_mut(&key).unwrap().upstream = Some((l, id));
                self.flush(l);
            }
            None => self.no_upstream(node, stream),
        }
    }

    /// A pull found no upstream (none to ask, or the one asked refused).
    fn no_upstream(&mut self, node: usize, stream: usize) {
        let key = &self.keys[stream];
        let now = self.instant(self.now);
        let Some(relay) = self.nodes[node].relays.get_mut(key) else {
            return;
        };
        relay.upstream = None;
        match relay.rehome.no_upstream(now) {
            NoUpstream::RetryAt(at) => {
                let at = self.ms(at);
                self.push(at, Ev::Retry { node, stream });
            }
            NoUpstream::NeverPulled | NoUpstream::WindowOver(_) => {
                self.failed_pulls += 1;
                let relay = self.nodes[node].relays.remove(key).unwrap();
                for (wl, wid) in relay.waiting {
                    self.refuse(wl, wid);
                }
            }
        }
    }

    fn refuse(&mut self, l: usize, id: u64) {
        if self.links[l].up {
            self.links[l]
                .a
                .reject(id, code::NOT_FOUND, "not here")
                .unwrap();
            self.flush(l);
        }
    }

    /// The hub's play wait for a subscribe from an edge: once some origin announces the
    /// name, a relay pulls it (one per stream and node); past the wait, a refusal.
    fn play_wait(&mut self, node: usize, l: usize, id: u64, stream: usize, until: u64) {
        let key = self.keys[stream].clone();
        if !self.links[l].up || !self.nodes[node].alive {
            return;
        }
        let n = &self.nodes[node];
        if n.local.contains_key(&key) {
            return self.serve(l, id, &key);
        }
        if let Some(r) = self.nodes[node].relays.get_mut(&key) {
            if r.state == Upstream::Live {
                return self.serve(l, id, &key);
            }
            r.waiting.push((l, id));
            return;
        }
        if self.choose_link(node, &key).is_some() {
            self.nodes[node]
                .relays
                .insert(key, Relay::new(vec![(l, id)]));
            return self.pull(node, stream);
        }
        if self.now >= until {
            return self.refuse(l, id);
        }
        let next = (self.now + PLAY_WAIT_POLL_MS).min(until);
        self.push(
            next,
            Ev::PlayWait {
                node,
                link: l,
                id,
                stream,
                until,
            },
        );
    }

    fn on_dialer(&mut self, l: usize, e: SessionEvent) {
        let node = self.links[l].dialer;
        let peer = self.nodes[self.links[l].acceptor].id.clone();
        match e {
            SessionEvent::Announced(a) => {
                let n = &mut self.nodes[node];
                n.dir.announce(&peer, a);
                n.dir_changed = self.now;
            }
            SessionEvent::Withdrawn(s) => {
                let n = &mut self.nodes[node];
                n.dir.withdraw(&peer, &s);
                n.dir_changed = self.now;
            }
            SessionEvent::SubscribeAccepted { id, .. } => {
                let now = self.instant(self.now);
                let n = &mut self.nodes[node];
                let Some((key, relay)) = n
                    .relays
                    .iter_mut()
                    .find(|(_, r)| r.upstream == Some((l, id)))
                else {
                    return;
                };
                relay.state = Upstream::Live;
                relay.rehome.subscribed(now);
                let (key, waiting) = (key.clone(), std::mem::take(&mut relay.waiting));
                for (wl, wid) in waiting {
                    self.serve(wl, wid, &key);
                }
            }
            SessionEvent::SubscribeRejected { id, .. } => {
                let n = &self.nodes[node];
                if let Some(key) = n
                    .relays
                    .iter()
                    .find(|(_, r)| r.upstream == Some((l, id)))
                    .map(|(k, _)| k.clone())
                {
                    let stream = self.keys.iter().position(|k| *k == key).unwrap();
                    self.no_upstream(node, stream);
                }
            }
            _ => {}
        }
    }

    fn serve(&mut self, l: usize, id: u64, key: &StreamKey) {
        if self.links[l].up && self.links[l].a.accept(id, 1).unwrap() {
            self.served.insert((l, id), key.clone());
            self.flush(l);
        }
    }

    /// `run_inbound`: serve a local stream or a live relay; for an edge (scope Any), an
    /// origin pulls what it lacks (once per stream); another origin gets local streams only.
    fn on_acceptor(&mut self, l: usize, e: SessionEvent) {
        let node = self.links[l].acceptor;
        let from_origin = self.nodes[self.links[l].dialer].origin;
        match e {
            SessionEvent::Ready(_) if from_origin => {
                let mine: Vec<Announcement> = self.nodes[node].local.values().cloned().collect();
                for a in mine {
                    self.links[l].a.announce(a).unwrap();
                }
            }
            SessionEvent::SubscribeRequested { id, stream } => {
                let n = &self.nodes[node];
                let live = n.local.contains_key(&stream)
                    || n.relays
                        .get(&stream)
                        .is_some_and(|r| r.state == Upstream::Live);
                if live {
                    self.serve(l, id, &stream);
                } else if !from_origin && n.origin {
                    let idx = self.keys.iter().position(|k| *k == stream).unwrap();
                    let until = self.now + PLAY_WAIT_MS;
                    self.play_wait(node, l, id, idx, until);
                } else {
                    self.refuse(l, id);
                }
            }
            SessionEvent::Unsubscribed(id) => {
                self.served.remove(&(l, id));
            }
            _ => {}
        }
    }

    /// A link closed (its peer died): the dialer forgets the peer's announces and re-homes
    /// the pulls that used it; the acceptor stops serving it.
    fn link_down(&mut self, l: usize) {
        let (dialer, _acceptor) = (self.links[l].dialer, self.links[l].acceptor);
        self.served.retain(|(sl, _), _| *sl != l);
        if !self.nodes[dialer].alive {
            return;
        }
        let peer = self.nodes[self.links[l].acceptor].id.clone();
        let n = &mut self.nodes[dialer];
        n.dir.drop_node(&peer);
        n.dir_changed = self.now;
        let lost: Vec<StreamKey> = n
            .relays
            .iter()
            .filter(|(_, r)| r.upstream.is_some_and(|(ul, _)| ul == l))
            .map(|(k, _)| k.clone())
            .collect();
        let now = self.t0 + Duration::from_millis(self.now);
        for key in &lost {
            let r = n.relays.get_mut(key).unwrap();
            r.upstream = None;
            r.rehome.upstream_lost(now);
        }
        for key in lost {
            let idx = self.keys.iter().position(|k| *k == key).unwrap();
            self.push(
                self.now,
                Ev::Retry {
                    node: dialer,
                    stream: idx,
                },
            );
        }
    }

    /// Copies of each stream over origin-origin links and origin-edge links.
    fn copies(&self) -> (HashMap<StreamKey, usize>, HashMap<StreamKey, usize>) {
        let (mut mesh, mut edge) = (HashMap::new(), HashMap::new());
        for ((l, _), key) in &self.served {
            let to_origin = self.nodes[self.links[*l].dialer].origin;
            let m = if to_origin { &mut mesh } else { &mut edge };
            *m.entry(key.clone()).or_insert(0) += 1;
        }
        (mesh, edge)
    }
}

impl Node {
    fn new(id: String, origin: bool, region: usize) -> Node {
        let role = if origin { Role::Origin } else { Role::Edge };
        Node {
            id,
            origin,
            region,
            alive: true,
            selection: PullSelection::new(role, Duration::from_millis(RETURN_AFTER_MS)),
            dir: Directory::default(),
            local: HashMap::new(),
            relays: HashMap::new(),
            dials: Vec::new(),
            dir_changed: 0,
        }
    }
}

#[test]
fn a_simulated_cluster_of_20_origins_200_edges_and_1000_streams_stays_within_its_bounds() {
    let mut sim = Sim::build();
    let mut rng = Lcg(42);
    sim.run_until(1_000);
    let handshake = sim.counts.clone();
    assert_eq!(
        handshake.get("Hello") as usize,
        sim.links.len(),
        "every link said hello"
    );

    // 1000 streams start on random origins over 10 s.
    let publisher_of: Vec<usize> = (0..STREAMS).map(|_| rng.next(ORIGINS)).collect();
    for (s, &o) in publisher_of.iter().enumerate() {
        sim.push(
            1_000 + (s as u64 * 10),
            Ev::Publish {
                stream: s,
                origin: o,
            },
        );
    }
    sim.run_until(12_000);
    let starts = sim.counts.total() - handshake.total();
    let per_start = starts as f64 / STREAMS as f64;
    // Control messages per stream start: one announce to each other origin, nothing else.
    assert_eq!(per_start, (ORIGINS - 1) as f64);
    for n in sim.nodes.iter().filter(|n| n.origin) {
        for (s, &o) in publisher_of.iter().enumerate() {
            let owner = n.dir.owner(&sim.keys[s]).map(|x| x.node.clone());
            let expected = (sim.nodes[o].id != n.id).then(|| sim.nodes[o].id.clone());
            assert_eq!(owner, expected, "{} knows who publishes s{s}", n.id);
        }
    }

    // 5000 viewer joins on random edges, popular streams first (a Zipf-like skew).
    let before = sim.counts.clone();
    let mut watched: HashSet<(usize, usize)> = HashSet::new();
    for j in 0..VIEWER_JOINS {
        let edge = ORIGINS + rng.next(ORIGINS * EDGES_PER_ORIGIN);
        let popular = rng.next(STREAMS) + 1;
        let stream = rng.next(popular);
        watched.insert((edge, stream));
        sim.push(12_000 + j as u64 * 2, Ev::Join { edge, stream });
    }
    sim.run_until(30_000);
    let joins = sim.counts.total() - before.total();
    let (mesh, edge) = sim.copies();
    let max_mesh = mesh.values().copied().max().unwrap_or(0);
    let streams_watched: HashSet<usize> = watched.iter().map(|(_, s)| *s).collect();
    // Each origin pulls a stream at most once, so a stream crosses the mesh at most once
    // per origin (19 copies at most), whatever the number of edges and viewers.
    assert!(
        max_mesh < ORIGINS,
        "a stream crossed the mesh {max_mesh} times"
    );
    for n in sim.nodes.iter().filter(|n| n.origin) {
        for key in n.relays.keys() {
            let pulls = sim
                .served
                .iter()
                .filter(|((l, _), k)| *k == key && sim.nodes[sim.links[*l].dialer].id == n.id)
                .count();
            assert!(pulls <= 1, "{} pulls {key} {pulls} times", n.id);
        }
    }
    // Edges: one copy per (edge, stream) watched, whatever the viewers behind it.
    assert_eq!(edge.values().sum::<usize>(), watched.len());
    // Per (edge, stream) pulled: Subscribe + SubscribeOk, plus the same once per origin
    // that had to pull it from the publisher's origin.
    let mesh_pulls: usize = mesh.values().sum();
    assert_eq!(joins as usize, 2 * (watched.len() + mesh_pulls));
    assert_eq!(sim.failed_pulls, 0);

    // Origin 0 dies. Its publishers move to the next origin of its region after 1 s; its
    // edges re-home to their second origin.
    let before = sim.counts.clone();
    let dead = 0;
    let killed_at = 31_000;
    sim.push(killed_at, Ev::Kill { node: dead });
    let moved: Vec<usize> = (0..STREAMS).filter(|&s| publisher_of[s] == dead).collect();
    let new_home = REGIONS; // Same region as origin 0.
    for &s in &moved {
        sim.push(
            killed_at + REPUBLISH_MS,
            Ev::Publish {
                stream: s,
                origin: new_home,
            },
        );
    }
    sim.run_until(killed_at + REHOME_WINDOW_MS + 2_000);
    let failover = sim.counts.total() - before.total();
    // The directory converged: every live origin names the live publisher of every stream.
    let mut converged_at = 0;
    for n in sim.nodes.iter().filter(|n| n.origin && n.alive) {
        for (s, &first) in publisher_of.iter().enumerate() {
            let publisher = if first == dead { new_home } else { first };
            let owner = n.dir.owner(&sim.keys[s]).map(|x| x.node.clone());
            let expected =
                (sim.nodes[publisher].id != n.id).then(|| sim.nodes[publisher].id.clone());
            assert_eq!(owner, expected, "{} after the loss, s{s}", n.id);
        }
        converged_at = converged_at.max(n.dir_changed);
    }
    // Every pull is live again, none through the dead origin.
    let mut stuck = 0;
    for n in sim.nodes.iter().filter(|n| n.alive) {
        for (key, r) in &n.relays {
            let through_dead = r
                .upstream
                .is_some_and(|(l, _)| sim.links[l].acceptor == dead);
            let fed = r.upstream.is_some() || n.local.contains_key(key);
            if r.state != Upstream::Live || through_dead || !fed {
                stuck += 1;
            }
        }
    }
    assert_eq!(stuck, 0, "pulls left without a live upstream");
    let (mesh_after, _) = sim.copies();
    assert!(mesh_after.values().all(|&c| c < ORIGINS));

    let report = format!(
        "simulation: {ORIGINS} origins in {REGIONS} regions, {} edges, {} links, {STREAMS} \
         streams, {VIEWER_JOINS} viewer joins on {} (edge, stream) pairs of {} streams\n\
         handshake: {} messages\n\
         stream starts: {per_start} control messages per start ({} bytes on average)\n\
         joins: {joins} messages = 2 per edge pull ({}) + 2 per origin pull ({mesh_pulls}); \
         most copies of one stream over the mesh: {max_mesh} (bound {})\n\
         origin loss ({} streams republished on {}): {failover} messages; every directory \
         converged {} ms after the kill (dead links closed at {LINK_TIMEOUT_MS} ms, \
         publishers back at {REPUBLISH_MS} ms, plus the farthest one-way delay), all pulls \
         live again; messages by type: {:?}",
        ORIGINS * EDGES_PER_ORIGIN,
        sim.links.len(),
        watched.len(),
        streams_watched.len(),
        handshake.total(),
        (sim.counts.bytes as f64 / sim.counts.total() as f64).round(),
        watched.len(),
        ORIGINS - 1,
        moved.len(),
        sim.nodes[new_home].id,
        converged_at - killed_at,
        diff(&sim.counts, &before),
    );
    eprintln!("{report}");
    // Convergence is bounded by detection + the publisher's reconnect + the farthest
    // one-way delay (80 ms here).
    assert!(converged_at - killed_at <= LINK_TIMEOUT_MS.max(REPUBLISH_MS) + 100);
}

fn diff(after: &Counts, before: &Counts) -> BTreeMap<&'static str, u64> {
    after
        .messages
        .iter()
        .map(|(k, v)| (*k, v - before.get(k)))
        .filter(|(_, v)| *v > 0)
        .collect()
}
