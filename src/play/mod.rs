//! Viewer-facing outputs that are not part of a bidirectional protocol session
//! (RTMP play lives with RTMP ingest in [`crate::rtmp`], since one connection does either).

pub mod flv;
