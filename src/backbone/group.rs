//! Media groups on the receiving side: putting group streams back in order.
//!
//! Each group (a GOP) arrives on its own QUIC stream, read by its own task, so items of
//! several groups can interleave. [`GroupSequencer`] (sans-IO, driven with explicit `now`)
//! delivers the current group's items in order and holds back newer groups until the current
//! one ends. If the current group stalls (loss) while a newer one is waiting, it is abandoned
//! after `stall` and delivery jumps to the newer group, which starts at a keyframe: a relay
//! that falls behind drops a stale group instead of blocking the next.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::wire::MediaItem;

/// Held-back items beyond which the current group is abandoned at once.
const MAX_PENDING_ITEMS: usize = 4096;

#[derive(Debug, Default)]
struct Pending {
    items: Vec<MediaItem>,
    ended: bool,
}

#[derive(Debug)]
pub struct GroupSequencer {
    current: Option<u64>,
    last_progress: Option<Instant>,
    /// Groups below this are over (delivered or abandoned). Wider than a group number: a
    /// peer chooses those, and the group after `u64::MAX` must be representable.
    floor: u128,
    pending: BTreeMap<u64, Pending>,
    pending_items: usize,
    stall: Duration,
    dropped_groups: u64,
}

impl GroupSequencer {
    pub fn new(stall: Duration) -> Self {
        GroupSequencer {
            current: None,
            last_progress: None,
            floor: 0,
            pending: BTreeMap::new(),
            pending_items: 0,
            stall,
            dropped_groups: 0,
        }
    }

    /// Groups abandoned so far.
    pub fn dropped_groups(&self) -> u64 {
        self.dropped_groups
    }

    /// An item of `group` arrived; returns what can be delivered now, in order.
    pub fn push(&mut self, group: u64, item: MediaItem, now: Instant) -> Vec<MediaItem> {
        if u128::from(group) < self.floor {
            return vec![];
        }
        match self.current {
            None => {
                self.start(group, now);
                vec![item]
            }
            Some(c) if group == c => {
                self.last_progress = Some(now);
                vec![item]
            }
            Some(c) if group < c => vec![],
            Some(_) => {
                self.pending.entry(group).or_default().items.push(item);
                self.pending_items += 1;
                if self.pending_items > MAX_PENDING_ITEMS {
                    self.abandon_current(now)
                } else {
                    vec![]
                }
            }
        }
    }

    /// `group`'s stream finished (or broke); returns what can be delivered now.
    pub fn end(&mut self, group: u64, now: Instant) -> Vec<MediaItem> {
        if u128::from(group) < self.floor {
            return vec![];
        }
        if self.current == Some(group) {
            self.floor = after(group);
            self.current = None;
            return self.advance(now);
        }
        if self.current.is_some_and(|c| group > c) {
            self.pending.entry(group).or_default().ended = true;
        } else if self.current.is_none() {
            // An empty group: nothing to deliver, nothing to wait for.
            self.floor = self.floor.max(after(group));
        }
        vec![]
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.current, self.last_progress) {
            (Some(_), Some(t)) if !self.pending.is_empty() => Some(t + self.stall),
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Vec<MediaItem> {
        match self.poll_timeout() {
            Some(deadline) if now >= deadline => self.abandon_current(now),
            _ => vec![],
        }
    }

    fn start(&mut self, group: u64, now: Instant) {
        self.current = Some(group);
        self.last_progress = Some(now);
        // Anything older than the group now playing is stale.
        let newer = self.pending.split_off(&group);
        for (_, p) in std::mem::replace(&mut self.pending, newer) {
            self.pending_items -= p.items.len();
            self.dropped_groups += 1;
        }
    }

    fn abandon_current(&mut self, now: Instant) -> Vec<MediaItem> {
        if let Some(c) = self.current.take() {
            self.dropped_groups += 1;
            self.floor = after(c);
        }
        self.advance(now)
    }

    /// Moves to the oldest held-back group, delivering what it has.
    fn advance(&mut self, now: Instant) -> Vec<MediaItem> {
        let mut out = Vec::new();
        while let Some((group, p)) = self.pending.pop_first() {
            self.pending_items -= p.items.len();
            out.extend(p.items);
            if p.ended {
                self.floor = after(group);
            } else {
                self.current = Some(group);
                self.last_progress = Some(now);
                break;
            }
        }
        out
    }
}

/// The floor once `group` is over.
fn after(group: u64) -> u128 {
    u128::from(group) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Codec, Frame, Timebase};
    use bytes::Bytes;

    fn f(dts: i64) -> MediaItem {
        MediaItem::Frame(Frame {
            codec: Codec::H264,
            dts,
            pts: dts,
            timebase: Timebase::MILLIS,
            keyframe: false,
            payload: Bytes::new(),
        })
    }

    fn dts(items: &[MediaItem]) -> Vec<i64> {
        items
            .iter()
            .map(|i| match i {
                MediaItem::Frame(f) => f.dts,
                MediaItem::Config(_) | MediaItem::Publishes(_) => -1,
            })
            .collect()
    }

    #[test]
    fn in_order_groups_flow_through() {
        let t = Instant::now();
        let mut s = GroupSequencer::new(Duration::from_millis(300));
        assert_eq!(dts(&s.push(0, f(0), t)), vec![0]);
        assert_eq!(dts(&s.push(0, f(1), t)), vec![1]);
        assert!(s.end(0, t).is_empty());
        assert_eq!(dts(&s.push(1, f(2), t)), vec![2]);
    }

    #[test]
    fn newer_group_waits_for_current_to_end() {
        let t = Instant::now();
        let mut s = GroupSequencer::new(Duration::from_millis(300));
        s.push(0, f(0), t);
        assert!(s.push(1, f(10), t).is_empty());
        assert!(s.push(1, f(11), t).is_empty());
        assert_eq!(dts(&s.push(0, f(1), t)), vec![1]);
        assert_eq!(dts(&s.end(0, t)), vec![10, 11]);
        assert_eq!(dts(&s.push(1, f(12), t)), vec![12]);
        assert_eq!(s.dropped_groups(), 0);
    }

    #[test]
    fn stalled_group_is_abandoned_for_the_newer_one() {
        let t = Instant::now();
        let mut s = GroupSequencer::new(Duration::from_millis(300));
        s.push(0, f(0), t);
        s.push(1, f(10), t + Duration::from_millis(10));
        assert_eq!(s.poll_timeout(), Some(t + Duration::from_millis(300)));
        assert!(s.handle_timeout(t + Duration::from_millis(299)).is_empty());
        assert_eq!(
            dts(&s.handle_timeout(t + Duration::from_millis(300))),
            vec![10]
        );
        assert_eq!(s.dropped_groups(), 1);
        // Late data of the abandoned group is ignored.
        assert!(s.push(0, f(1), t + Duration::from_millis(400)).is_empty());
        assert!(s.end(0, t + Duration::from_millis(400)).is_empty());
        assert_eq!(dts(&s.push(1, f(11), t)), vec![11]);
    }

    #[test]
    fn the_last_group_number_a_peer_can_send_ends_without_overflow() {
        // Found by fuzz/fuzz_targets/group_sequencer.rs: a group header with sequence
        // u64::MAX, then the end of that group, overflowed `group + 1` (a panic in the
        // feed's task with overflow checks on, as release builds have them).
        let t = Instant::now();
        let mut s = GroupSequencer::new(Duration::from_millis(300));
        assert!(s.end(u64::MAX, t).is_empty());
        assert!(s.push(u64::MAX, f(0), t).is_empty(), "the group is over");
        let mut s = GroupSequencer::new(Duration::from_millis(300));
        assert_eq!(dts(&s.push(u64::MAX - 1, f(0), t)), vec![0]);
        assert!(s.push(u64::MAX, f(1), t).is_empty());
        s.end(u64::MAX, t);
        assert_eq!(dts(&s.end(u64::MAX - 1, t)), vec![1]);
        assert!(s.push(u64::MAX, f(2), t).is_empty());
        // Abandoning the last group by timeout as well.
        let mut s = GroupSequencer::new(Duration::from_millis(300));
        s.push(u64::MAX - 1, f(0), t);
        s.push(u64::MAX, f(1), t);
        assert_eq!(
            dts(&s.handle_timeout(t + Duration::from_millis(300))),
            vec![1]
        );
        assert!(s.handle_timeout(t + Duration::from_secs(1)).is_empty());
        s.end(u64::MAX, t);
        assert!(s.push(u64::MAX, f(3), t).is_empty());
    }

    #[test]
    fn ended_pending_groups_are_skipped_through() {
        let t = Instant::now();
        let mut s = GroupSequencer::new(Duration::from_millis(300));
        s.push(0, f(0), t);
        s.push(1, f(10), t);
        s.end(1, t);
        s.push(2, f(20), t);
        assert_eq!(dts(&s.end(0, t)), vec![10, 20]);
        assert_eq!(dts(&s.push(2, f(21), t)), vec![21]);
        assert!(s.push(1, f(11), t).is_empty());
    }
}
