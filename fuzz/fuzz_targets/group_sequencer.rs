//! The receiving side of media groups: each group stream as `read_group` reads it (a
//! `GroupHeader`, then items whose length prefix goes through `wire::frame_len` and whose
//! bodies through `MediaItem::decode`), interleaved across groups and driven into
//! `backbone::group::GroupSequencer` with timeouts.
//!
//! Input: a sequence of operations, each one tag byte then its operands: an item of group
//! `g` (from a whole group header, from 8 bytes taken as its sequence field, or a small
//! group number), the end of a group, or time passing.
//! Invariants: no panic; nothing is delivered twice or out of thin air (delivered ≤ pushed);
//! `poll_timeout` is honoured: `handle_timeout` before it delivers nothing.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meshcast::backbone::group::GroupSequencer;
use meshcast::backbone::wire::{self, GroupHeader, MediaItem, GROUP_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = GroupSequencer::new(Duration::from_millis(300));
    let (mut pushed, mut delivered) = (0usize, 0usize);
    let mut r = data;
    while let Some((&tag, rest)) = r.split_first() {
        r = rest;
        let group = match tag & 0x03 {
            // A group number from a whole group header, as a peer sends it.
            0 => {
                let Some(h) = take(&mut r, GROUP_HEADER_LEN) else {
                    return;
                };
                let h: &[u8; GROUP_HEADER_LEN] = h.try_into().unwrap(); // by `take`
                match GroupHeader::decode(h) {
                    Ok(h) => h.sequence,
                    Err(_) => continue,
                }
            }
            // A header's sequence field alone: any u64 a peer may put there.
            3 => {
                let Some(b) = take(&mut r, 8) else {
                    return;
                };
                u64::from_be_bytes(b.try_into().unwrap()) // 8 bytes by `take`
            }
            _ => (tag >> 4) as u64,
        };
        match (tag >> 2) & 0x03 {
            0 | 1 => {
                // One item as `read_item` reads it.
                let Some(prefix) = take(&mut r, 4) else {
                    return;
                };
                let Ok(len) = wire::frame_len(prefix.try_into().unwrap()) else {
                    continue;
                };
                let Some(body) = take(&mut r, len) else {
                    return; // the stream ended inside the item
                };
                let mut body = Bytes::copy_from_slice(body);
                let kind = bytes::Buf::get_u8(&mut body); // len ≥ 1 by frame_len
                let Ok(item) = MediaItem::decode(kind, body) else {
                    continue;
                };
                pushed += 1;
                delivered += s.push(group, item, now).len();
            }
            2 => delivered += s.end(group, now).len(),
            _ => {
                let ms = r.first().copied().unwrap_or(0) as u64 * 4;
                r = r.get(1..).unwrap_or(&[]);
                now += Duration::from_millis(ms);
                if let Some(deadline) = s.poll_timeout() {
                    if deadline > now {
                        assert!(s.handle_timeout(now).is_empty());
                    }
                }
                delivered += s.handle_timeout(now).len();
            }
        }
        assert!(delivered <= pushed, "delivered {delivered} of {pushed}");
    }
});

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = (r.get(..n)?, r.get(n..)?);
    *r = tail;
    Some(head)
}
