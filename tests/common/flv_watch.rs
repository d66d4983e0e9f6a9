//! One HTTP-FLV viewer connection that stays open, with a record of every tag it got:
//! when it arrived, its timestamp, kind. It never reconnects, so "the viewer kept its
//! connection" is simply "the watcher is still reading and saw no end".

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshcast::media::flv::{self, AudioTag, VideoTag};

#[derive(Clone, Copy, Debug)]
pub struct Tag {
    pub at: Instant,
    /// 8 audio, 9 video, 18 script.
    pub kind: u8,
    pub ts_ms: u32,
    pub keyframe: bool,
    /// Not media: AVC/AAC sequence headers, end of sequence, script data.
    pub header: bool,
}

pub struct FlvWatcher {
    tags: Arc<Mutex<Vec<Tag>>>,
    /// Set by the reader when the connection ends (EOF or error), with the reason.
    ended: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlvWatcher {
    /// Opens `GET path` on `http` and reads tags until dropped.
    pub fn start(http: SocketAddr, path: &str) -> FlvWatcher {
        let mut conn = TcpStream::connect(http).expect("connect to HTTP-FLV");
        write!(
            conn,
            // HTTP/1.0: the body comes as it is, ended by the close (no chunking).
            "GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n"
        )
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let tags = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tags, ended, stop) = (tags.clone(), ended.clone(), stop.clone());
            std::thread::spawn(move || {
                // A panic in the reader ends the watch too (with its message), so a test
                // waiting for the end or asserting there was none is not misled.
                let reason = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    read_loop(conn, &tags, &stop)
                }))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("the watcher panicked: {msg}")
                });
                *ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
            })
        };
        FlvWatcher {
            tags,
            ended,
            stop,
            thread: Some(thread),
        }
    }

    pub fn tags(&self) -> Vec<Tag> {
        self.tags.lock().unwrap().clone()
    }

    /// Media tags of `kind` (no sequence headers).
    pub fn media(&self, kind: u8) -> Vec<Tag> {
        self.tags()
            .into_iter()
            .filter(|t| t.kind == kind && !t.header)
            .collect()
    }

    /// `None` while the connection is open.
    pub fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }

    /// Video tags that arrived after `since`.
    pub fn video_after(&self, since: Instant) -> usize {
        self.media(9).iter().filter(|t| t.at > since).count()
    }
}

impl Drop for FlvWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The longest wait between consecutive tags (by arrival) after `since`, and the tag that
/// ended it.
pub fn longest_gap(tags: &[Tag], since: Instant) -> (Duration, Option<Tag>) {
    let mut best = (Duration::ZERO, None);
    for w in tags.windows(2) {
        if w[1].at <= since {
            continue;
        }
        let gap = w[1].at.duration_since(w[0].at.max(since));
        if gap > best.0 {
            best = (gap, Some(w[1]));
        }
    }
    best
}

/// Pairs of consecutive tags whose timestamp goes back (by more than `slack_ms`) or jumps
/// forward by more than `max_step_ms`.
pub fn timestamp_faults(tags: &[Tag], slack_ms: u32, max_step_ms: u32) -> Vec<(u32, u32)> {
    tags.windows(2)
        .filter(|w| {
            let (a, b) = (w[0].ts_ms, w[1].ts_ms);
            b + slack_ms < a || b > a + max_step_ms
        })
        .map(|w| (w[0].ts_ms, w[1].ts_ms))
        .collect()
}

fn read_loop(mut conn: TcpStream, tags: &Mutex<Vec<Tag>>, stop: &AtomicBool) -> String {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    // Response head, then the 9-byte FLV header and the first 4-byte previous-tag size.
    let mut body_started = false;
    let mut pos = 0usize;
    loop {
        if stop.load(Ordering::Acquire) {
            return "stopped".into();
        }
        match conn.read(&mut chunk) {
            Ok(0) => return "server closed the connection".into(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => return format!("read error: {e}"),
        }
        let now = Instant::now();
        if !body_started {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            if !(head.starts_with("HTTP/1.")
                && head.get(8..).is_some_and(|h| h.starts_with(" 200")))
            {
                return format!("bad response: {head}");
            }
            assert!(
                !head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked"),
                "the watcher reads a plain body"
            );
            pos = end + 4 + 9 + 4;
            body_started = true;
        }
        // Tags: 11-byte header, body, 4-byte previous-tag size.
        let mut got = Vec::new();
        while buf.len() >= pos + 11 {
            let h = &buf[pos..pos + 11];
            let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            if buf.len() < pos + 11 + size + 4 {
                break;
            }
            let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
            let body = Bytes::copy_from_slice(&buf[pos + 11..pos + 11 + size]);
            let (keyframe, header) = match h[0] {
                9 => match flv::parse_video_tag(&body) {
                    Ok(VideoTag::Frame { keyframe, .. }) => (keyframe, false),
                    _ => (false, true),
                },
                8 => (
                    true,
                    !matches!(flv::parse_audio_tag(&body), Ok(AudioTag::Frame(_))),
                ),
                _ => (false, true),
            };
            got.push(Tag {
                at: now,
                kind: h[0],
                ts_ms: ts,
                keyframe,
                header,
            });
            pos += 11 + size + 4;
        }
        if !got.is_empty() {
            tags.lock().unwrap().extend(got);
        }
        if pos > 1 << 20 {
            buf.drain(..pos);
            pos = 0;
        }
    }
}
