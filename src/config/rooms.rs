//! `[rooms]`: meetings and voice rooms: how many, how big, how long an empty one lives,
//! and the bounds on what a participant may send through its event channel.

use std::time::Duration;

use serde::Deserialize;

use super::read::{Problem, Problems};

/// The bounds on rooms and their participants.
#[derive(Clone, Debug)]
pub struct RoomsConfig {
    /// Rooms at most, in the whole cluster as this node knows it.
    pub max_rooms: usize,
    /// Participants of one room at most; a room's own `max_participants` may only be lower.
    pub max_participants: u32,
    /// How long an empty room lives when its creator did not say.
    pub empty_timeout: Duration,
    /// The largest data message (its whole JSON frame) a participant may send.
    pub max_message_bytes: usize,
    /// Data messages per second a participant may send, on average and in a burst.
    pub messages_per_s: u32,
    pub message_burst: u32,
    /// Participants connected to this node at most (each holds an event channel).
    pub max_local_participants: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            max_rooms: 1000,
            max_participants: 100,
            empty_timeout: Duration::from_secs(300),
            max_message_bytes: 16 * 1024,
            messages_per_s: 20,
            message_burst: 40,
            max_local_participants: 5000,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRooms {
    max_rooms: Option<usize>,
    max_participants: Option<u32>,
    empty_timeout_s: Option<u64>,
    max_message_bytes: Option<usize>,
    messages_per_s: Option<u32>,
    message_burst: Option<u32>,
    max_local_participants: Option<usize>,
}

/// The most a room may hold, whatever the config says.
pub const MAX_PARTICIPANTS_CAP: u32 = 1000;
/// The longest an empty room may live (a day).
pub const MAX_EMPTY_TIMEOUT_S: u64 = 86_400;

pub(super) fn parse(raw: RawRooms, problems: &mut Problems) -> RoomsConfig {
    let d = RoomsConfig::default();
    let c = RoomsConfig {
        max_rooms: raw.max_rooms.unwrap_or(d.max_rooms),
        max_participants: raw.max_participants.unwrap_or(d.max_participants),
        empty_timeout: raw
            .empty_timeout_s
            .map(Duration::from_secs)
            .unwrap_or(d.empty_timeout),
        max_message_bytes: raw.max_message_bytes.unwrap_or(d.max_message_bytes),
        messages_per_s: raw.messages_per_s.unwrap_or(d.messages_per_s),
        message_burst: raw.message_burst.unwrap_or(d.message_burst),
        max_local_participants: raw
            .max_local_participants
            .unwrap_or(d.max_local_participants),
    };
    if c.max_rooms == 0 || c.max_rooms > 1_000_000 {
        problems.push(Problem::new(
            "rooms.max_rooms",
            "must be between 1 and 1000000",
        ));
    }
    if c.max_participants < 2 || c.max_participants > MAX_PARTICIPANTS_CAP {
        problems.push(Problem::new(
            "rooms.max_participants",
            format!("must be between 2 and {MAX_PARTICIPANTS_CAP}"),
        ));
    }
    let t = c.empty_timeout.as_secs();
    if t == 0 || t > MAX_EMPTY_TIMEOUT_S {
        problems.push(Problem::new(
            "rooms.empty_timeout_s",
            format!("must be between 1 and {MAX_EMPTY_TIMEOUT_S}"),
        ));
    }
    if !(64..=1 << 20).contains(&c.max_message_bytes) {
        problems.push(Problem::new(
            "rooms.max_message_bytes",
            "must be between 64 and 1048576",
        ));
    }
    if c.messages_per_s == 0 || c.messages_per_s > 10_000 {
        problems.push(Problem::new(
            "rooms.messages_per_s",
            "must be between 1 and 10000",
        ));
    }
    if c.message_burst < c.messages_per_s.min(10_000) || c.message_burst > 100_000 {
        problems.push(Problem::new(
            "rooms.message_burst",
            "must be at least rooms.messages_per_s and at most 100000",
        ));
    }
    if c.max_local_participants == 0 || c.max_local_participants > 1_000_000 {
        problems.push(Problem::new(
            "rooms.max_local_participants",
            "must be between 1 and 1000000",
        ));
    }
    c
}
