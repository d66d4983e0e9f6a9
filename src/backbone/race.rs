//! The publish race: one name published on two origins (sans-IO).
//!
//! Two publishers raced, or a publisher started on one origin while another holds the
//! name. Every node computes the same winner ([`Announcement::rank`]: the earlier publish,
//! then the lower node id). The origin holding the loser evicts its publisher, telling it
//! why; viewers pulling the loser's copy re-home to the winner ([`super::wire::code::MOVED`]).
//! The winner answers a rival's announce by announcing again, so the rival learns it lost
//! even when the winner's first announce reached it before its own publish began.
//!
//! Before a publish is refused because the name is taken elsewhere, the holder must be
//! alive ([`holder_to_check`], then `liveness::AnswerWait`): a node that just died still
//! has its announces in the directory until its link times out.
//!
//! [`Announcement::rank`]: super::wire::Announcement::rank

use crate::config::Role;
use crate::media::StreamKey;

/// Rival publishes of one name started this close together count as a race (the message
/// to the loser says so); farther apart, the later one was simply late.
pub const RACE_WINDOW_MS: u64 = 1000;

/// One publish of a name: when it started (unix ms) and on which node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    pub started_ms: u64,
    pub node: &'a str,
}

impl Publish<'_> {
    /// Lower ranks first (the same order as `Announcement::rank`).
    fn rank(&self) -> (u64, &str) {
        (self.started_ms, self.node)
    }
}

/// What this node does about a rival announce of a name it publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// This node's publisher lost: evict it with this reason.
    EvictMine(String),
    /// This node's publish came first: keep it and announce it again.
    KeepMine,
}

/// Settles `key`, published here (`mine`) and announced by another origin (`theirs`).
pub fn settle(key: &StreamKey, mine: Publish, theirs: Publish) -> Verdict {
    if theirs.rank() >= mine.rank() {
        return Verdict::KeepMine;
    }
    let earlier = mine.started_ms.saturating_sub(theirs.started_ms);
    Verdict::EvictMine(if earlier < RACE_WINDOW_MS {
        format!(
            "lost the publish race for {key} to {} (published {earlier} ms earlier)",
            theirs.node
        )
    } else {
        format!("{key} is already published on {}", theirs.node)
    })
}

/// The node whose liveness decides whether a name is taken elsewhere: for an edge, the
/// origin it relays the name from (an edge has no directory); for an origin, the
/// directory's owner of the name. `None`: nobody holds it.
pub fn holder_to_check(
    role: Role,
    relayed_from: Option<String>,
    owner: Option<String>,
) -> Option<String> {
    match (role, relayed_from) {
        (Role::Edge, Some(node)) => Some(node),
        _ => owner,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StreamKey {
        StreamKey::new("live", "x").unwrap()
    }

    fn p(started_ms: u64, node: &str) -> Publish<'_> {
        Publish { started_ms, node }
    }

    #[test]
    fn the_earlier_publish_wins_and_a_close_one_is_called_a_race() {
        assert_eq!(
            settle(&key(), p(1_500, "b"), p(1_000, "a")),
            Verdict::EvictMine(
                "lost the publish race for live/x to a (published 500 ms earlier)".into()
            )
        );
        assert_eq!(
            settle(&key(), p(1_000, "b"), p(1_500, "a")),
            Verdict::KeepMine
        );
    }

    #[test]
    fn a_much_earlier_publish_means_the_name_was_taken() {
        assert_eq!(
            settle(&key(), p(1_000 + RACE_WINDOW_MS, "b"), p(1_000, "a")),
            Verdict::EvictMine("live/x is already published on a".into())
        );
    }

    #[test]
    fn a_tie_goes_to_the_lower_node_id_on_both_sides() {
        assert!(matches!(
            settle(&key(), p(7, "b"), p(7, "a")),
            Verdict::EvictMine(_)
        ));
        assert_eq!(settle(&key(), p(7, "a"), p(7, "b")), Verdict::KeepMine);
        // Our own announce echoed back is no rival.
        assert_eq!(settle(&key(), p(7, "a"), p(7, "a")), Verdict::KeepMine);
    }

    #[test]
    fn an_edge_checks_its_relay_source_and_an_origin_its_directory() {
        let (r, o) = (Some("relay".to_string()), Some("owner".to_string()));
        assert_eq!(holder_to_check(Role::Edge, r.clone(), o.clone()), r);
        assert_eq!(holder_to_check(Role::Edge, None, o.clone()), o);
        assert_eq!(holder_to_check(Role::Origin, r.clone(), o.clone()), o);
        assert_eq!(holder_to_check(Role::Standalone, r, None), None);
    }
}
