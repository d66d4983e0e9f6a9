//! This node's record and the gossip of node records.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use super::nodes::{self, NODE_STATE_INTERVAL};
use super::session::PeerInfo;
use super::wire::{self, NodeRecord, PeerRole};
use super::Backbone;

impl Backbone {
    /// Records the session let through (see `session` for whose records each side takes).
    pub(super) fn on_node_state(&self, peer: &PeerInfo, link_id: usize, records: Vec<NodeRecord>) {
        self.nodes
            .lock()
            .update(records, &peer.node_id, link_id, Instant::now());
    }

    /// The node records to send to a peer of `role`: this node's, then (origins only, and
    /// only on links the peer dialed: `pass_on`) what it passes on
    /// ([`NodeTable::to_pass_on`]).
    pub(super) fn records_for(&self, role: PeerRole, pass_on: bool) -> Vec<NodeRecord> {
        let mut out = vec![self.me_record.lock().clone()];
        if pass_on && self.local.role.is_origin() {
            out.extend(self.nodes.lock().to_pass_on(role, Instant::now()));
        }
        let dropped = nodes::fit_streams(&mut out, nodes::STATE_STREAM_BYTES);
        if dropped > 0 {
            debug!(dropped, "node state: stream lists over budget left out");
        }
        out
    }

    /// Every live node record this node knows, its own included.
    pub fn node_records(&self) -> Vec<NodeRecord> {
        let mut out = vec![self.me_record.lock().clone()];
        out.extend(self.nodes.lock().fresh(Instant::now()));
        out
    }

    /// Refreshes this node's own record every [`NODE_STATE_INTERVAL`]: viewers, load
    /// (viewers against `node.max_viewers`, and CPU), measured link RTTs, streams held.
    pub(super) async fn state_loop(self: Arc<Self>) {
        let mut cpu = CpuSampler::new();
        let mut sent = (self.hub.metrics().bytes_out_total(), Instant::now());
        let mut tick = tokio::time::interval(NODE_STATE_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let streams = self.hub.list();
            let attached: i64 = streams.iter().map(|s| s.subscribers as i64).sum();
            let relays = self
                .hub
                .metrics()
                .viewers_of(crate::metrics::Proto::Backbone);
            let viewers = (attached - relays).max(0) as u32;
            let by_viewers = (viewers as f64 / self.max_viewers as f64).min(1.0);
            let load = by_viewers.max(cpu.sample());
            let mut links: Vec<(String, u32)> = self
                .links()
                .into_iter()
                .map(|l| (l.node, (l.rtt_ms * 1000.0) as u32))
                .collect();
            links.sort();
            links.dedup_by(|a, b| a.0 == b.0);
            let metrics = self.hub.metrics();
            let now = (metrics.bytes_out_total(), Instant::now());
            let secs = now.1.duration_since(sent.1).as_secs_f64().max(1e-3);
            let out_bps = (now.0.saturating_sub(sent.0) as f64 * 8.0 / secs) as u64;
            sent = now;
            let mut pulls: HashMap<String, u32> = HashMap::new();
            for s in &streams {
                if let crate::hub::Source::Relay { node } = &s.source {
                    *pulls.entry(node.clone()).or_default() += 1;
                }
            }
            let mut pulls: Vec<(String, u32)> = pulls.into_iter().collect();
            pulls.sort();
            let mut me = self.me_record.lock();
            me.viewers = viewers;
            me.egress = metrics.egress_active.get().max(0) as u32;
            me.out_bps = out_bps;
            me.pulls = pulls;
            me.load_permille = (load * 1000.0).round() as u16;
            me.links = links;
            me.streams = streams
                .into_iter()
                // Derived streams (audio bridges) are local views, not names on the wire.
                .filter(|s| !matches!(s.source, crate::hub::Source::Bridge { .. }))
                .map(|s| s.stream)
                .take(wire::MAX_RECORD_ITEMS)
                .collect();
        }
    }
}

/// This process's CPU use, 0-1 of all cores, from `/proc/self/stat` between samples.
pub(super) struct CpuSampler {
    pub(super) last: Option<(u64, Instant)>,
    pub(super) cores: f64,
}

impl CpuSampler {
    pub(super) fn new() -> CpuSampler {
        CpuSampler {
            last: None,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        }
    }

    pub(super) fn sample(&mut self) -> f64 {
        let Some(ticks) = process_cpu_ticks() else {
            return 0.0;
        };
        let now = Instant::now();
        let used = match self.last {
            Some((t, at)) => {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                // Linux counts CPU time in USER_HZ ticks, 100 per second.
                ticks.saturating_sub(t) as f64 / 100.0 / secs / self.cores
            }
            None => 0.0,
        };
        self.last = Some((ticks, now));
        used.clamp(0.0, 1.0)
    }
}

/// utime + stime of this process, in clock ticks.
pub(super) fn process_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}
