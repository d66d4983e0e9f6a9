//! What reaches a room from outside: a participant's text frames on its event channel
//! (`rooms::checks::ClientMessage::parse`) and another node's room-bus messages
//! (`rooms::cluster::BusMsg`, checked by `valid_slice`, then applied to the room table and
//! timed out by its tick).
//!
//! Input: one byte (bit 0: a bus message, else a client frame), then the bytes.
//! Invariants: no panic; a parsed client message fits the size bound; the table never holds
//! more participants in a room than a valid slice may carry, and forgets every peer's
//! slice once its time is up.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshcast::config::RoomsConfig;
use meshcast::rooms::checks::{ClientMessage, RateLimit};
use meshcast::rooms::cluster::{valid_slice, BusMsg};
use meshcast::rooms::state::{RoomInfo, RoomTable, MAX_SLICE_ITEMS};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let config = RoomsConfig::default();
        let mut rate = RateLimit::new(config.messages_per_s, config.message_burst, now);
        if ClientMessage::parse(text, &config, &mut rate, now).is_ok() {
            assert!(text.len() <= config.max_message_bytes);
        }
        return;
    }
    let Ok(msg) = serde_json::from_slice::<BusMsg>(rest) else {
        return;
    };
    let mut table = RoomTable::new("me", 16);
    let info = RoomInfo {
        id: "r1".into(),
        name: String::new(),
        max_participants: 100,
        empty_timeout_s: 60,
        created_ms: 0,
    };
    table.create(info, now).expect("a room");
    match msg {
        BusMsg::Slice(update) => {
            if !valid_slice(&update) {
                return;
            }
            let ttl = now + Duration::from_secs(3);
            if table.apply_slice(update.clone(), ttl, now).is_some() {
                // A copy of an accepted slice changes nothing.
                assert_eq!(table.apply_slice(update, ttl, now), Some(vec![]));
            }
            if let Some(members) = table.members("r1") {
                assert!(members.len() <= MAX_SLICE_ITEMS);
            }
            let (_, _) = table.tick(now + Duration::from_secs(4));
            assert!(table.members("r1").is_none_or(|m| m.is_empty()));
        }
        BusMsg::Room { info } => {
            let _ = table.learn_room(info, now);
        }
        BusMsg::Closed { room } => {
            let _ = table.remove(&room, "closed", now);
        }
        BusMsg::Data { .. } => {}
    }
});
