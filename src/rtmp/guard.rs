//! A guard in front of rml_rtmp's chunk and AMF0 parsers: it reads the same bytes first and
//! refuses input those parsers cannot take safely.
//!
//! rml_rtmp trusts its peer in ways a server on the internet cannot:
//! * rml_amf0 recurses once per nested object or array with no depth limit. About 30,000
//!   levels (~150 KB) overflow a worker thread's stack, and a stack overflow aborts the whole
//!   process (no `catch_unwind` can stop it).
//! * The chunk deserializer reserves a whole message's announced length (up to 16 MiB) before
//!   its bytes arrive, subtracts without checking when a header changes a message's length
//!   midway, and takes any chunk size the peer sets, zero included.
//! * It keeps one partial message for all chunk streams, so interleaved messages corrupt each
//!   other.
//!
//! [`ChunkGuard`] mirrors the deserializer's framing exactly (same header rules, same shared
//! partial message, same extended-timestamp rule) without keeping media payloads: it holds
//! only the bodies of AMF and control messages, which are small and bounded. Before any byte
//! reaches rml_rtmp, the guard checks every message length against its type's bound, the
//! peer's chunk size, that chunk streams do not interleave, and the nesting depth of every
//! AMF0 command and data message (with an iterative scanner that follows rml_amf0's grammar).
//! Anything else is a [`GuardError`] that closes that one connection. It does no I/O.
//!
//! Both directions use it: the server for publishers and players, and the RTMP client that
//! egress uses (a hostile destination server can send the same bytes).

use std::collections::HashMap;

/// Bounds a peer must stay within.
#[derive(Clone, Copy, Debug)]
pub struct GuardLimits {
    /// Largest audio, video or aggregate message (one coded frame).
    pub max_media_message: usize,
    /// Largest AMF command or data message (connect, publish, onMetaData...).
    pub max_command_message: usize,
    /// Deepest nesting of AMF0 objects and arrays in one message.
    pub max_amf_depth: usize,
}

impl Default for GuardLimits {
    fn default() -> Self {
        GuardLimits {
            max_media_message: 8 << 20,
            max_command_message: 64 << 10,
            max_amf_depth: 32,
        }
    }
}

/// Largest control message (set chunk size, acknowledgements, user control...): the
/// largest one defined is 10 bytes.
const MAX_CONTROL_MESSAGE: usize = 64;
/// RTMP's chunk size before the peer sets one.
const INITIAL_CHUNK_SIZE: usize = 128;
/// Chunk sizes above this cannot occur: a message is at most 2^24 - 1 bytes.
const MAX_CHUNK_SIZE: usize = 0xFF_FFFF;
/// A timestamp field with this value announces an extended timestamp.
const EXTENDED_TIMESTAMP: u32 = 0xFF_FFFF;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("message of type {kind} announces {len} bytes (at most {max} allowed)")]
    MessageTooLong { kind: u8, len: usize, max: usize },
    #[error("peer set chunk size {0} (must be 1 to 16777215)")]
    BadChunkSize(u32),
    #[error("chunk on stream {0} continues a message that was never started")]
    NoPreviousChunk(u32),
    #[error(
        "chunk streams interleave (a message on stream {new} began inside one on stream {open})"
    )]
    Interleaved { open: u32, new: u32 },
    #[error("a chunk header changed the length or type of a message midway")]
    HeaderChangedMidMessage,
    #[error("an extended timestamp below 0xFFFFFF")]
    BadExtendedTimestamp,
    #[error("malformed control message of type {0}")]
    BadControl(u8),
    #[error("AMF0 nests deeper than {0} levels")]
    AmfTooDeep(usize),
    #[error("malformed AMF0: {0}")]
    BadAmf(&'static str),
}

/// What the guard remembers of a chunk stream's last header.
#[derive(Clone, Copy, Debug, Default)]
struct StreamHeader {
    timestamp_field: u32,
    length: usize,
    kind: u8,
}

/// A chunk whose payload is being read.
#[derive(Debug)]
struct Chunk {
    csid: u32,
    header: StreamHeader,
    /// Payload bytes in this chunk, and how many are still to come.
    len: usize,
    left: usize,
}

/// The guard's framing state (see the module doc).
#[derive(Debug)]
pub struct ChunkGuard {
    limits: GuardLimits,
    chunk_size: usize,
    headers: HashMap<u32, StreamHeader>,
    /// Header bytes of the chunk being read (at most 3 + 11 + 4).
    header: Vec<u8>,
    /// The chunk whose payload is being read.
    chunk: Option<Chunk>,
    /// Bytes of the message in progress so far (rml_rtmp keeps one for all chunk streams),
    /// and the stream it is on.
    partial: usize,
    partial_csid: u32,
    /// Body of the message in progress when it is a kind the guard inspects.
    body: Vec<u8>,
}

impl ChunkGuard {
    pub fn new(limits: GuardLimits) -> ChunkGuard {
        ChunkGuard {
            limits,
            chunk_size: INITIAL_CHUNK_SIZE,
            headers: HashMap::new(),
            header: Vec::with_capacity(18),
            chunk: None,
            partial: 0,
            partial_csid: 0,
            body: Vec::new(),
        }
    }

    /// Bytes the guard holds: a partial chunk header and the body of the AMF or control
    /// message in progress. Never more than `18 + max_command_message` (the fuzz target
    /// checks it after every input).
    pub fn held_bytes(&self) -> usize {
        self.header.len() + self.body.len()
    }

    /// Reads `bytes` (what came from the peer after the handshake, in order). `Ok` means
    /// rml_rtmp may be given them; an error means the connection must close.
    pub fn inspect(&mut self, mut bytes: &[u8]) -> Result<(), GuardError> {
        while !bytes.is_empty() {
            match &mut self.chunk {
                Some(chunk) => {
                    let take = chunk.left.min(bytes.len());
                    if inspects_body(chunk.header.kind) {
                        self.body.extend_from_slice(&bytes[..take]);
                    }
                    chunk.left -= take;
                    bytes = &bytes[take..];
                    if chunk.left == 0 {
                        self.end_chunk()?;
                    }
                }
                None => {
                    let take = (18 - self.header.len()).min(bytes.len());
                    let before = self.header.len();
                    self.header.extend_from_slice(&bytes[..take]);
                    match self.parse_header()? {
                        Some(used) => {
                            bytes = &bytes[used - before..];
                            self.header.clear();
                        }
                        None => bytes = &bytes[take..],
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses the chunk header in `self.header` once it is complete; returns how many of its
    /// bytes it used. Follows rml_rtmp's `ChunkDeserializer` stage by stage.
    fn parse_header(&mut self) -> Result<Option<usize>, GuardError> {
        let h = &self.header;
        let fmt = h[0] >> 6;
        let (csid, mut at) = match h[0] & 0x3f {
            0 if h.len() < 2 => return Ok(None),
            0 => (h[1] as u32 + 64, 2),
            1 if h.len() < 3 => return Ok(None),
            1 => (h[2] as u32 * 256 + h[1] as u32 + 64, 3),
            x => (x as u32, 1),
        };
        let mut header = match fmt {
            0 => StreamHeader::default(),
            _ => *self
                .headers
                .get(&csid)
                .ok_or(GuardError::NoPreviousChunk(csid))?,
        };
        let fields = [11, 7, 3, 0][fmt as usize];
        if h.len() < at + fields {
            return Ok(None);
        }
        if fmt <= 2 {
            header.timestamp_field = u24(&h[at..]);
        }
        if fmt <= 1 {
            header.length = u24(&h[at + 3..]) as usize;
            header.kind = h[at + 6];
        }
        at += fields;
        if header.timestamp_field >= EXTENDED_TIMESTAMP {
            if h.len() < at + 4 {
                return Ok(None);
            }
            // rml_rtmp subtracts 0xFFFFFF from a delta's extended value unchecked; a value
            // below it is malformed anyway (it is only sent for values that do not fit).
            let ext = u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
            if fmt != 0 && self.partial == 0 && ext < EXTENDED_TIMESTAMP {
                return Err(GuardError::BadExtendedTimestamp);
            }
            at += 4;
        }
        self.begin_chunk(csid, header)?;
        Ok(Some(at))
    }

    fn begin_chunk(&mut self, csid: u32, header: StreamHeader) -> Result<(), GuardError> {
        let max = match header.kind {
            1..=6 => MAX_CONTROL_MESSAGE,
            8 | 9 | 22 => self.limits.max_media_message,
            _ => self.limits.max_command_message,
        };
        if header.length > max {
            return Err(GuardError::MessageTooLong {
                kind: header.kind,
                len: header.length,
                max,
            });
        }
        if self.partial > 0 {
            if csid != self.partial_csid {
                return Err(GuardError::Interleaved {
                    open: self.partial_csid,
                    new: csid,
                });
            }
            let open = self.headers.get(&csid).copied().unwrap_or_default();
            if header.length != open.length || header.kind != open.kind {
                return Err(GuardError::HeaderChangedMidMessage);
            }
        }
        // rml_rtmp's chunk length: the whole message when it fits the chunk size, else what
        // is left of it up to the chunk size.
        let len = if header.length > self.chunk_size {
            (header.length - self.partial).min(self.chunk_size)
        } else {
            header.length
        };
        self.headers.remove(&csid);
        self.chunk = Some(Chunk {
            csid,
            header,
            len,
            left: len,
        });
        if len == 0 {
            self.end_chunk()?;
        }
        Ok(())
    }

    fn end_chunk(&mut self) -> Result<(), GuardError> {
        let Some(Chunk {
            csid, header, len, ..
        }) = self.chunk.take()
        else {
            return Ok(());
        };
        self.partial += len;
        self.partial_csid = csid;
        self.headers.insert(csid, header);
        if self.partial > header.length {
            // Only reachable through a header change, refused above; kept as a backstop.
            return Err(GuardError::HeaderChangedMidMessage);
        }
        if self.partial == header.length {
            self.partial = 0;
            let body = std::mem::take(&mut self.body);
            self.on_message(header.kind, &body)?;
            self.body = body;
            self.body.clear();
        }
        Ok(())
    }

    fn on_message(&mut self, kind: u8, body: &[u8]) -> Result<(), GuardError> {
        match kind {
            1 => {
                let raw: [u8; 4] = body.try_into().map_err(|_| GuardError::BadControl(1))?;
                let size = u32::from_be_bytes(raw);
                if size == 0 || size as usize > MAX_CHUNK_SIZE {
                    return Err(GuardError::BadChunkSize(size));
                }
                self.chunk_size = size as usize;
            }
            15 | 18 | 20 => check_values(kind, body, self.limits.max_amf_depth)?,
            // rml_rtmp reads an "AMF3" command as AMF0 after a leading zero byte.
            17 => {
                let amf = match body.first() {
                    Some(0) => &body[1..],
                    _ => body,
                };
                check_values(kind, amf, self.limits.max_amf_depth)?
            }
            _ => {}
        }
        Ok(())
    }
}

/// Checks an AMF0 command or data message: its depth, and that it has the values rml_rtmp
/// takes without looking (it indexes them and panics on fewer; found by the `rtmp_server`
/// fuzz target). A message rml_rtmp would panic on is refused here instead.
fn check_values(kind: u8, amf: &[u8], max_depth: usize) -> Result<(), GuardError> {
    let values = check_amf0(amf, max_depth)?;
    let (min, what) = match (kind, first_string(amf)) {
        // Name, transaction id, null, stream key, publishing type.
        (17 | 20, Some(b"publish")) => (5, "publish with fewer than 5 values"),
        // Name, transaction id, null, stream key.
        (17 | 20, Some(b"play")) => (4, "play with fewer than 4 values"),
        // Name, transaction id, command object: every command (`drain(..3)`).
        (17 | 20, _) => (3, "command with fewer than 3 values"),
        // "@setDataFrame", "onMetaData", the metadata.
        (15 | 18, Some(b"@setDataFrame")) => (3, "@setDataFrame with fewer than 3 values"),
        _ => (0, ""),
    };
    if values < min {
        return Err(GuardError::BadAmf(what));
    }
    Ok(())
}

/// The first value of an AMF0 message when it is a whole string.
fn first_string(amf: &[u8]) -> Option<&[u8]> {
    let (&0x02, rest) = amf.split_first()? else {
        return None;
    };
    let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    rest.get(2..2 + len)
}

/// Whether the guard keeps a message's body to look into it.
fn inspects_body(kind: u8) -> bool {
    matches!(kind, 1 | 15 | 17 | 18 | 20)
}

fn u24(b: &[u8]) -> u32 {
    (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32
}

/// A container being read by [`check_amf0`].
enum Open {
    /// An object or ECMA array: properties until an empty name and the end marker.
    Object,
    /// A strict array with this many values left.
    Array(u32),
}

/// What reading one value gave.
enum Value {
    /// End of input or the object-end marker: rml_amf0's `None`.
    End,
    Scalar,
    Container(Open),
}

/// Checks that `data` nests no deeper than `max_depth`, reading it the way rml_amf0 does
/// (same markers, same short reads of strings, same end rules) but with an explicit stack
/// instead of recursion; returns how many top-level values rml_amf0 will give. Linear in
/// the input.
pub fn check_amf0(data: &[u8], max_depth: usize) -> Result<usize, GuardError> {
    let mut r = Reader { data, at: 0 };
    let mut stack: Vec<Open> = Vec::new();
    let mut top_level = 0;
    loop {
        let value = match stack.last_mut() {
            None => match r.value()? {
                Value::End => return Ok(top_level),
                v => {
                    top_level += 1;
                    v
                }
            },
            Some(Open::Array(0)) => {
                stack.pop();
                continue;
            }
            Some(Open::Array(left)) => {
                *left -= 1;
                match r.value()? {
                    Value::End => {
                        stack.pop();
                        continue;
                    }
                    v => v,
                }
            }
            Some(Open::Object) => {
                let name = r.u16()? as usize;
                if name == 0 {
                    if r.u8()? != 0x09 {
                        return Err(GuardError::BadAmf("empty property name"));
                    }
                    stack.pop();
                    continue;
                }
                r.skip_short(name);
                match r.value()? {
                    Value::End => return Err(GuardError::BadAmf("property without a value")),
                    v => v,
                }
            }
        };
        if let Value::Container(open) = value {
            if stack.len() >= max_depth {
                return Err(GuardError::AmfTooDeep(max_depth));
            }
            stack.push(open);
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], GuardError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(GuardError::BadAmf("value runs past the end"))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, GuardError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, GuardError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, GuardError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// rml_amf0 reads strings with one `read`, which stops at the end of the input.
    fn skip_short(&mut self, n: usize) {
        self.at = (self.at + n).min(self.data.len());
    }

    fn value(&mut self) -> Result<Value, GuardError> {
        if self.at >= self.data.len() {
            return Ok(Value::End);
        }
        Ok(match self.u8()? {
            0x00 => {
                self.take(8)?;
                Value::Scalar
            }
            0x01 => {
                self.take(1)?;
                Value::Scalar
            }
            0x02 => {
                let n = self.u16()? as usize;
                self.skip_short(n);
                Value::Scalar
            }
            0x03 => Value::Container(Open::Object),
            0x05 | 0x06 => Value::Scalar,
            0x08 => {
                self.u32()?;
                Value::Container(Open::Object)
            }
            0x09 => Value::End,
            0x0a => Value::Container(Open::Array(self.u32()?)),
            _ => return Err(GuardError::BadAmf("unknown marker")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rml_amf0::Amf0Value;

    /// One message as a fmt-0 chunk on `csid` followed by fmt-3 continuations.
    fn chunks(csid: u8, kind: u8, body: &[u8], chunk_size: usize) -> Vec<u8> {
        let mut out = vec![csid];
        let len = body.len() as u32;
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.extend_from_slice(&1u32.to_le_bytes());
        for (i, piece) in body.chunks(chunk_size).enumerate() {
            if i > 0 {
                out.push(0xc0 | csid);
            }
            out.extend_from_slice(piece);
        }
        out
    }

    fn command(values: &[Amf0Value]) -> Vec<u8> {
        rml_amf0::serialize(&values.to_vec()).unwrap()
    }

    fn nested_arrays(depth: usize) -> Vec<u8> {
        let mut body = command(&[
            Amf0Value::Utf8String("connect".into()),
            Amf0Value::Number(1.0),
        ]);
        for _ in 0..depth {
            body.push(0x0a);
            body.extend_from_slice(&1u32.to_be_bytes());
        }
        body.push(0x05);
        body
    }

    #[test]
    fn a_real_connect_passes_in_any_split() {
        let mut obj = std::collections::HashMap::new();
        obj.insert("app".to_string(), Amf0Value::Utf8String("live".into()));
        obj.insert(
            "tcUrl".to_string(),
            Amf0Value::Utf8String("rtmp://127.0.0.1/live".into()),
        );
        let body = command(&[
            Amf0Value::Utf8String("connect".into()),
            Amf0Value::Number(1.0),
            Amf0Value::Object(obj),
        ]);
        let bytes = chunks(3, 20, &body, 128);
        for split in 0..bytes.len() {
            let mut g = ChunkGuard::new(GuardLimits::default());
            g.inspect(&bytes[..split]).unwrap();
            g.inspect(&bytes[split..]).unwrap();
            assert_eq!(g.partial, 0);
        }
    }

    #[test]
    fn deep_amf0_is_refused_before_the_parser_sees_it() {
        let limits = GuardLimits::default();
        check_amf0(&nested_arrays(limits.max_amf_depth), limits.max_amf_depth).unwrap();
        let deep = nested_arrays(30_000);
        assert_eq!(
            check_amf0(&deep, limits.max_amf_depth),
            Err(GuardError::AmfTooDeep(32))
        );
        // Through the chunk layer: 10,000 levels fit in a command message and are refused
        // for their depth; the 30,000 of the crash report are refused for their length.
        let mut g = ChunkGuard::new(limits);
        assert_eq!(
            g.inspect(&chunks(3, 20, &nested_arrays(10_000), 128)),
            Err(GuardError::AmfTooDeep(32))
        );
        let mut g = ChunkGuard::new(limits);
        assert!(matches!(
            g.inspect(&chunks(3, 20, &deep, 128)),
            Err(GuardError::MessageTooLong { kind: 20, .. })
        ));
        // Nested objects and ECMA arrays count too.
        let mut objects = Vec::new();
        for i in 0..100 {
            objects.extend_from_slice(&[0x00, 0x01, b'a']);
            objects.push(if i % 2 == 0 { 0x03 } else { 0x08 });
            if i % 2 == 1 {
                objects.extend_from_slice(&[0, 0, 0, 1]);
            }
        }
        let mut body = vec![0x03];
        body.extend_from_slice(&objects);
        assert_eq!(check_amf0(&body, 32), Err(GuardError::AmfTooDeep(32)));
    }

    #[test]
    fn amf0_scanner_agrees_with_rml_amf0_on_what_parses() {
        let mut obj = std::collections::HashMap::new();
        obj.insert("a".to_string(), Amf0Value::Number(2.0));
        obj.insert(
            "b".to_string(),
            Amf0Value::StrictArray(vec![Amf0Value::Null, Amf0Value::Boolean(true)]),
        );
        obj.insert("c".to_string(), Amf0Value::Object(Default::default()));
        let body = command(&[
            Amf0Value::Utf8String("x".into()),
            Amf0Value::Object(obj),
            Amf0Value::Undefined,
        ]);
        check_amf0(&body, 32).unwrap();
        for cut in 0..body.len() {
            // Whatever rml_amf0 accepts, the scanner accepts (a truncation may be refused by
            // either; the scanner never passes something deeper than its bound).
            let parsed = rml_amf0::deserialize(&mut std::io::Cursor::new(&body[..cut]));
            if parsed.is_ok() {
                check_amf0(&body[..cut], 32).unwrap();
            }
        }
    }

    #[test]
    fn commands_of_fewer_than_three_values_are_refused_before_rml_rtmp_panics() {
        // Found by fuzz/fuzz_targets/rtmp_server.rs: rml_rtmp's command deserializer calls
        // `drain(..3)` on the values and panicked on `"connect", 1` alone; its publish and
        // play handlers and its @setDataFrame handler index further values unchecked.
        let two = command(&[
            Amf0Value::Utf8String("connect".into()),
            Amf0Value::Number(1.0),
        ]);
        for kind in [20u8, 17] {
            let body = if kind == 17 {
                [&[0][..], &two].concat()
            } else {
                two.clone()
            };
            let mut g = ChunkGuard::new(GuardLimits::default());
            assert_eq!(
                g.inspect(&chunks(3, kind, &body, 128)),
                Err(GuardError::BadAmf("command with fewer than 3 values"))
            );
        }
        // Three values pass, and so does AMF0 data (onMetaData) of any count.
        let three = command(&[
            Amf0Value::Utf8String("deleteStream".into()),
            Amf0Value::Number(4.0),
            Amf0Value::Null,
        ]);
        let mut g = ChunkGuard::new(GuardLimits::default());
        g.inspect(&chunks(3, 20, &three, 128)).unwrap();
        g.inspect(&chunks(3, 18, &two, 128)).unwrap();
        // Commands rml_rtmp reads further arguments of, and the metadata frame.
        let string = |s: &str| Amf0Value::Utf8String(s.into());
        let cases = [
            (
                20,
                vec![
                    string("publish"),
                    Amf0Value::Number(5.0),
                    Amf0Value::Null,
                    string("k"),
                ],
            ),
            (
                20,
                vec![string("play"), Amf0Value::Number(5.0), Amf0Value::Null],
            ),
            (18, vec![string("@setDataFrame"), string("onMetaData")]),
            (18, vec![string("@setDataFrame")]),
        ];
        for (kind, values) in cases {
            let mut g = ChunkGuard::new(GuardLimits::default());
            assert!(
                matches!(
                    g.inspect(&chunks(3, kind, &command(&values), 128)),
                    Err(GuardError::BadAmf(_))
                ),
                "{values:?}"
            );
        }
        // Through the server's path: an error for this connection, not a panic.
        let (mut session, _) =
            rml_rtmp::sessions::ServerSession::new(rml_rtmp::sessions::ServerSessionConfig::new())
                .unwrap();
        let mut g = ChunkGuard::new(GuardLimits::default());
        let r = crate::rtmp::feed_server(&mut g, &mut session, &chunks(3, 20, &two, 128));
        assert!(matches!(r, Err(crate::rtmp::RtmpError::Guard(_))));
    }

    #[test]
    fn oversized_messages_are_refused_at_the_header() {
        let mut g = ChunkGuard::new(GuardLimits::default());
        // A command announcing 16 MiB: refused from its 12-byte header alone.
        let header = [3u8, 0, 0, 0, 0xff, 0xff, 0xff, 20, 1, 0, 0, 0];
        assert!(matches!(
            g.inspect(&header),
            Err(GuardError::MessageTooLong { kind: 20, .. })
        ));
        let mut g = ChunkGuard::new(GuardLimits::default());
        let video = [6u8, 0, 0, 0, 0xff, 0xff, 0xff, 9, 1, 0, 0, 0];
        assert!(matches!(
            g.inspect(&video),
            Err(GuardError::MessageTooLong { kind: 9, .. })
        ));
    }

    #[test]
    fn chunk_size_is_followed_and_bounded() {
        let mut g = ChunkGuard::new(GuardLimits::default());
        g.inspect(&chunks(2, 1, &4096u32.to_be_bytes(), 128))
            .unwrap();
        assert_eq!(g.chunk_size, 4096);
        // A 3000-byte video message now comes in one chunk.
        g.inspect(&chunks(6, 9, &[0x17; 3000], 4096)).unwrap();
        assert_eq!(g.partial, 0);
        for bad in [0u32, 0x0100_0000, 0x8000_0000] {
            let mut g = ChunkGuard::new(GuardLimits::default());
            assert_eq!(
                g.inspect(&chunks(2, 1, &bad.to_be_bytes(), 128)),
                Err(GuardError::BadChunkSize(bad))
            );
        }
    }

    #[test]
    fn interleaving_and_length_changes_are_refused() {
        let mut g = ChunkGuard::new(GuardLimits::default());
        let video = chunks(6, 9, &[0x17; 300], 128);
        // First chunk of the video message (12 header bytes + 128), then a new message on
        // another chunk stream.
        g.inspect(&video[..140]).unwrap();
        assert_eq!(
            g.inspect(&chunks(4, 8, &[0xaf; 10], 128)),
            Err(GuardError::Interleaved { open: 6, new: 4 })
        );
        let mut g = ChunkGuard::new(GuardLimits::default());
        g.inspect(&video[..140]).unwrap();
        // A fmt-1 header on the same stream shrinking the message below what arrived.
        let shrink = [0x46u8, 0, 0, 0, 0, 0, 10, 9];
        assert_eq!(g.inspect(&shrink), Err(GuardError::HeaderChangedMidMessage));
        let mut g = ChunkGuard::new(GuardLimits::default());
        assert_eq!(g.inspect(&[0xc5]), Err(GuardError::NoPreviousChunk(5)));
    }

    #[test]
    fn extended_timestamps_are_framed_like_rml_rtmp() {
        let mut g = ChunkGuard::new(GuardLimits::default());
        let body = [0x17u8; 200];
        let mut bytes = vec![6u8, 0xff, 0xff, 0xff, 0, 0, 200, 9, 1, 0, 0, 0, 1, 0, 0, 0];
        bytes.extend_from_slice(&body[..128]);
        // The fmt-3 continuation repeats the extended timestamp.
        bytes.extend_from_slice(&[0xc6, 1, 0, 0, 0]);
        bytes.extend_from_slice(&body[128..]);
        g.inspect(&bytes).unwrap();
        assert_eq!(g.partial, 0);
        assert!(g.chunk.is_none() && g.header.is_empty());
        // A new message with a delta whose extended value is below 0xFFFFFF.
        assert_eq!(
            g.inspect(&[0x86, 0xff, 0xff, 0xff, 0, 0, 0, 5]),
            Err(GuardError::BadExtendedTimestamp)
        );
    }
}
