//! The web console (`/console`): one static page that polls the REST API, with the
//! vendored HTTP-FLV player it uses; and the meeting page of
//! rooms (`/meet`, the file `examples/meeting.html`, which also works from anywhere).

/// The meeting page: plain HTML and JavaScript, nothing fetched from elsewhere.
pub const MEETING: &str = include_str!("../../examples/meeting.html");

/// The console (`/console`): one page that polls the REST API with the admin token it is
/// given, and draws the cluster, the streams, the egress jobs, and plays a stream.
pub const PAGE: &str = include_str!("console.html");

/// mpegts.js, the HTTP-FLV player the console falls back to (vendored: `assets/README.md`).
pub const MPEGTS_JS: &str = include_str!("assets/mpegts.js");
/// Its licence (Apache-2.0) and the notice of what it bundles.
pub const MPEGTS_LICENSE: &str = concat!(
    include_str!("assets/mpegts.LICENSE"),
    "\n\n",
    include_str!("assets/mpegts.js.LICENSE.txt")
);
