//! A room as one stream, `room/ROOM~mix.grid` or `room/ROOM~mix.speaker`: made on the node
//! where something asks for it (an egress job, or a viewer), while anything does.
//!
//! The participants' streams are subscribed like any consumer would (pulled over the
//! backbone when published elsewhere), fed to one [`Mixer`] on a thread of its own, and its
//! output is published back to the hub as a derived stream. Participants join and leave the
//! mix as their tracks come and go; the tiles follow the order they joined in, and the
//! speaker layout follows the room's active speaker.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Rooms;
use crate::hub::{Deriver, Hub, Publisher, Scope, Source, StreamEvent};
use crate::media::{Frame, Packet, StreamConfig, StreamKey};
use crate::transcode::mix::{Layout, MixSettings, Mixer};

/// How long a mix nobody consumes keeps running.
const MIX_GRACE: Duration = Duration::from_secs(3);
/// How often the mixer renders (audio in 20 ms steps; pictures at the mix's rate).
const RENDER_EVERY: Duration = Duration::from_millis(20);
/// How often the participants and the speaker are looked up.
const MEMBERS_EVERY: Duration = Duration::from_millis(250);
/// Messages queued toward the mixer thread at most; more are dropped (media, not state).
const MIXER_QUEUE: usize = 2048;

/// The room and layout a mix name stands for.
fn parse_mix(key: &StreamKey) -> Option<(&str, Layout)> {
    let (room, layout) = key.as_room_mix()?;
    Some((room, Layout::parse(layout)?))
}

/// Makes room mixes for the hub.
pub struct MixDeriver(pub Weak<Rooms>);

impl Deriver for MixDeriver {
    fn derives(&self, key: &StreamKey, _base_is_local: bool) -> Option<Source> {
        let (room, _) = parse_mix(key)?;
        self.0.upgrade()?.info(room)?;
        Some(Source::Bridge {
            of: format!("{}/{room}", crate::auth::ROOM_NAMESPACE),
        })
    }

    fn start(&self, hub: Arc<Hub>, publisher: Publisher) {
        let Some(rooms) = self.0.upgrade() else {
            return;
        };
        let Some((room, layout)) = parse_mix(publisher.key()).map(|(r, l)| (r.to_string(), l))
        else {
            return;
        };
        let span = tracing::info_span!("mix", %room, layout = layout.as_str());
        tokio::spawn(tracing::Instrument::instrument(
            run(rooms, hub, room, layout, publisher),
            span,
        ));
    }
}

enum ToMixer {
    Configure(String, Arc<StreamConfig>),
    Frame(String, Arc<Packet>),
    Remove(String),
    Members(Vec<String>, Option<String>),
    Keyframe,
}

enum FromMixer {
    Config(StreamConfig),
    Frame(Frame),
}

/// The mixer's thread: takes what the participants send, renders on its own clock.
fn mixer_thread(layout: Layout, rx: std_mpsc::Receiver<ToMixer>, out: mpsc::Sender<FromMixer>) {
    let mut mixer = match Mixer::new(MixSettings {
        layout,
        ..Default::default()
    }) {
        Ok(m) => m,
        Err(e) => {
            warn!("room mix not started: {e}");
            return;
        }
    };
    let started = Instant::now();
    let mut next = started;
    let (mut order, mut speaker) = (Vec::new(), None);
    let mut published: Option<StreamConfig> = None;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(ToMixer::Configure(id, c)) => {
                if let Err(e) = mixer.configure(&id, &c) {
                    warn!(participant = %id, "not mixed: {e}");
                }
            }
            Ok(ToMixer::Frame(id, p)) => {
                if let Err(e) = mixer.push(&id, &p.frame) {
                    tracing::debug!(participant = %id, "frame not mixed: {e}");
                }
            }
            Ok(ToMixer::Remove(id)) => mixer.remove(&id),
            Ok(ToMixer::Members(o, s)) => (order, speaker) = (o, s),
            Ok(ToMixer::Keyframe) => mixer.force_keyframe(),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() < next {
            continue;
        }
        next += RENDER_EVERY;
        let now_ms = started.elapsed().as_millis() as i64;
        let frames = match mixer.render(now_ms, &order, speaker.as_deref()) {
            Ok(f) => f,
            Err(e) => {
                warn!("room mix failed: {e}");
                return;
            }
        };
        if let Some(c) = mixer
            .output_config()
            .filter(|c| published.as_ref() != Some(c))
        {
            published = Some(c.clone());
            if out.blocking_send(FromMixer::Config(c)).is_err() {
                return;
            }
        }
        if published.is_none() {
            continue;
        }
        for f in frames {
            if out.blocking_send(FromMixer::Frame(f)).is_err() {
                return;
            }
        }
    }
}

/// Feeds one participant's stream to the mixer until it ends or is cancelled.
async fn feed(hub: Arc<Hub>, id: String, key: StreamKey, to: std_mpsc::SyncSender<ToMixer>) {
    let mut sub = match hub.subscribe(&key, Scope::Any).await {
        Ok(s) => s,
        Err(e) => {
            info!(participant = %id, "not mixed: {e}");
            return;
        }
    };
    sub.request_keyframe();
    loop {
        let msg = match sub.next().await {
            Ok(StreamEvent::Config(c)) => ToMixer::Configure(id.clone(), c),
            Ok(StreamEvent::Frame(p)) => ToMixer::Frame(id.clone(), p),
            Ok(StreamEvent::Discontinuity) => continue,
            Err(_) => break,
        };
        if let Err(std_mpsc::TrySendError::Disconnected(_)) = to.try_send(msg) {
            return;
        }
    }
    let _ = to.try_send(ToMixer::Remove(id));
}

async fn run(rooms: Arc<Rooms>, hub: Arc<Hub>, room: String, layout: Layout, mut out: Publisher) {
    let (to_mixer, rx) = std_mpsc::sync_channel(MIXER_QUEUE);
    let (tx, mut from_mixer) = mpsc::channel(256);
    let thread = std::thread::Builder::new()
        .name("room-mix".into())
        .spawn(move || mixer_thread(layout, rx, tx));
    if let Err(e) = thread {
        warn!("room mix not started: {e}");
        return;
    }
    info!("mixing the room");
    let idle = out.idle_waiter(MIX_GRACE);
    tokio::pin!(idle);
    let keyframes = out.keyframe_signal();
    let mut members = tokio::time::interval(MEMBERS_EVERY);
    let mut feeds: HashMap<String, (StreamKey, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut live = false;
    loop {
        tokio::select! {
            _ = &mut idle => {
                info!("no consumers left; room mix stopped");
                break;
            }
            _ = keyframes.wanted() => { let _ = to_mixer.try_send(ToMixer::Keyframe); }
            _ = members.tick() => {
                let Some(list) = rooms.members(&room) else {
                    info!("the room closed; room mix stopped");
                    break;
                };
                let mut tracks: Vec<(u64, String, StreamKey)> = list
                    .into_iter()
                    .filter_map(|m| {
                        let key = StreamKey::parse(&m.track?.stream).ok()?;
                        Some((m.participant.joined_ms, m.participant.identity, key))
                    })
                    .collect();
                tracks.sort();
                feeds.retain(|id, (key, task)| {
                    let keep = !task.is_finished()
                        && tracks.iter().any(|(_, i, k)| i == id && k == key);
                    if !keep {
                        task.abort();
                        let _ = to_mixer.try_send(ToMixer::Remove(id.clone()));
                    }
                    keep
                });
                for (_, id, key) in &tracks {
                    feeds.entry(id.clone()).or_insert_with(|| {
                        let task = tokio::spawn(feed(hub.clone(), id.clone(), key.clone(), to_mixer.clone()));
                        (key.clone(), task)
                    });
                }
                let order = tracks.into_iter().map(|(_, id, _)| id).collect();
                let speaker = rooms.speaker(&room);
                let _ = to_mixer.try_send(ToMixer::Members(order, speaker));
            }
            m = from_mixer.recv() => match m {
                Some(FromMixer::Config(c)) => {
                    out.set_config(c);
                    if !live {
                        out.set_derived_live();
                        live = true;
                    }
                }
                Some(FromMixer::Frame(f)) => out.push(Packet::new(f)),
                None => break,
            },
        }
    }
    for (_, (_, task)) in feeds {
        task.abort();
    }
}
