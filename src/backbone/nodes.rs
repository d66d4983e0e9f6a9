//! What the cluster knows of its nodes: the gossip of node records.
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
//! Routing on these records (`cluster::route`) sits above the backbone. Sans-IO: time
//! comes in as `now`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::wire::NodeRecord;
use crate::config::Role;

/// A record older than this is ignored (its node is presumed gone).
pub const RECORD_TTL: Duration = Duration::from_secs(3);
/// How often a node sends its record.
pub const NODE_STATE_INTERVAL: Duration = Duration::from_secs(1);

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
    pub fn to_pass_on(&self, to: Role, now: Instant) -> Vec<NodeRecord> {
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
/// in `cluster::route::rank`, the last tie-break before the hash, so a large cluster loses a preference,
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

/// A record with no load, links or streams, for tests.
#[cfg(test)]
pub(crate) fn test_record(node: &str, role: Role, region: &str) -> NodeRecord {
    NodeRecord::idle(
        node,
        role,
        region,
        &format!("http://{node}"),
        &format!("rtmp://{node}"),
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::StreamKey;

    fn rec(node: &str, role: Role, region: &str) -> NodeRecord {
        test_record(node, role, region)
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
                let mut r = rec(&format!("n{i}"), Role::Edge, "us");
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
    fn records_age_and_a_restarted_node_replaces_its_old_record() {
        let t0 = Instant::now();
        let mut table = NodeTable::new("origin-us");
        let mut edge = rec("edge-eu1", Role::Edge, "eu");
        edge.age_ms = 500;
        table.update(
            vec![rec("origin-eu", Role::Origin, "eu"), edge.clone()],
            "origin-eu",
            1,
            t0,
        );
        assert_eq!(table.fresh(t0).len(), 2);
        // Passed on to origins: only what came directly; to edges: everything.
        assert_eq!(names_of(&table.to_pass_on(Role::Origin, t0)), ["origin-eu"]);
        assert_eq!(table.to_pass_on(Role::Edge, t0).len(), 2);
        // The relayed record expires by its own age.
        let later = t0 + RECORD_TTL - Duration::from_millis(400);
        assert_eq!(names_of(&table.fresh(later)), ["origin-eu"]);
        // A new incarnation wins even when older-looking.
        let mut reborn = rec("origin-eu", Role::Origin, "eu");
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
            vec![rec("origin-us", Role::Origin, "us")],
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
        let origin = rec("origin-a", Role::Origin, "eu");
        let relayed = rec("edge-2", Role::Edge, "eu");
        table.update(vec![origin.clone(), relayed], "origin-a", 7, t0);
        table.update(vec![rec("origin-b", Role::Origin, "us")], "origin-b", 8, t0);
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
