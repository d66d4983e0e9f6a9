//! Announces: what this node announces of its own streams, the directory updates from
//! other origins' announces, and the publish race they may start (decided in `race.rs`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::liveness::{Answer, AnswerWait};
use super::race::{self, Publish, Verdict};
use super::session::PeerInfo;
use super::wire::Announcement;
use super::Backbone;
use crate::media::StreamKey;

/// What one link has been told is published here (sans-IO), so that after missed hub
/// events ([`Self::resync`]) it can withdraw what ended meanwhile.
#[derive(Debug, Default)]
pub(super) struct AnnouncedSet(HashSet<StreamKey>);

impl AnnouncedSet {
    pub(super) fn announced(&mut self, key: &StreamKey) {
        self.0.insert(key.clone());
    }

    pub(super) fn withdrawn(&mut self, key: &StreamKey) {
        self.0.remove(key);
    }

    /// Events were missed: `now` is what is published now (all of it is announced again).
    /// Returns what was announced and has ended since, to withdraw.
    pub(super) fn resync(&mut self, now: &[Announcement]) -> Vec<StreamKey> {
        let current: HashSet<StreamKey> = now.iter().map(|a| a.stream.clone()).collect();
        let mut gone: Vec<StreamKey> = self.0.difference(&current).cloned().collect();
        gone.sort_by_key(|k| k.to_string());
        self.0 = current;
        gone
    }
}

/// How often a holder's link is looked at while waiting for it to answer.
const ANSWER_POLL: Duration = Duration::from_millis(25);

impl Backbone {
    /// Records an origin's announce, and settles a name published both here and there
    /// ([`race::settle`]): this node's publisher is evicted if it lost; if it won, its
    /// announce goes out again so the rival learns it lost.
    pub(super) fn on_announce(&self, peer: &PeerInfo, a: Announcement) {
        debug!(stream = %a.stream, timeline = a.timeline, "announced");
        let key = a.stream.clone();
        let started_ms = a.started_ms;
        self.directory.lock().announce(&peer.node_id, a);
        let Some(local) = self.hub.get(&key).filter(|s| s.is_local()) else {
            return;
        };
        let mine = Publish {
            started_ms: local.started_ms(),
            node: &self.local.node_id,
        };
        let theirs = Publish {
            started_ms,
            node: &peer.node_id,
        };
        match race::settle(&key, mine, theirs) {
            Verdict::EvictMine(reason) => {
                warn!("{reason}");
                self.hub.evict(&key, &reason);
            }
            Verdict::KeepMine => {
                info!(stream = %key, rival = %peer.node_id,
                    "{key} is also published on {}; this node's publish came first and keeps it",
                    peer.node_id);
                self.hub.reannounce(&key);
            }
        }
    }

    /// Whether the best-ranked announcer of `key` is alive: it answers within the link
    /// timeout (its QUIC keep-alives arrive several times a second). A node that just died
    /// still has its announces here until its link times out; a publisher that moved to
    /// another origin at once must not be refused for them.
    pub(super) async fn owner_alive(&self, key: &StreamKey) -> Option<String> {
        // An edge has no directory: a name it relays from a linked origin is taken.
        let relayed_from = self.hub.get(key).and_then(|s| match s.source() {
            crate::hub::Source::Relay { node } => Some(node),
            _ => None,
        });
        let owner = self.directory.lock().owner(key).map(|o| o.node.clone());
        let node = race::holder_to_check(self.role, relayed_from, owner)?;
        let conn = self
            .outbound
            .lock()
            .values()
            .find(|l| l.peer.node_id == node)
            .map(|l| l.conn.clone())?;
        let wait = AnswerWait::new(
            conn.stats().udp_rx.datagrams,
            Instant::now(),
            self.link_timeout,
        );
        loop {
            let datagrams = conn.stats().udp_rx.datagrams;
            match wait.observe(datagrams, conn.close_reason().is_some(), Instant::now()) {
                Answer::Alive => return Some(node),
                Answer::Gone => return None,
                Answer::Waiting => tokio::time::sleep(ANSWER_POLL).await,
            }
        }
    }

    pub(super) fn local_announcements(&self) -> Vec<Announcement> {
        self.hub
            .local_streams()
            .into_iter()
            .filter_map(|k| self.announcement(k))
            .collect()
    }

    /// This node's announce of a local stream, if it is still published here.
    pub(super) fn announcement(&self, key: StreamKey) -> Option<Announcement> {
        let stream = self.hub.get(&key).filter(|s| s.is_local())?;
        Some(Announcement {
            timeline: stream.timeline(),
            started_ms: stream.started_ms(),
            stream: key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> StreamKey {
        StreamKey::new("live", n).unwrap()
    }

    fn ann(n: &str) -> Announcement {
        Announcement {
            stream: key(n),
            timeline: 1,
            started_ms: 1,
        }
    }

    #[test]
    fn after_missed_events_what_ended_is_withdrawn_and_the_rest_remembered() {
        let mut set = AnnouncedSet::default();
        set.announced(&key("a"));
        set.announced(&key("b"));
        set.announced(&key("c"));
        set.withdrawn(&key("c"));
        // Missed: b ended, d started.
        assert_eq!(set.resync(&[ann("a"), ann("d")]), vec![key("b")]);
        assert_eq!(set.resync(&[ann("a"), ann("d")]), vec![], "nothing more");
        assert_eq!(set.resync(&[]), vec![key("a"), key("d")]);
    }
}
