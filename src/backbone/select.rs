//! Pull selection: which link a pull subscribes over (sans-IO, explicit `now`).
//!
//! * An **edge** pulls from the first origin of its configured list (nearest first) that is
//!   linked now.
//! * An **origin** (or standalone node) pulls from the origin the stream directory names as
//!   the stream's owner, over the link it dialed to that origin: one hop at most, never a
//!   stream another origin relays.
//! * An edge pulling from a less preferred origin returns to a more preferred one once that
//!   has been linked for `return_after` (a hold-down against flapping; zero: never).
//!
//! The caller describes its links as a slice in configuration order: `Some` for an address
//! linked now (to which node, since when), `None` for one that is not. The answers are
//! indices into that slice. The driver (`pull.rs`) and the cluster simulation
//! (`tests/simulation.rs`) both ask this type.

use std::time::{Duration, Instant};

use crate::config::Role;

/// A configured upstream address that is linked now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkedUpstream<'a> {
    /// The node at the other end (from its hello).
    pub node: &'a str,
    /// When the link came up.
    pub since: Instant,
}

/// The pull-selection policy of one node.
#[derive(Clone, Copy, Debug)]
pub struct PullSelection {
    role: Role,
    return_after: Duration,
}

impl PullSelection {
    pub fn new(role: Role, return_after: Duration) -> PullSelection {
        PullSelection { role, return_after }
    }

    /// The link to pull a stream over: for an edge the first linked upstream, for an origin
    /// the link to `owner` (the directory's owner of the stream). `None`: nobody to ask.
    pub fn choose(&self, links: &[Option<LinkedUpstream>], owner: Option<&str>) -> Option<usize> {
        match self.role {
            // Nearest first: the config order.
            Role::Edge => links.iter().position(Option::is_some),
            Role::Origin | Role::Standalone => {
                let owner = owner?;
                links
                    .iter()
                    .position(|l| l.is_some_and(|l| l.node == owner))
            }
        }
    }

    /// Whether pulls of this node ever move back to a more preferred upstream.
    pub fn returns(&self) -> bool {
        self.role == Role::Edge && !self.return_after.is_zero()
    }

    /// For an edge pulling from `current`: a more preferred upstream (earlier in the list)
    /// that has been linked for `return_after` by `now`, to move back to.
    pub fn preferred_over(
        &self,
        links: &[Option<LinkedUpstream>],
        current: &str,
        now: Instant,
    ) -> Option<usize> {
        if !self.returns() {
            return None;
        }
        for (i, link) in links.iter().enumerate() {
            let Some(link) = link else { continue };
            if link.node == current {
                return None;
            }
            if now.saturating_duration_since(link.since) >= self.return_after {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(3);

    fn up(node: &str, since: Instant) -> Option<LinkedUpstream<'_>> {
        Some(LinkedUpstream { node, since })
    }

    #[test]
    fn an_edge_pulls_from_its_first_linked_origin_in_config_order() {
        let t = Instant::now();
        let edge = PullSelection::new(Role::Edge, AFTER);
        assert_eq!(edge.choose(&[up("a", t), up("b", t)], None), Some(0));
        assert_eq!(edge.choose(&[None, up("b", t)], None), Some(1), "a is down");
        assert_eq!(edge.choose(&[None, None], Some("a")), None);
        // The directory plays no part for an edge.
        assert_eq!(edge.choose(&[up("a", t), up("b", t)], Some("b")), Some(0));
    }

    #[test]
    fn an_origin_pulls_only_from_the_directorys_owner() {
        let t = Instant::now();
        for role in [Role::Origin, Role::Standalone] {
            let origin = PullSelection::new(role, AFTER);
            let links = [up("a", t), None, up("c", t)];
            assert_eq!(origin.choose(&links, Some("c")), Some(2));
            assert_eq!(origin.choose(&links, Some("b")), None, "owner not linked");
            assert_eq!(origin.choose(&links, None), None, "nobody announced it");
        }
    }

    #[test]
    fn an_edge_returns_to_a_preferred_origin_only_after_the_hold_down() {
        let t = Instant::now();
        let edge = PullSelection::new(Role::Edge, AFTER);
        let links = [up("a", t), up("b", t - AFTER)];
        // On b: a came up just now, not yet.
        assert_eq!(edge.preferred_over(&links, "b", t), None);
        assert_eq!(edge.preferred_over(&links, "b", t + AFTER), Some(0));
        // Already on the most preferred: nothing to return to.
        assert_eq!(edge.preferred_over(&links, "a", t + AFTER), None);
        // An older, less preferred link is not "better" than the current one.
        let links = [None, up("b", t), up("c", t - AFTER)];
        assert_eq!(edge.preferred_over(&links, "b", t + AFTER), None);
    }

    #[test]
    fn a_young_first_choice_does_not_hide_an_older_second_one() {
        let t = Instant::now();
        let edge = PullSelection::new(Role::Edge, AFTER);
        let links = [up("a", t), up("b", t - AFTER), up("c", t - AFTER)];
        assert_eq!(edge.preferred_over(&links, "c", t), Some(1));
    }

    #[test]
    fn origins_and_a_zero_hold_down_never_return() {
        let t = Instant::now();
        let links = [up("a", t - AFTER), up("b", t)];
        let never = PullSelection::new(Role::Edge, Duration::ZERO);
        assert!(!never.returns());
        assert_eq!(never.preferred_over(&links, "b", t), None);
        let origin = PullSelection::new(Role::Origin, AFTER);
        assert!(!origin.returns());
        assert_eq!(origin.preferred_over(&links, "b", t), None);
    }
}
