//! What the cluster knows of its nodes, and where to send a client (the route API).
//!
//! Every node sends a [`NodeRecord`] of itself on each of its links every second. An
//! origin passes on, on the links its peers dialed, the records it heard directly to its
//! origin peers and everything it knows to its edges; edges pass nothing on. So every node
//! learns every other within two hops, nothing loops, and a record's age travels with it: a
//! dead node's record expires [`RECORD_TTL`] after it was made, wherever it is held.
//!
//! Who may say what (the session enforces it, `docs/cluster.md` explains it): a node takes
//! records about third nodes only over links it dialed itself, to an address in its own
//! config; over a link a peer dialed, only that peer's own record. Every record held is
//! tied to the link it came over ([`NodeTable::forget_link`] drops them when it closes), so
//! the route API only ever names this node or nodes vouched for over live, authenticated
//! links.
//!
//! Routing ([`rank`]) is a pure function of the records: nearest region first (region
//! distances are the measured RTTs of the links between regions, not configuration), then
//! lower load, then a node that already has the stream, then a hash of stream and node so
//! that streams spread and each sticks to its node. Sans-IO: time comes in as `now`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::wire::{NodeRecord, PeerRole};
use crate::media::StreamKey;

/// A record older than this is ignored (its node is presumed gone).
pub const RECORD_TTL: Duration = Duration::from_secs(3);
/// How often a node sends its record.
pub const NODE_STATE_INTERVAL: Duration = Duration::from_secs(1);
/// Nodes this loaded (per mille) take no new clients.
const FULL_PERMILLE: u16 = 950;
/// Distance given to a region no link measures.
const UNKNOWN_MS: f64 = 1.0e6;

struct Entry {
    record: NodeRecord,
    /// When its node made it.
    made: Instant,
    /// Heard from its own node, not passed on.
    direct: bool,
    /// The link it came over (a connection's stable id).
    via: usize,
}

pub struct NodeTable {
    me: String,
    entries: HashMap<String, Entry>,
}

impl NodeTable {
    pub fn new(me: &str) -> NodeTable {
        NodeTable {
            me: me.to_string(),
            entries: HashMap::new(),
        }
    }

    /// Takes the records a peer (`from`) sent over link `via`. A newer incarnation of a node
    /// replaces the old at once; otherwise the most recently made record wins.
    pub fn update(&mut self, records: Vec<NodeRecord>, from: &str, via: usize, now: Instant) {
        for record in records {
            if record.node == self.me {
                continue;
            }
            let made = now
                .checked_sub(Duration::from_millis(record.age_ms as u64))
                .unwrap_or(now);
            let newer = match self.entries.get(&record.node) {
                None => true,
                Some(e) => {
                    record.incarnation > e.record.incarnation
                        || (record.incarnation == e.record.incarnation && made > e.made)
                }
            };
            if newer {
                let direct = record.node == from;
                self.entries.insert(
                    record.node.clone(),
                    Entry {
                        record,
                        made,
                        direct,
                        via,
                    },
                );
            }
        }
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.made) < RECORD_TTL);
    }

    /// Link `via` closed: what was heard over it is no longer vouched for. (A node also heard
    /// over another link comes back with its next record, within a second.)
    pub fn forget_link(&mut self, via: usize) {
        self.entries.retain(|_, e| e.via != via);
    }

    /// Live records, with their age.
    pub fn fresh(&self, now: Instant) -> Vec<NodeRecord> {
        self.entries
            .values()
            .filter(|e| now.saturating_duration_since(e.made) < RECORD_TTL)
            .map(|e| {
                let mut r = e.record.clone();
                r.age_ms = now.saturating_duration_since(e.made).as_millis() as u32;
                r
            })
            .collect()
    }

    /// What to pass on: to an origin, records heard directly; to an edge, all.
    pub fn to_pass_on(&self, to: PeerRole, now: Instant) -> Vec<NodeRecord> {
        let direct_only = to.is_origin();
        let mut out: Vec<NodeRecord> = self
            .entries
            .iter()
            .filter(|(_, e)| e.direct || !direct_only)
            .filter(|(_, e)| now.saturating_duration_since(e.made) < RECORD_TTL)
            .map(|(_, e)| {
                let mut r = e.record.clone();
                r.age_ms = now.saturating_duration_since(e.made).as_millis() as u32;
                r
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

/// Stream-name bytes one node-state message may carry (its records' `streams` lists).
pub const STATE_STREAM_BYTES: usize = 256 << 10;

/// Keeps a node-state message small whatever the cluster's size: once the records' stream
/// lists pass `budget` bytes of names, the remaining records (the sender's own record comes
/// first and is kept whole if it fits) go without theirs. Those lists only decide "warm"
/// in [`rank`], the last tie-break before the hash, so a large cluster loses a preference,
/// never a route. Returns how many records lost their list.
pub fn fit_streams(records: &mut [NodeRecord], budget: usize) -> usize {
    let mut used = 0;
    let mut dropped = 0;
    for r in records.iter_mut() {
        let bytes: usize = r
            .streams
            .iter()
            .map(|k| k.namespace().len() + k.name().len() + 4)
            .sum();
        if used + bytes <= budget {
            used += bytes;
        } else if !r.streams.is_empty() {
            r.streams = Vec::new();
            dropped += 1;
        }
    }
    dropped
}

/// Play (WHEP, FLV, RTMP play) or publish (WHIP, RTMP publish).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Play,
    Publish,
}

/// One place to send the client, best first in [`rank`]'s answer.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub node: String,
    pub role: PeerRole,
    pub region: String,
    pub http_url: String,
    pub rtmp_url: String,
    /// Measured RTT between the client's region and the node's (0: same region).
    pub dist_ms: f64,
    pub load: f64,
    /// It already has the stream.
    pub warm: bool,
}

/// Median RTT (ms) between each pair of regions, from the links in the records.
pub fn region_rtts(records: &[NodeRecord]) -> HashMap<(String, String), f64> {
    let region_of: HashMap<&str, &str> = records
        .iter()
        .map(|r| (r.node.as_str(), r.region.as_str()))
        .collect();
    let mut samples: HashMap<(String, String), Vec<f64>> = HashMap::new();
    for r in records {
        for (peer, rtt_us) in &r.links {
            let Some(peer_region) = region_of.get(peer.as_str()) else {
                continue;
            };
            if *peer_region == r.region {
                continue;
            }
            samples
                .entry(region_pair(&r.region, peer_region))
                .or_default()
                .push(*rtt_us as f64 / 1000.0);
        }
    }
    samples
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            (k, v[v.len() / 2])
        })
        .collect()
}

fn region_pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// Where a client in `region` should go to `action` `stream`, best first. Players go to
/// edges (or standalone nodes) when there are any, else origins; publishers to origins.
pub fn rank(
    records: &[NodeRecord],
    stream: &StreamKey,
    region: &str,
    action: Action,
) -> Vec<Choice> {
    let rtts = region_rtts(records);
    let serves = |r: &NodeRecord, roles: &[PeerRole]| {
        roles.contains(&r.role) && r.load_permille < FULL_PERMILLE && !r.http_url.is_empty()
    };
    let roles: &[PeerRole] = match action {
        Action::Play
            if records
                .iter()
                .any(|r| serves(r, &[PeerRole::Edge, PeerRole::Standalone])) =>
        {
            &[PeerRole::Edge, PeerRole::Standalone]
        }
        _ => &[PeerRole::Origin, PeerRole::Standalone],
    };
    let name = stream.to_string();
    let mut out: Vec<(Choice, u64)> = records
        .iter()
        .filter(|r| serves(r, roles))
        .map(|r| {
            let dist_ms = if r.region == region {
                0.0
            } else {
                rtts.get(&region_pair(region, &r.region))
                    .copied()
                    .unwrap_or(UNKNOWN_MS)
            };
            let choice = Choice {
                node: r.node.clone(),
                role: r.role,
                region: r.region.clone(),
                http_url: r.http_url.clone(),
                rtmp_url: r.rtmp_url.clone(),
                dist_ms,
                load: r.load_permille as f64 / 1000.0,
                warm: r.streams.contains(stream),
            };
            (choice, fnv1a(&[name.as_bytes(), b"\0", r.node.as_bytes()]))
        })
        .collect();
    out.sort_by(|(a, ha), (b, hb)| {
        a.dist_ms
            .total_cmp(&b.dist_ms)
            // Loads within 0.1 of each other count as equal (no flapping on noise).
            .then((a.load * 10.0).round().total_cmp(&(b.load * 10.0).round()))
            .then(b.warm.cmp(&a.warm))
            .then(hb.cmp(ha))
    });
    out.into_iter().map(|(c, _)| c).collect()
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, role: PeerRole, region: &str) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            role,
            region: region.into(),
            http_url: format!("http://{node}"),
            rtmp_url: format!("rtmp://{node}"),
            incarnation: 1,
            age_ms: 0,
            viewers: 0,
            load_permille: 0,
            egress: 0,
            out_bps: 0,
            links: vec![],
            streams: vec![],
            pulls: vec![],
        }
    }

    fn key() -> StreamKey {
        StreamKey::new("live", "x").unwrap()
    }

    /// Origins us, eu, ap with measured RTTs us-eu 60, us-ap 150, eu-ap 120 ms.
    fn world() -> Vec<NodeRecord> {
        let mut us = rec("origin-us", PeerRole::Origin, "us");
        us.links = vec![("origin-eu".into(), 60_000), ("origin-ap".into(), 150_000)];
        let mut eu = rec("origin-eu", PeerRole::Origin, "eu");
        eu.links = vec![("origin-us".into(), 62_000), ("origin-ap".into(), 120_000)];
        let ap = rec("origin-ap", PeerRole::Origin, "ap");
        vec![us, eu, ap]
    }

    fn names(c: &[Choice]) -> Vec<&str> {
        c.iter().map(|c| c.node.as_str()).collect()
    }

    #[test]
    fn node_state_stream_lists_stay_within_their_budget() {
        let many = |n: usize| -> Vec<StreamKey> {
            (0..n)
                .map(|i| StreamKey::new("live", &format!("s{i:04}")).unwrap())
                .collect()
        };
        let mut records: Vec<NodeRecord> = (0..5)
            .map(|i| {
                let mut r = rec(&format!("n{i}"), PeerRole::Edge, "us");
                r.streams = many(100);
                r
            })
            .collect();
        // Each list is 100 * (4 + 5 + 4) = 1300 bytes: three fit in 4000.
        assert_eq!(fit_streams(&mut records, 4000), 2);
        let kept: Vec<usize> = records.iter().map(|r| r.streams.len()).collect();
        assert_eq!(kept, vec![100, 100, 100, 0, 0]);
        assert_eq!(fit_streams(&mut records, 4000), 0, "already fits");
    }

    #[test]
    fn region_distances_are_the_median_measured_rtt() {
        let rtts = region_rtts(&world());
        assert_eq!(rtts[&region_pair("us", "eu")], 62.0);
        assert_eq!(rtts[&region_pair("ap", "us")], 150.0);
    }

    #[test]
    fn players_go_to_the_nearest_edge_then_the_least_loaded_then_a_warm_one() {
        let mut w = world();
        let mut us1 = rec("edge-us1", PeerRole::Edge, "us");
        let us2 = rec("edge-us2", PeerRole::Edge, "us");
        let eu1 = rec("edge-eu1", PeerRole::Edge, "eu");
        let ap1 = rec("edge-ap1", PeerRole::Edge, "ap");
        us1.load_permille = 500;
        w.extend([us1.clone(), us2.clone(), eu1, ap1]);
        let r = rank(&w, &key(), "us", Action::Play);
        assert_eq!(names(&r), ["edge-us2", "edge-us1", "edge-eu1", "edge-ap1"]);
        assert_eq!(r[2].dist_ms, 62.0);
        // Equal load: the one that has the stream first.
        let mut w2 = world();
        let mut warm = us2.clone();
        warm.streams = vec![key()];
        us1.load_permille = 20;
        w2.extend([us1, warm]);
        assert_eq!(names(&rank(&w2, &key(), "us", Action::Play))[0], "edge-us2");
        // No edge in us: the nearest region by RTT (eu at 62 ms before ap at 150).
        let mut w3 = world();
        w3.extend([
            rec("edge-ap1", PeerRole::Edge, "ap"),
            rec("edge-eu1", PeerRole::Edge, "eu"),
        ]);
        assert_eq!(
            names(&rank(&w3, &key(), "us", Action::Play)),
            ["edge-eu1", "edge-ap1"]
        );
    }

    #[test]
    fn publishers_go_to_origins_and_full_or_unknown_nodes_come_last_or_not_at_all() {
        let mut w = world();
        w.push(rec("edge-us1", PeerRole::Edge, "us"));
        w[0].load_permille = 990;
        let r = rank(&w, &key(), "us", Action::Publish);
        assert_eq!(
            names(&r),
            ["origin-eu", "origin-ap"],
            "full origin-us is skipped"
        );
        // Without edges, players go to origins.
        let r = rank(&world(), &key(), "mars", Action::Play);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|c| c.dist_ms == UNKNOWN_MS));
    }

    #[test]
    fn streams_spread_over_equal_nodes_and_each_sticks_to_one() {
        let mut w = world();
        w.extend((0..4).map(|i| rec(&format!("edge-us{i}"), PeerRole::Edge, "us")));
        let first = |n: usize| {
            let k = StreamKey::new("live", &format!("s{n}")).unwrap();
            rank(&w, &k, "us", Action::Play)[0].node.clone()
        };
        let picks: std::collections::HashSet<String> = (0..40).map(first).collect();
        assert!(picks.len() >= 3, "{picks:?}");
        assert_eq!(first(7), first(7));
    }

    #[test]
    fn records_age_and_a_restarted_node_replaces_its_old_record() {
        let t0 = Instant::now();
        let mut table = NodeTable::new("origin-us");
        let mut edge = rec("edge-eu1", PeerRole::Edge, "eu");
        edge.age_ms = 500;
        table.update(
            vec![rec("origin-eu", PeerRole::Origin, "eu"), edge.clone()],
            "origin-eu",
            1,
            t0,
        );
        assert_eq!(table.fresh(t0).len(), 2);
        // Passed on to origins: only what came directly; to edges: everything.
        assert_eq!(
            names_of(&table.to_pass_on(PeerRole::Origin, t0)),
            ["origin-eu"]
        );
        assert_eq!(table.to_pass_on(PeerRole::Edge, t0).len(), 2);
        // The relayed record expires by its own age.
        let later = t0 + RECORD_TTL - Duration::from_millis(400);
        assert_eq!(names_of(&table.fresh(later)), ["origin-eu"]);
        // A new incarnation wins even when older-looking.
        let mut reborn = rec("origin-eu", PeerRole::Origin, "eu");
        reborn.incarnation = 2;
        reborn.age_ms = 900;
        table.update(vec![reborn], "origin-eu", 1, t0);
        assert_eq!(
            table
                .fresh(t0)
                .iter()
                .find(|r| r.node == "origin-eu")
                .unwrap()
                .incarnation,
            2
        );
        // Our own record coming back is ignored.
        table.update(
            vec![rec("origin-us", PeerRole::Origin, "us")],
            "origin-eu",
            1,
            t0,
        );
        assert!(table.fresh(t0).iter().all(|r| r.node != "origin-us"));
    }

    #[test]
    fn records_leave_with_the_link_they_came_over() {
        let t0 = Instant::now();
        let mut table = NodeTable::new("edge-1");
        let origin = rec("origin-a", PeerRole::Origin, "eu");
        let relayed = rec("edge-2", PeerRole::Edge, "eu");
        table.update(vec![origin.clone(), relayed], "origin-a", 7, t0);
        table.update(
            vec![rec("origin-b", PeerRole::Origin, "us")],
            "origin-b",
            8,
            t0,
        );
        table.forget_link(7);
        assert_eq!(names_of(&table.fresh(t0)), ["origin-b"]);
        // Heard again (over another link): back at once.
        table.update(vec![origin], "origin-a", 9, t0);
        assert_eq!(names_of(&table.fresh(t0)), ["origin-a", "origin-b"]);
    }

    fn names_of(r: &[NodeRecord]) -> Vec<&str> {
        let mut v: Vec<&str> = r.iter().map(|r| r.node.as_str()).collect();
        v.sort();
        v
    }
}
