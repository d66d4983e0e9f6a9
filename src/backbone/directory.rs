//! The stream directory: which origins announce each stream.
//!
//! Every origin announces its local streams to every other origin (full mesh, one hop), so
//! each node learns the directory from the announces it holds; there is no central store.
//! A name normally has one announcer. When two origins both announce one name (publishers
//! raced, or a partition healed) every node keeps both and serves the one that ranks first
//! ([`Announcement::rank`]); the other origin evicts its publisher and withdraws. Keeping
//! both means that when the first one's node dies, the other takes over at once.
//!
//! Sans-IO: the backbone feeds it link events.

use std::collections::HashMap;

use super::wire::Announcement;
use crate::media::StreamKey;

/// One origin's announce of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub announcement: Announcement,
}

impl Owner {
    pub fn rank(&self) -> (u64, &str) {
        self.announcement.rank(&self.node)
    }
}

#[derive(Debug, Default)]
pub struct Directory {
    streams: HashMap<StreamKey, Vec<Owner>>,
}

impl Directory {
    /// Records `node`'s announce (replacing its earlier one of the same stream).
    pub fn announce(&mut self, node: &str, announcement: Announcement) {
        let owners = self.streams.entry(announcement.stream.clone()).or_default();
        owners.retain(|o| o.node != node);
        owners.push(Owner {
            node: node.to_string(),
            announcement,
        });
    }

    /// `node` no longer publishes `stream`.
    pub fn withdraw(&mut self, node: &str, stream: &StreamKey) {
        if let Some(owners) = self.streams.get_mut(stream) {
            owners.retain(|o| o.node != node);
            if owners.is_empty() {
                self.streams.remove(stream);
            }
        }
    }

    /// Forgets every announce of `node` (its link closed).
    pub fn drop_node(&mut self, node: &str) {
        self.streams.retain(|_, owners| {
            owners.retain(|o| o.node != node);
            !owners.is_empty()
        });
    }

    /// The origin that holds `stream`: the best-ranked announcer.
    pub fn owner(&self, stream: &StreamKey) -> Option<&Owner> {
        self.streams
            .get(stream)?
            .iter()
            .min_by(|a, b| a.rank().cmp(&b.rank()))
    }

    /// Every stream with its owner, by name.
    pub fn list(&self) -> Vec<(StreamKey, String)> {
        let mut out: Vec<(StreamKey, String)> = self
            .streams
            .keys()
            .filter_map(|k| Some((k.clone(), self.owner(k)?.node.clone())))
            .collect();
        out.sort_by_key(|(k, _)| k.to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StreamKey {
        StreamKey::new("live", "x").unwrap()
    }

    fn at(started_ms: u64) -> Announcement {
        Announcement {
            stream: key(),
            timeline: started_ms,
            started_ms,
        }
    }

    #[test]
    fn the_earlier_publish_owns_the_name_whatever_the_order_announces_arrive_in() {
        for order in [[0, 1], [1, 0]] {
            let mut d = Directory::default();
            let announces = [("origin-b", at(100)), ("origin-a", at(105))];
            for i in order {
                d.announce(announces[i].0, announces[i].1.clone());
            }
            assert_eq!(d.owner(&key()).unwrap().node, "origin-b");
        }
        // Same start: the lower node id.
        let mut d = Directory::default();
        d.announce("origin-b", at(100));
        d.announce("origin-a", at(100));
        assert_eq!(d.owner(&key()).unwrap().node, "origin-a");
    }

    #[test]
    fn the_loser_withdrawing_keeps_the_winner_and_the_winner_dying_promotes_the_other() {
        let mut d = Directory::default();
        d.announce("origin-a", at(100));
        d.announce("origin-c", at(200));
        d.withdraw("origin-c", &key());
        assert_eq!(d.owner(&key()).unwrap().node, "origin-a");
        // A republish elsewhere while A's link has not timed out yet: C takes over when
        // A's link closes.
        d.announce("origin-c", at(300));
        assert_eq!(d.owner(&key()).unwrap().node, "origin-a");
        d.drop_node("origin-a");
        assert_eq!(d.owner(&key()).unwrap().node, "origin-c");
        assert_eq!(d.list(), vec![(key(), "origin-c".to_string())]);
        d.drop_node("origin-c");
        assert!(d.owner(&key()).is_none() && d.list().is_empty());
    }

    #[test]
    fn a_new_announce_from_the_same_node_replaces_its_old_one() {
        let mut d = Directory::default();
        d.announce("origin-a", at(100));
        d.announce("origin-b", at(150));
        d.announce("origin-a", at(200));
        assert_eq!(d.owner(&key()).unwrap().node, "origin-b");
    }
}
