//! Bounds and checks on what participants send (sans-IO): the rate limit, identities,
//! room ids and display names.

use std::time::Instant;

use serde::Deserialize;

use crate::config::RoomsConfig;

/// What a participant may send on its event channel, checked.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    /// To the room, or to one participant (`to`, a whisper).
    Data {
        payload: serde_json::Value,
        to: Option<String>,
    },
    Mute {
        video: bool,
        muted: bool,
    },
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Wire {
    Data {
        payload: serde_json::Value,
        #[serde(default)]
        to: Option<String>,
    },
    Mute {
        kind: String,
        muted: bool,
    },
}

impl ClientMessage {
    /// One text frame: within `max_message_bytes` and the rate, and well formed; `Err`
    /// says why not, for the participant.
    pub fn parse(
        text: &str,
        config: &RoomsConfig,
        rate: &mut RateLimit,
        now: Instant,
    ) -> Result<ClientMessage, String> {
        if text.len() > config.max_message_bytes {
            return Err(format!(
                "message of {} bytes refused: at most {} (rooms.max_message_bytes)",
                text.len(),
                config.max_message_bytes
            ));
        }
        if !rate.take(now) {
            return Err(format!(
                "message refused: at most {} a second (rooms.messages_per_s)",
                config.messages_per_s
            ));
        }
        match serde_json::from_str(text).map_err(|e| format!("malformed message: {e}"))? {
            Wire::Data { payload, to } => Ok(ClientMessage::Data { payload, to }),
            Wire::Mute { kind, muted } => match kind.as_str() {
                "audio" => Ok(ClientMessage::Mute {
                    video: false,
                    muted,
                }),
                "video" => Ok(ClientMessage::Mute { video: true, muted }),
                _ => Err("mute kind must be audio or video".into()),
            },
        }
    }
}

/// A token bucket: `rate` per second on average, `burst` at once.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate: u32, burst: u32, now: Instant) -> RateLimit {
        RateLimit {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A participant identity: 1-64 of `A-Z a-z 0-9 _ - .`, not starting with `.` (it names
/// the participant's stream, `room/ROOM.IDENTITY`).
pub fn valid_identity(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// A room id as this node makes them: 1-32 ASCII letters and digits.
pub fn valid_room_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|c| c.is_ascii_alphanumeric())
}

/// A display name: at most 64 characters, control characters dropped.
pub fn clean_name(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}
