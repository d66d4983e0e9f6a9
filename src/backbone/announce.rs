//! Announces: the directory updates and the publish race.

use std::time::Instant;

use tracing::{debug, info, warn};

use super::link::*;
use super::session::PeerInfo;
use super::wire::Announcement;
use super::Backbone;
use crate::config::Role;
use crate::media::StreamKey;

/// Rival publishes of one name started this close together count as a race (the message
/// to the loser says so); farther apart, the later one was simply late.
pub(super) const RACE_WINDOW_MS: u64 = 1000;
impl Backbone {
    /// Records an origin's announce. A name published on two origins (two publishers raced,
    /// or a publisher started on one origin while another holds the name) goes to the
    /// publish that ranks first ([`Announcement::rank`]): every node computes the same
    /// winner. The origin holding the loser evicts its publisher, telling it why; viewers
    /// pulling the loser's copy re-home to the winner ([`code::MOVED`]). The winner answers
    /// a rival's announce by announcing again, so the rival learns it lost even when the
    /// winner's first announce reached it before its own publish began.
    pub(super) fn on_announce(&self, peer: &PeerInfo, a: Announcement) {
        debug!(stream = %a.stream, session = a.session, "announced");
        let key = a.stream.clone();
        let theirs = (a.started_ms, peer.node_id.clone());
        self.directory.lock().announce(&peer.node_id, a);
        let Some(local) = self.hub.get(&key).filter(|s| s.is_local()) else {
            return;
        };
        let mine = (local.started_ms(), self.local.node_id.clone());
        if theirs < mine {
            let earlier = mine.0.saturating_sub(theirs.0);
            let reason = if earlier < RACE_WINDOW_MS {
                format!(
                    "lost the publish race for {key} to {} (published {earlier} ms earlier)",
                    theirs.1
                )
            } else {
                format!("{key} is already published on {}", theirs.1)
            };
            warn!("{reason}");
            self.hub.evict(&key, &reason);
        } else {
            info!(stream = %key, rival = %theirs.1,
                "{key} is also published on {}; this node's publish came first and keeps it",
                theirs.1);
            self.hub.reannounce(&key);
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
        let node = match (self.role, relayed_from) {
            (Role::Edge, Some(node)) => node,
            _ => owner?,
        };
        let conn = self
            .outbound
            .lock()
            .values()
            .find(|l| l.peer.node_id == node)
            .map(|l| l.conn.clone())?;
        let heard = conn.stats().udp_rx.datagrams;
        let deadline = Instant::now() + self.link_timeout;
        while Instant::now() < deadline && conn.close_reason().is_none() {
            if conn.stats().udp_rx.datagrams > heard {
                return Some(node);
            }
            tokio::time::sleep(LIVENESS_TICK / 2).await;
        }
        None
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
            session: stream.session(),
            started_ms: stream.started_ms(),
            stream: key,
        })
    }
}
