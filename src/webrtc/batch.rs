//! Batched UDP sends with generic segmentation offload (GSO, `UDP_SEGMENT`).
//!
//! A frame fans out to a viewer as a run of datagrams to one address, all of one size but
//! the last (an H.264 frame's FU-A packets, SRTP-protected). The kernel takes such a run in
//! one `sendmsg` and builds one buffer for it, which it splits late (on the NIC, or at the
//! receiving end of loopback): one system call and one trip down the stack per run instead
//! of per packet. Sends go through `quinn-udp`, which knows the platform's limits and falls
//! back to one datagram per call where GSO is missing.
//!
//! A peer gathers what str0m hands it in one [`Batch`] per worker thread (so no peer holds a
//! 64 KB buffer of its own) and flushes it before it waits again.

use std::cell::RefCell;
use std::net::SocketAddr;

/// What one GSO send may carry: the IP datagram limit less IP and UDP headers.
const MAX_BATCH_BYTES: usize = 65_000;

/// Datagrams for one destination that one GSO send can carry: equal sizes, but the last
/// may be shorter.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    buf: Vec<u8>,
    destination: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// A datagram shorter than the segment size ended the run.
    closed: bool,
}

impl Batch {
    /// Appends `datagram` if it can join this run (at most `max_segments` datagrams); false
    /// when the batch must be sent first.
    pub(crate) fn push(
        &mut self,
        destination: SocketAddr,
        datagram: &[u8],
        max_segments: usize,
    ) -> bool {
        if self.count == 0 {
            self.destination = Some(destination);
            self.segment = datagram.len();
        } else if self.closed
            || self.destination != Some(destination)
            || self.count >= max_segments
            || datagram.len() > self.segment
            || self.buf.len() + datagram.len() > MAX_BATCH_BYTES
        {
            return false;
        }
        self.closed = datagram.len() < self.segment;
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        true
    }

    /// The run to send: (destination, contents, segment size when there are several), or
    /// None when empty.
    pub(crate) fn contents(&self) -> Option<(SocketAddr, &[u8], Option<usize>)> {
        let destination = self.destination.filter(|_| self.count > 0)?;
        Some((
            destination,
            &self.buf,
            (self.count > 1).then_some(self.segment),
        ))
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        self.destination = None;
    }
}

thread_local! {
    /// The batch of the peer running on this thread (peers fill and flush it without
    /// awaiting in between).
    pub(crate) static BATCH: RefCell<Batch> = RefCell::default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_frame_run_is_one_batch_up_to_its_shorter_last_packet() {
        let mut b = Batch::default();
        assert!(b.contents().is_none());
        assert!(b.push(addr(1), &[1; 1200], 64));
        assert!(b.push(addr(1), &[2; 1200], 64));
        assert!(b.push(addr(1), &[3; 700], 64));
        assert!(
            !b.push(addr(1), &[4; 700], 64),
            "a short packet ends the run"
        );
        let (to, contents, segment) = b.contents().unwrap();
        assert_eq!((to, contents.len(), segment), (addr(1), 3100, Some(1200)));
        assert_eq!(contents[1200], 2);
        b.clear();
        assert!(b.push(addr(1), &[4; 700], 64));
        assert_eq!(
            b.contents().unwrap().2,
            None,
            "one datagram needs no segment size"
        );
    }

    #[test]
    fn other_destinations_larger_packets_and_limits_start_a_new_batch() {
        let mut b = Batch::default();
        assert!(b.push(addr(1), &[0; 500], 2));
        assert!(!b.push(addr(2), &[0; 500], 2), "another destination");
        assert!(!b.push(addr(1), &[0; 501], 2), "larger than the segment");
        assert!(b.push(addr(1), &[0; 500], 2));
        assert!(!b.push(addr(1), &[0; 500], 2), "max segments");
        b.clear();
        for _ in 0..54 {
            assert!(b.push(addr(1), &[0; 1200], 64));
        }
        assert!(!b.push(addr(1), &[0; 1200], 64), "64 KB of datagrams");
    }
}
