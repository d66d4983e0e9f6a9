//! Where to send a client (the route API, redirects, edge publish forwarding): a pure
//! function of the node records the backbone gossips (`backbone::nodes`).
//!
//! [`rank`]: nearest region first (region distances are the measured RTTs of the links
//! between regions, not configuration), then lower load, then a node that already has the
//! stream, then a hash of stream and node so that streams spread and each sticks to its
//! node. [`route`] adds the client's region: a region no node is in counts as this node's.

use std::collections::HashMap;

use serde::Serialize;

use crate::backbone::wire::NodeRecord;
use crate::config::Role;
use crate::media::StreamKey;

/// Nodes this loaded (per mille) take no new clients.
const FULL_PERMILLE: u16 = 950;
/// Distance given to a region no link measures.
const UNKNOWN_MS: f64 = 1.0e6;

/// Whether a node in `role` takes WebRTC publishers itself. Edges hold no publishes of
/// their own in the mesh (only origins announce): an RTMP publish to an edge is forwarded
/// to an origin (`cluster::forward`), and a WHIP publish is sent to the best origin with a
/// 307, which its SDP offer follows.
pub fn takes_webrtc_publishers(role: Role) -> bool {
    role.is_origin()
}

/// Where a client of `client_region` should go to `action` `stream`, best first: [`rank`]
/// from the client's region if some node is in it, else from `own_region` (this node's).
pub fn route(
    records: &[NodeRecord],
    stream: &StreamKey,
    client_region: &str,
    own_region: &str,
    action: Action,
) -> Vec<Choice> {
    let region = if records.iter().any(|r| r.region == client_region) {
        client_region
    } else {
        own_region
    };
    rank(records, stream, region, action)
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
    pub role: Role,
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
        for (peer, rtt_us, _) in &r.links {
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
    let serves = |r: &NodeRecord, roles: &[Role]| {
        roles.contains(&r.role) && r.load_permille < FULL_PERMILLE && !r.http_url.is_empty()
    };
    let roles: &[Role] = match action {
        Action::Play
            if records
                .iter()
                .any(|r| serves(r, &[Role::Edge, Role::Standalone])) =>
        {
            &[Role::Edge, Role::Standalone]
        }
        _ => &[Role::Origin, Role::Standalone],
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
    use crate::backbone::nodes::test_record;

    fn rec(node: &str, role: Role, region: &str) -> NodeRecord {
        test_record(node, role, region)
    }

    fn key() -> StreamKey {
        StreamKey::new("live", "x").unwrap()
    }

    /// Origins us, eu, ap with measured RTTs us-eu 60, us-ap 150, eu-ap 120 ms.
    fn world() -> Vec<NodeRecord> {
        let mut us = rec("origin-us", Role::Origin, "us");
        us.links = vec![
            ("origin-eu".into(), 60_000, 0),
            ("origin-ap".into(), 150_000, 0),
        ];
        let mut eu = rec("origin-eu", Role::Origin, "eu");
        eu.links = vec![
            ("origin-us".into(), 62_000, 0),
            ("origin-ap".into(), 120_000, 0),
        ];
        let ap = rec("origin-ap", Role::Origin, "ap");
        vec![us, eu, ap]
    }

    fn names(c: &[Choice]) -> Vec<&str> {
        c.iter().map(|c| c.node.as_str()).collect()
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
        let mut us1 = rec("edge-us1", Role::Edge, "us");
        let us2 = rec("edge-us2", Role::Edge, "us");
        let eu1 = rec("edge-eu1", Role::Edge, "eu");
        let ap1 = rec("edge-ap1", Role::Edge, "ap");
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
            rec("edge-ap1", Role::Edge, "ap"),
            rec("edge-eu1", Role::Edge, "eu"),
        ]);
        assert_eq!(
            names(&rank(&w3, &key(), "us", Action::Play)),
            ["edge-eu1", "edge-ap1"]
        );
    }

    #[test]
    fn publishers_go_to_origins_and_full_or_unknown_nodes_come_last_or_not_at_all() {
        let mut w = world();
        w.push(rec("edge-us1", Role::Edge, "us"));
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
        w.extend((0..4).map(|i| rec(&format!("edge-us{i}"), Role::Edge, "us")));
        let first = |n: usize| {
            let k = StreamKey::new("live", &format!("s{n}")).unwrap();
            rank(&w, &k, "us", Action::Play)[0].node.clone()
        };
        let picks: std::collections::HashSet<String> = (0..40).map(first).collect();
        assert!(picks.len() >= 3, "{picks:?}");
        assert_eq!(first(7), first(7));
    }
}
