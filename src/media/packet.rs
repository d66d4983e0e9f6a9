//! A frame as it is fanned out: the [`Frame`] plus the encodings consumers need of it, each
//! built at most once per node the first time a consumer asks and then shared by all.
//!
//! The packet does not know the protocols. Each protocol declares the encodings it owns as
//! `static` [`Encoding`]s beside its own code (the FLV body and tag in [`super::flv`], RTMP
//! chunks in `rtmp`, RTP payloads in `webrtc`); a new protocol adds a static, not a field
//! here. An encoding takes one of [`MAX_ENCODINGS`] slots the first time it is used.

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::gop::HasFrame;
use super::Frame;

/// How many distinct encodings a node can cache per packet. Using more is a programming
/// error caught by the first test that runs them.
pub const MAX_ENCODINGS: usize = 8;

/// Slots handed out so far (process-wide; each `Encoding` static takes one).
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
const UNASSIGNED: usize = usize::MAX;

/// One cached encoding of a frame, of type `T`, declared as a `static`.
pub struct Encoding<T> {
    /// For logs and panics only.
    name: &'static str,
    /// Whether the encoding holds no absolute time, so a re-timed packet keeps it.
    timeless: bool,
    slot: AtomicUsize,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Send + Sync + 'static> Encoding<T> {
    /// An encoding whose bytes depend on the frame's timestamps.
    pub const fn new(name: &'static str) -> Encoding<T> {
        Encoding {
            name,
            timeless: false,
            slot: AtomicUsize::new(UNASSIGNED),
            _t: std::marker::PhantomData,
        }
    }

    /// An encoding that holds no absolute time (kept by [`Packet::retimed`]).
    pub const fn timeless(name: &'static str) -> Encoding<T> {
        Encoding {
            timeless: true,
            ..Encoding::new(name)
        }
    }

    fn slot(&self) -> usize {
        let slot = self.slot.load(Ordering::Acquire);
        if slot != UNASSIGNED {
            return slot;
        }
        let fresh = NEXT_SLOT.fetch_add(1, Ordering::AcqRel);
        assert!(
            fresh < MAX_ENCODINGS,
            "encoding {} needs a slot: raise MAX_ENCODINGS",
            self.name
        );
        match self
            .slot
            .compare_exchange(UNASSIGNED, fresh, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => fresh,
            // Another thread assigned it first; the fresh slot stays unused.
            Err(won) => won,
        }
    }

    /// This encoding of `packet`, built by `build` if no consumer asked before.
    pub fn get<'p>(&self, packet: &'p Packet, build: impl FnOnce(&Packet) -> T) -> &'p T {
        let slot = self.slot();
        packet.encodings[slot]
            .get_or_init(|| {
                if self.timeless {
                    packet.timeless.fetch_or(1 << slot, Ordering::Relaxed);
                }
                Arc::new(build(packet))
            })
            .downcast_ref::<T>()
            .expect("a slot holds the type of the encoding that owns it")
    }

    /// This encoding of `packet` if it was built already (what the tests look at).
    #[cfg(test)]
    fn cached<'p>(&self, packet: &'p Packet) -> Option<&'p T> {
        packet.encodings[self.slot()].get()?.downcast_ref::<T>()
    }
}

type Cached = OnceLock<Arc<dyn Any + Send + Sync>>;

/// One frame as fanned out, with its lazily built encodings.
pub struct Packet {
    pub frame: Frame,
    encodings: [Cached; MAX_ENCODINGS],
    /// Which slots hold timeless encodings (bit per slot), for [`Packet::retimed`].
    timeless: AtomicUsize,
}

impl std::fmt::Debug for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packet")
            .field("frame", &self.frame)
            .finish()
    }
}

impl Packet {
    pub fn new(frame: Frame) -> Arc<Packet> {
        Arc::new(Packet::bare(frame))
    }

    fn bare(frame: Frame) -> Packet {
        Packet {
            frame,
            encodings: Default::default(),
            timeless: AtomicUsize::new(0),
        }
    }

    /// A packet of which one encoding is already known (RTMP ingest receives the FLV body).
    pub fn with<T: Send + Sync + 'static>(
        frame: Frame,
        encoding: &Encoding<T>,
        value: T,
    ) -> Arc<Packet> {
        let p = Packet::bare(frame);
        p.seed(encoding, value);
        Arc::new(p)
    }

    fn seed<T: Send + Sync + 'static>(&self, encoding: &Encoding<T>, value: T) {
        let slot = encoding.slot();
        let _ = self.encodings[slot].set(Arc::new(value));
        if encoding.timeless {
            self.timeless.fetch_or(1 << slot, Ordering::Relaxed);
        }
    }

    /// This packet with other timestamps (`frame`), keeping the timeless encodings built so
    /// far (shared, not copied).
    pub fn retimed(&self, frame: Frame) -> Arc<Packet> {
        let p = Packet::bare(frame);
        let timeless = self.timeless.load(Ordering::Relaxed);
        for (slot, cached) in self.encodings.iter().enumerate() {
            if timeless & (1 << slot) == 0 {
                continue;
            }
            if let Some(v) = cached.get() {
                let _ = p.encodings[slot].set(v.clone());
            }
        }
        p.timeless.store(timeless, Ordering::Relaxed);
        Arc::new(p)
    }
}

impl HasFrame for Arc<Packet> {
    fn frame(&self) -> &Frame {
        &self.frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Codec, Frame, Timebase};
    use bytes::Bytes;

    static LEN: Encoding<usize> = Encoding::new("test length");
    static BODY: Encoding<Bytes> = Encoding::timeless("test body");

    fn frame(dts: i64) -> Frame {
        Frame {
            codec: Codec::Aac,
            pts: dts,
            dts,
            timebase: Timebase::MILLIS,
            keyframe: true,
            payload: Bytes::from_static(b"abc"),
        }
    }

    #[test]
    fn an_encoding_is_built_once_and_shared() {
        let p = Packet::new(frame(0));
        let mut builds = 0;
        assert_eq!(
            *LEN.get(&p, |p| {
                builds += 1;
                p.frame.payload.len()
            }),
            3
        );
        assert_eq!(*LEN.get(&p, |_| unreachable!("built already")), 3);
        assert_eq!(builds, 1);
        assert_eq!(LEN.cached(&Packet::new(frame(1))), None);
    }

    #[test]
    fn retiming_keeps_a_seeded_timeless_encoding_only() {
        let p = Packet::with(frame(0), &BODY, Bytes::from_static(b"body"));
        let _ = LEN.get(&p, |_| 7);
        let q = p.retimed(frame(40));
        assert_eq!(q.frame.dts, 40);
        assert_eq!(BODY.cached(&q).map(|b| &b[..]), Some(&b"body"[..]));
        assert_eq!(LEN.cached(&q), None);
    }
}
