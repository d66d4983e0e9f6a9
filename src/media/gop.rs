//! The GOP cache: the frames since the latest video keyframe, so that a viewer who joins
//! mid-stream starts decoding at once instead of waiting for the next keyframe.
//!
//! Bounded in bytes and frames: a GOP that outgrows the bound is dropped and caching resumes
//! at the next keyframe (late joiners then wait for it, as they would without a cache).
//! Audio-only streams keep a short window of recent frames instead.

use std::collections::VecDeque;

use super::{Frame, TrackKind};

/// Anything that carries a frame (the hub caches shared packets, tests cache frames).
pub trait HasFrame: Clone {
    fn frame(&self) -> &Frame;
}

impl HasFrame for Frame {
    fn frame(&self) -> &Frame {
        self
    }
}

/// Audio frames kept for an audio-only stream (about a second of AAC).
const AUDIO_ONLY_WINDOW: usize = 48;
/// Frame-count bound, whatever their size.
const MAX_FRAMES: usize = 4096;

#[derive(Debug)]
pub struct GopCache<T> {
    entries: VecDeque<T>,
    bytes: usize,
    max_bytes: usize,
    /// The cache starts with a video keyframe (or the stream is audio-only).
    anchored: bool,
}

impl<T: HasFrame> GopCache<T> {
    pub fn new(max_bytes: usize) -> Self {
        GopCache {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
            anchored: false,
        }
    }

    /// Adds a frame. `has_video` says whether the stream has a video track: without one,
    /// the cache keeps a short window of audio.
    pub fn push(&mut self, entry: T, has_video: bool) {
        let frame = entry.frame();
        let size = frame.payload.len();
        if frame.is_video_keyframe() {
            self.clear();
            self.anchored = true;
        } else if !has_video && frame.track() == TrackKind::Audio {
            self.anchored = true;
            if self.entries.len() >= AUDIO_ONLY_WINDOW {
                if let Some(old) = self.entries.pop_front() {
                    self.bytes -= old.frame().payload.len();
                }
            }
        } else if !self.anchored {
            return;
        }
        if self.bytes + size > self.max_bytes || self.entries.len() >= MAX_FRAMES {
            // This GOP is too large to keep; start again at the next keyframe.
            self.clear();
            return;
        }
        self.bytes += size;
        self.entries.push_back(entry);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.anchored = false;
    }

    /// The cached frames, oldest (the keyframe) first.
    pub fn snapshot(&self) -> Vec<T> {
        self.entries.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Codec, Timebase};
    use bytes::Bytes;

    fn frame(codec: Codec, dts: i64, keyframe: bool, size: usize) -> Frame {
        Frame {
            codec,
            dts,
            pts: dts,
            timebase: Timebase::MILLIS,
            keyframe,
            payload: Bytes::from(vec![0; size]),
        }
    }

    #[test]
    fn starts_at_latest_keyframe_and_keeps_interleaved_audio() {
        let mut c = GopCache::new(1 << 20);
        c.push(frame(Codec::Aac, 0, true, 10), true); // before any keyframe: not cached
        c.push(frame(Codec::H264, 0, false, 10), true); // not decodable alone: not cached
        assert!(c.is_empty());
        c.push(frame(Codec::H264, 33, true, 100), true);
        c.push(frame(Codec::Aac, 40, true, 10), true);
        c.push(frame(Codec::H264, 66, false, 50), true);
        assert_eq!(c.len(), 3);
        c.push(frame(Codec::H264, 99, true, 100), true);
        let snap = c.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].dts, 99);
        assert_eq!(c.bytes(), 100);
    }

    #[test]
    fn oversized_gop_is_dropped_until_next_keyframe() {
        let mut c = GopCache::new(250);
        c.push(frame(Codec::H264, 0, true, 100), true);
        c.push(frame(Codec::H264, 1, false, 100), true);
        c.push(frame(Codec::H264, 2, false, 100), true); // would exceed 250
        assert!(c.is_empty());
        c.push(frame(Codec::H264, 3, false, 10), true); // still waiting for a keyframe
        assert!(c.is_empty());
        c.push(frame(Codec::H264, 4, true, 10), true);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn audio_only_stream_keeps_a_window() {
        let mut c = GopCache::new(1 << 20);
        for i in 0..100 {
            c.push(frame(Codec::Aac, i, true, 10), false);
        }
        assert_eq!(c.len(), AUDIO_ONLY_WINDOW);
        assert_eq!(c.snapshot()[0].dts, 100 - AUDIO_ONLY_WINDOW as i64);
    }
}
