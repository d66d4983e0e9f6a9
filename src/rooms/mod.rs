//! Rooms: meetings and voice rooms, whose participants publish and watch one another.
//!
//! * [`state`] (sans-IO) holds the rooms this node knows and turns every change into the
//!   events participants receive.
//! * [`Rooms`] is the driver: it keeps the event channels of the participants connected
//!   here ([`Membership`], one per WebSocket, served by `api::rooms`), delivers each event
//!   to them in the order the table made it, watches the hub for participants' streams
//!   (`room/ROOM.IDENTITY`, published over WHIP like any stream) and runs the timers.
//!
//! Media never passes through here: a participant publishes its stream over WHIP and
//! plays the others' over WHEP, each stream a normal stream of the hub, so it crosses the
//! backbone once per node that needs it, like any other.

pub mod checks;
pub mod cluster;
pub mod diff;
pub mod mix;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::auth::{room_stream, ROOM_NAMESPACE};
use crate::config::RoomsConfig;
use crate::hub::{Hub, HubEvent};
use crate::media::StreamKey;
use state::RoomTable;
pub use state::{Event, Member, Participant, RoomError, RoomInfo, Track};

/// Events queued toward one participant at most; a participant that lets more pile up
/// (it stopped reading) is disconnected rather than grow the node.
const EVENT_QUEUE: usize = 1024;
/// How often the room timers run.
const TICK: Duration = Duration::from_millis(500);

/// What the event channel of one participant sends next.
#[derive(Debug)]
pub enum Outgoing {
    /// A JSON text frame.
    Text(Arc<str>),
    /// Close the channel with a WebSocket close code and a reason.
    Close(u16, String),
}

/// WebSocket close codes (4000-4999: the application's own).
pub mod close {
    /// The same identity joined again (here or on another node).
    pub const REPLACED: u16 = 4001;
    /// The room was closed.
    pub const ROOM_CLOSED: u16 = 4002;
    /// The participant did not read its events.
    pub const TOO_SLOW: u16 = 4003;
    /// Too many refused messages in a row.
    pub const POLICY: u16 = 1008;
}

struct Local {
    session: u64,
    tx: mpsc::Sender<Outgoing>,
}

/// The rooms of this node (see the module doc).
pub struct Rooms {
    me: String,
    config: RoomsConfig,
    table: Mutex<RoomTable>,
    /// Participants connected here: room → identity → channel. Locked after `table`.
    local: Mutex<HashMap<String, HashMap<String, Local>>>,
    hub: Arc<Hub>,
    /// The room bus, once the node has a backbone (`cluster.rs`).
    cluster: OnceLock<cluster::Cluster>,
    /// Data messages sent from here (their ids on the bus).
    data_seq: AtomicU64,
    last_refresh: Mutex<Instant>,
}

/// One participant's presence through this node: its events arrive on `events`. Dropping
/// it leaves the room with the reason last set (`left` unless told otherwise).
pub struct Membership {
    rooms: Arc<Rooms>,
    pub room: String,
    pub identity: String,
    pub session: u64,
    pub events: mpsc::Receiver<Outgoing>,
    reason: &'static str,
}

impl Membership {
    /// Why the participant is leaving, told to the others when this is dropped.
    pub fn set_reason(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.rooms
            .leave(&self.room, &self.identity, self.session, self.reason);
    }
}

impl Rooms {
    pub fn new(me: &str, config: RoomsConfig, hub: Arc<Hub>) -> Arc<Rooms> {
        Arc::new(Rooms {
            me: me.to_string(),
            table: Mutex::new(RoomTable::with_incarnation(
                me,
                config.max_rooms,
                crate::clock::unix_ms(),
            )),
            config,
            local: Mutex::new(HashMap::new()),
            hub,
            cluster: OnceLock::new(),
            data_seq: AtomicU64::new(0),
            last_refresh: Mutex::new(Instant::now()),
        })
    }

    pub fn config(&self) -> &RoomsConfig {
        &self.config
    }

    /// Runs the timers and watches the hub for participants' streams until `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let rooms = self.clone();
        let mut hub_events = self.hub.events();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => rooms.tick(Instant::now()),
                    e = hub_events.recv() => match e {
                        Ok(HubEvent::Published(key)) => rooms.stream_changed(&key, true),
                        Ok(HubEvent::Unpublished(key)) => rooms.stream_changed(&key, false),
                        Err(RecvError::Lagged(_)) => rooms.resync_tracks(),
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
    }

    /// Creates a room; `name`, `max_participants` and `empty_timeout_s` default from the
    /// config and may not exceed it.
    pub fn create(
        &self,
        name: Option<&str>,
        max_participants: Option<u32>,
        empty_timeout_s: Option<u64>,
    ) -> Result<RoomInfo, RoomError> {
        let max = max_participants.unwrap_or(self.config.max_participants);
        if !(1..=self.config.max_participants).contains(&max) {
            return Err(RoomError::Invalid(format!(
                "max_participants must be between 1 and {}",
                self.config.max_participants
            )));
        }
        let timeout = empty_timeout_s.unwrap_or(self.config.empty_timeout.as_secs());
        if !(1..=crate::config::MAX_EMPTY_TIMEOUT_S).contains(&timeout) {
            return Err(RoomError::Invalid(format!(
                "empty_timeout_s must be between 1 and {}",
                crate::config::MAX_EMPTY_TIMEOUT_S
            )));
        }
        let name = state::clean_name(name.unwrap_or_default());
        let info = RoomInfo {
            // 22 characters of 62: 130 bits, unguessable.
            id: crate::webrtc::random_token(22),
            name,
            max_participants: max,
            empty_timeout_s: timeout,
            created_ms: crate::clock::unix_ms(),
        };
        let made = self.table.lock().create(info, Instant::now())?;
        info!(room = %made.id, "room created");
        self.announce_room(&made);
        Ok(made)
    }

    pub fn info(&self, room: &str) -> Option<RoomInfo> {
        self.table.lock().info(room).cloned()
    }

    /// Every room with its participant count.
    pub fn list(&self) -> Vec<(RoomInfo, usize)> {
        self.table
            .lock()
            .rooms()
            .map(|(i, n)| (i.clone(), n))
            .collect()
    }

    pub fn members(&self, room: &str) -> Option<Vec<Member>> {
        self.table.lock().members(room)
    }

    /// The room's active speaker.
    pub fn speaker(&self, room: &str) -> Option<String> {
        self.table.lock().speaker(room).map(str::to_string)
    }

    /// Closes a room everywhere: its participants are told and disconnected, its streams
    /// end. `false` if there is no such room.
    pub fn delete(&self, room: &str, reason: &str) -> bool {
        let closed = self.close_here(room, reason);
        if closed {
            self.announce_closed(room);
        }
        closed
    }

    /// Closes a room on this node (see [`Rooms::delete`]).
    fn close_here(&self, room: &str, reason: &str) -> bool {
        let mut table = self.table.lock();
        let Some(event) = table.remove(room, reason, Instant::now()) else {
            return false;
        };
        let gone = self.local.lock().remove(room).unwrap_or_default();
        drop(table);
        let text = to_json(&event);
        for (_, l) in gone {
            let _ = l.tx.try_send(Outgoing::Text(text.clone()));
            let _ =
                l.tx.try_send(Outgoing::Close(close::ROOM_CLOSED, reason.into()));
        }
        self.end_streams(room, reason);
        info!(%room, "room closed: {reason}");
        true
    }

    /// Ends the streams of `room` published here.
    fn end_streams(&self, room: &str, reason: &str) {
        for key in self.hub.local_streams() {
            if room_stream(&key).is_some_and(|(r, _)| r == room) {
                self.hub.evict(&key, reason);
            }
        }
    }

    /// Local participants at most: checked before a WebSocket is accepted.
    pub fn has_room_for_one_more(&self) -> bool {
        let n: usize = self.local.lock().values().map(HashMap::len).sum();
        n < self.config.max_local_participants
    }

    /// `identity` joins `room` through this node. Its channel starts with a `welcome`
    /// (the room, who it is, the others and their tracks, the speaker); the others are
    /// told it joined. An earlier session of the same identity here is closed.
    pub fn join(
        self: &Arc<Self>,
        room: &str,
        identity: &str,
        name: &str,
    ) -> Result<Membership, RoomError> {
        if !state::valid_identity(identity) {
            return Err(RoomError::Invalid(
                "identity must be 1-64 of A-Z a-z 0-9 _ - . (not starting with .)".into(),
            ));
        }
        let session: u64 = rand::random();
        let participant = Participant {
            identity: identity.to_string(),
            name: state::clean_name(name),
            session,
            node: self.me.clone(),
            joined_ms: crate::clock::unix_ms(),
            audio_muted: false,
            video_muted: false,
        };
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let mut table = self.table.lock();
        let events = table.join(room, participant.clone(), Instant::now())?;
        let others: Vec<Member> = table
            .members(room)
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.participant.identity != identity)
            .collect();
        let welcome = serde_json::json!({
            "type": "welcome",
            "room": table.info(room),
            "you": participant,
            "participants": others,
            "speaker": table.speaker(room),
        });
        let _ = tx.try_send(Outgoing::Text(welcome.to_string().into()));
        let old = self
            .local
            .lock()
            .entry(room.to_string())
            .or_default()
            .insert(identity.to_string(), Local { session, tx });
        if let Some(old) = old {
            let _ = old.tx.try_send(Outgoing::Close(
                close::REPLACED,
                "the same identity joined again".into(),
            ));
        }
        self.deliver(room, &events);
        let slice = table.my_slice(room);
        drop(table);
        self.announce_slice(slice);
        debug!(%room, %identity, "participant joined");
        Ok(Membership {
            rooms: self.clone(),
            room: room.to_string(),
            identity: identity.to_string(),
            session,
            events: rx,
            reason: "left",
        })
    }

    fn leave(&self, room: &str, identity: &str, session: u64, reason: &'static str) {
        let mut table = self.table.lock();
        let events = table.leave(room, identity, session, reason, Instant::now());
        {
            let mut local = self.local.lock();
            if let Some(members) = local.get_mut(room) {
                if members.get(identity).is_some_and(|l| l.session == session) {
                    members.remove(identity);
                }
                if members.is_empty() {
                    local.remove(room);
                }
            }
        }
        self.deliver(room, &events);
        let slice = table.my_slice(room);
        drop(table);
        self.announce_slice(slice);
        debug!(%room, %identity, reason, "participant left");
    }

    /// A participant here says its audio or video is (un)muted.
    pub fn set_muted(&self, m: &Membership, video: bool, muted: bool) {
        let mut table = self.table.lock();
        let events = table.set_muted(&m.room, &m.identity, video, muted, Instant::now());
        self.deliver(&m.room, &events);
        let slice = table.my_slice(&m.room);
        drop(table);
        self.announce_slice(slice);
    }

    /// A data message from a participant here: to everyone else in the room, or (a
    /// whisper, `to`) to that one participant only. The payload is never logged.
    pub fn send_data(
        &self,
        m: &Membership,
        to: Option<&str>,
        payload: serde_json::Value,
    ) -> Result<(), String> {
        let table = self.table.lock();
        let target_node = match to {
            Some(target) if target == m.identity => {
                return Err("a whisper goes to another participant".into())
            }
            Some(target) => match table.member(&m.room, target) {
                Some(t) => Some(t.participant.node.clone()),
                None => return Err(format!("no participant {target} in this room")),
            },
            None => None,
        };
        drop(table);
        match (to, target_node) {
            (Some(target), Some(node)) if node == self.me => {
                let event = Event::Data {
                    from: m.identity.clone(),
                    whisper: true,
                    payload,
                };
                self.deliver_data(&m.room, &event, Some(target), None);
            }
            (Some(target), Some(node)) => {
                self.data_out(&m.room, &m.identity, Some((target, &node)), &payload)
            }
            _ => {
                self.data_out(&m.room, &m.identity, None, &payload);
                let event = Event::Data {
                    from: m.identity.clone(),
                    whisper: false,
                    payload,
                };
                self.deliver_data(&m.room, &event, None, Some(&m.identity));
            }
        }
        Ok(())
    }

    /// Hands a data message to the participants here: `only` that one (a whisper), or all
    /// but `except` (its sender).
    fn deliver_data(&self, room: &str, event: &Event, only: Option<&str>, except: Option<&str>) {
        let text = to_json(event);
        let local = self.local.lock();
        let Some(members) = local.get(room) else {
            return;
        };
        match only {
            Some(target) => {
                if let Some(l) = members.get(target) {
                    let _ = l.tx.try_send(Outgoing::Text(text));
                }
            }
            None => {
                for (identity, l) in members {
                    if Some(identity.as_str()) != except {
                        let _ = l.tx.try_send(Outgoing::Text(text.clone()));
                    }
                }
            }
        }
    }

    /// Hands `events` of `room` to its participants here, in order; a participant is not
    /// told of its own join or leave. One whose queue is full is disconnected.
    /// Called with the table locked, so every participant sees one order.
    fn deliver(&self, room: &str, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let mut local = self.local.lock();
        let Some(members) = local.get_mut(room) else {
            return;
        };
        let texts: Vec<(Option<&str>, Arc<str>)> =
            events.iter().map(|e| (e.about(), to_json(e))).collect();
        let mut slow = Vec::new();
        for (identity, l) in members.iter() {
            for (about, text) in &texts {
                if *about == Some(identity.as_str()) {
                    continue;
                }
                if l.tx.try_send(Outgoing::Text(text.clone())).is_err() {
                    slow.push(identity.clone());
                    break;
                }
            }
        }
        for identity in slow {
            if let Some(l) = members.remove(&identity) {
                // The queue is full: the close goes through a task that waits for room.
                let tx = l.tx;
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        tx.send(Outgoing::Close(
                            close::TOO_SLOW,
                            "events were not read".into(),
                        )),
                    )
                    .await;
                });
            }
        }
    }

    /// A stream started or ended here: a participant's track when it is a room stream.
    fn stream_changed(&self, key: &StreamKey, published: bool) {
        let Some((room, identity)) = room_stream(key) else {
            return;
        };
        if key.is_derived() || identity.is_empty() {
            return;
        }
        let mut table = self.table.lock();
        if table.info(room).is_none() {
            drop(table);
            if published {
                self.hub.evict(key, "no such room");
            }
            return;
        }
        let track = published.then(|| Track {
            stream: key.to_string(),
            node: self.me.clone(),
            level: 127,
        });
        let events = table.set_track(room, identity, track, Instant::now());
        self.deliver(room, &events);
        let slice = table.my_slice(room);
        drop(table);
        self.announce_slice(slice);
    }

    /// After missing hub events: the tracks are set again from the streams published here.
    fn resync_tracks(&self) {
        for key in self.hub.local_streams() {
            if key.namespace() == ROOM_NAMESPACE {
                self.stream_changed(&key, true);
            }
        }
    }

    fn tick(&self, now: Instant) {
        let mut table = self.table.lock();
        let (closed, changed) = table.tick(now);
        for (room, events) in &changed {
            self.deliver(room, events);
        }
        drop(table);
        for room in closed {
            self.local.lock().remove(&room);
            self.end_streams(&room, "the room closed");
            self.announce_closed(&room);
            info!(%room, "room closed: empty for its timeout");
        }
        self.read_levels(now);
        let refresh = {
            let mut last = self.last_refresh.lock();
            let due = now.duration_since(*last) >= cluster::REFRESH;
            if due {
                *last = now;
            }
            due
        };
        if refresh {
            self.refresh_slices();
        }
    }
}

impl Rooms {
    /// The audio levels of the room streams published here since the last tick: the
    /// active speaker, and the other nodes told when a level moved.
    fn read_levels(&self, now: Instant) {
        let mut by_room: HashMap<String, Vec<(String, u8)>> = HashMap::new();
        for key in self.hub.local_streams() {
            if key.is_derived() {
                continue;
            }
            if let Some((room, identity)) = room_stream(&key).filter(|(_, i)| !i.is_empty()) {
                if let Some(stream) = self.hub.get(&key) {
                    by_room
                        .entry(room.to_string())
                        .or_default()
                        .push((identity.to_string(), stream.take_audio_level()));
                }
            }
        }
        for (room, levels) in by_room {
            let mut table = self.table.lock();
            let (events, moved) = table.set_levels(&room, &levels, now);
            self.deliver(&room, &events);
            if moved {
                let slice = table.my_slice(&room);
                drop(table);
                self.announce_slice(slice);
            }
        }
    }
}

fn to_json(e: &Event) -> Arc<str> {
    serde_json::to_string(e)
        .unwrap_or_else(|_| String::from("{}"))
        .into()
}
