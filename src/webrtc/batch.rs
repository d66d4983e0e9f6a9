//! Batched UDP sends: many peers' datagrams in one `sendmmsg`, and each destination's run of
//! equal-size datagrams as one message with generic segmentation offload (GSO,
//! `UDP_SEGMENT`).
//!
//! A frame fans out to a viewer as a run of datagrams to one address, all of one size but
//! the last (an H.264 frame's FU-A packets, SRTP-protected). The kernel takes such a run as
//! one message and builds one buffer for it, which it splits late (on the NIC, or at the
//! receiving end of loopback). A shard of viewers fills one [`Batch`] with every viewer's
//! runs for a frame, and the driver (`super::io`) hands them to the kernel in a few
//! `sendmmsg` calls: system calls per frame, not per viewer or per packet.
//!
//! The batch is sans-IO: it lays the datagrams out, the driver sends them.

use std::net::SocketAddr;

/// What one GSO message may carry: the IP datagram limit less IP and UDP headers.
const MAX_RUN_BYTES: usize = 65_000;
/// Bytes a batch holds before it must be sent (a keyframe for ~250 viewers).
pub(crate) const MAX_BATCH_BYTES: usize = 512 << 10;
/// Runs a batch holds before it must be sent.
const MAX_RUNS: usize = 1024;

/// One destination's datagrams that one message can carry: equal sizes, but the last may
/// be shorter.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub destination: SocketAddr,
    start: usize,
    len: usize,
    /// The size of each datagram but the last.
    pub segment: usize,
    pub count: usize,
    /// A datagram shorter than the segment size ended the run.
    closed: bool,
}

/// Datagrams for many destinations, laid out as runs.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    buf: Vec<u8>,
    runs: Vec<Run>,
}

impl Batch {
    /// Appends `datagram` for `destination`, to the last run if it can join it (at most
    /// `max_segments` datagrams a run); false when the batch is full and must be sent
    /// first.
    pub(crate) fn push(
        &mut self,
        destination: SocketAddr,
        datagram: &[u8],
        max_segments: usize,
    ) -> bool {
        if !self.runs.is_empty() && self.buf.len() + datagram.len() > MAX_BATCH_BYTES {
            return false;
        }
        if let Some(run) = self.runs.last_mut() {
            if run.destination == destination
                && !run.closed
                && run.count < max_segments
                && datagram.len() <= run.segment
                && run.len + datagram.len() <= MAX_RUN_BYTES
            {
                run.closed = datagram.len() < run.segment;
                run.len += datagram.len();
                run.count += 1;
                self.buf.extend_from_slice(datagram);
                return true;
            }
        }
        if self.runs.len() >= MAX_RUNS {
            return false;
        }
        self.runs.push(Run {
            destination,
            start: self.buf.len(),
            len: datagram.len(),
            segment: datagram.len(),
            count: 1,
            closed: false,
        });
        self.buf.extend_from_slice(datagram);
        true
    }

    pub(crate) fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// A run's datagrams, back to back.
    pub(crate) fn contents(&self, run: &Run) -> &[u8] {
        &self.buf[run.start..run.start + run.len]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn shape(b: &Batch) -> Vec<(u16, usize, usize, usize)> {
        b.runs()
            .iter()
            .map(|r| {
                (
                    r.destination.port(),
                    r.count,
                    r.segment,
                    b.contents(r).len(),
                )
            })
            .collect()
    }

    #[test]
    fn a_frame_run_is_one_message_up_to_its_shorter_last_packet() {
        let mut b = Batch::default();
        assert!(b.is_empty());
        assert!(b.push(addr(1), &[1; 1200], 64));
        assert!(b.push(addr(1), &[2; 1200], 64));
        assert!(b.push(addr(1), &[3; 700], 64));
        assert!(
            b.push(addr(1), &[4; 700], 64),
            "a short packet ends the run"
        );
        assert_eq!(shape(&b), [(1, 3, 1200, 3100), (1, 1, 700, 700)]);
        assert_eq!(b.contents(&b.runs()[0])[1200], 2);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn other_destinations_larger_packets_and_limits_start_a_new_run() {
        let mut b = Batch::default();
        assert!(b.push(addr(1), &[0; 500], 2));
        assert!(b.push(addr(2), &[0; 500], 2), "another destination");
        assert!(b.push(addr(2), &[0; 501], 2), "larger than the segment");
        assert!(b.push(addr(2), &[0; 501], 2));
        assert!(b.push(addr(2), &[0; 501], 2), "max segments");
        assert_eq!(
            shape(&b),
            [
                (1, 1, 500, 500),
                (2, 1, 500, 500),
                (2, 2, 501, 1002),
                (2, 1, 501, 501)
            ]
        );
        b.clear();
        for _ in 0..55 {
            assert!(b.push(addr(1), &[0; 1200], 64));
        }
        assert_eq!(b.runs().len(), 2, "64 KB of datagrams at most in a run");
    }

    #[test]
    fn a_full_batch_asks_to_be_sent() {
        let mut b = Batch::default();
        let mut pushed = 0;
        while b.push(addr(pushed as u16), &[0; 1200], 64) {
            pushed += 1;
        }
        assert_eq!(pushed, MAX_BATCH_BYTES / 1200);
        b.clear();
        assert!(b.push(addr(1), &[0; 1200], 64));
    }
}
