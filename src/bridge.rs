//! Bridging between protocols: a consumer that needs AAC (RTMP, FLV) or Opus (WebRTC) gets a
//! stream whose audio is in that codec, and a WebRTC viewer of a stream with B-frames gets
//! its video without them.
//!
//! If the stream's audio already is (or there is none), the consumer just subscribes to it.
//! Otherwise it subscribes to a *derived* stream (`name~aac`, `name~opus`) that this node
//! creates on first demand: one task subscribes to the original, passes video through as the
//! very same shared packets, transcodes the audio once ([`crate::transcode`]) and publishes
//! the result for every consumer that needs it. The task ends a grace period after its last
//! consumer leaves, or when the original ends. So audio is transcoded once per stream per
//! node, and only while someone needs it.
//!
//! The **WebRTC rendition** (`name~webrtc`: video re-encoded without B-frames, audio in
//! Opus) is made once in the whole cluster: only on the node the stream is published to
//! ([`Renditions`], the hub's [`Deriver`]). Any other node asks for it by name and relays
//! it over the backbone like a simulcast layer, so edges never transcode it themselves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn, Instrument};

use crate::config::BframePolicy;
use crate::hub::{
    Deriver, Hub, Publisher, Scope, Source, StreamEvent, SubscribeError, Subscription,
};
use crate::media::Packet;
use crate::media::{AudioConfig, Codec, StreamConfig, StreamKey, TrackKind, VideoConfig};
use crate::transcode::{AudioTranscoder, TranscodeError, VideoTranscoder};

/// How long a derived stream outlives its last consumer.
const BRIDGE_GRACE: Duration = Duration::from_secs(3);

/// A re-encoding bridge makes at most one IDR a consumer asked for per this long (a burst
/// of viewers' keyframe requests is answered by one).
const FORCED_KEYFRAME_GAP: Duration = Duration::from_millis(500);

/// How long a WHEP viewer's subscription waits for the first video frames that tell whether
/// the stream has B-frames (a relay that has just started has none yet).
const BFRAMES_WAIT: Duration = Duration::from_secs(2);

/// What a bridge does to the video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VideoWork {
    /// Passed through as the same shared packets.
    Pass,
    /// Re-encoded to H.264 when it is not (VP8 for RTMP/FLV/MP4 egress).
    ToH264,
    /// H.264 re-encoded without B-frames (the WebRTC rendition).
    NoBframes,
}

impl VideoWork {
    fn transcodes(self, codec: Codec) -> bool {
        match self {
            VideoWork::Pass => false,
            VideoWork::ToH264 => codec != Codec::H264,
            VideoWork::NoBframes => codec == Codec::H264,
        }
    }
}

/// Why a WebRTC viewer gets no subscription.
#[derive(Debug, thiserror::Error)]
pub enum WebRtcSubscribeError {
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// The stream has B-frames and `webrtc.bframes = "refuse"`.
    #[error(
        "the stream has B-frames, which browsers' WebRTC decoders cannot play, and this node \
         does not re-encode them (webrtc.bframes = \"refuse\"). Publish without B-frames \
         (x264/ffmpeg: -bf 0; OBS: set B-frames to 0 in the encoder settings), or set \
         webrtc.bframes = \"transcode\""
    )]
    Bframes,
}

/// Subscribes a WebRTC viewer to `key`: its audio in Opus, and, when the stream has
/// B-frames, its WebRTC rendition (or a refusal, as `policy` says).
pub async fn subscribe_for_webrtc(
    hub: &Arc<Hub>,
    key: &StreamKey,
    policy: BframePolicy,
) -> Result<Subscription, WebRtcSubscribeError> {
    // The stream itself first: its audio is bridged only if it is played as it is (the
    // rendition carries Opus already).
    let mut sub = hub.subscribe(key, Scope::Any).await?;
    let h264 = sub
        .initial_config()
        .and_then(|c| c.video.as_ref().map(|v| v.codec == Codec::H264))
        .unwrap_or(true);
    if !h264 || key.is_derived() || !sub.wait_bframes(BFRAMES_WAIT).await {
        return Ok(with_audio(hub, key, sub, Codec::Opus).await?);
    }
    if policy == BframePolicy::Refuse {
        return Err(WebRtcSubscribeError::Bframes);
    }
    drop(sub);
    // Made here if the stream is published here, else pulled from where it is.
    Ok(hub
        .subscribe(&key.base().webrtc_rendition(), Scope::Any)
        .await?)
}

/// Makes streams' WebRTC renditions on the node they are published to (installed in the
/// hub at start; see the module notes).
pub struct Renditions;

impl Deriver for Renditions {
    fn derives(&self, key: &StreamKey, base_is_local: bool) -> Option<Source> {
        (base_is_local && key.is_webrtc_rendition()).then(|| Source::Bridge {
            of: key.base().to_string(),
        })
    }

    fn start(&self, hub: Arc<Hub>, publisher: Publisher) {
        let original = publisher.key().base();
        let span = tracing::info_span!("bridge", stream = %original, to = "webrtc");
        tokio::spawn(
            run(hub, original, Codec::Opus, VideoWork::NoBframes, publisher).instrument(span),
        );
    }
}
/// Why an RTMP/FLV consumer cannot play this subscription's video, if it cannot.
/// (FFmpeg 5.1's FLV and RTMP take H.264 only; video is never transcoded implicitly.)
pub fn flv_incompatible_video(sub: &Subscription) -> Option<String> {
    let config = sub.initial_config()?;
    let video = config.video.as_ref()?;
    (!video.codec.fits_flv()).then(|| {
        format!(
            "the stream's video is {:?}; RTMP and HTTP-FLV carry H.264 only (play it over WHEP)",
            video.codec
        )
    })
}

/// Subscribes to `key` with its audio in `audio` (AAC or Opus), bridging if needed.
pub async fn subscribe_with_audio(
    hub: &Arc<Hub>,
    key: &StreamKey,
    audio: Codec,
) -> Result<Subscription, SubscribeError> {
    let sub = hub.subscribe(key, Scope::Any).await?;
    with_audio(hub, key, sub, audio).await
}

/// `sub`, a subscription to `key`, if its audio is in `audio` (or it has none); else a
/// subscription to the bridged stream.
async fn with_audio(
    hub: &Arc<Hub>,
    key: &StreamKey,
    sub: Subscription,
    audio: Codec,
) -> Result<Subscription, SubscribeError> {
    let needs_bridge = sub
        .initial_config()
        .and_then(|c| c.audio.as_ref().map(|a| a.codec))
        .is_some_and(|codec| codec != audio);
    if !needs_bridge {
        return Ok(sub);
    }
    drop(sub);
    let tag = match audio {
        Codec::Aac => "aac",
        _ => "opus",
    };
    subscribe_bridged(hub, key, tag, audio, VideoWork::Pass).await
}

/// Subscribes to `key` as RTMP/FLV/MP4 take it: video re-encoded to H.264 (when it is not)
/// and audio in AAC. Only for consumers configured to transcode video (`transcode_video`);
/// shared by all of them like the audio bridges (`name~h264`).
pub async fn subscribe_with_h264(
    hub: &Arc<Hub>,
    key: &StreamKey,
) -> Result<Subscription, SubscribeError> {
    subscribe_bridged(hub, key, "h264", Codec::Aac, VideoWork::ToH264).await
}

async fn subscribe_bridged(
    hub: &Arc<Hub>,
    key: &StreamKey,
    tag: &'static str,
    audio: Codec,
    video: VideoWork,
) -> Result<Subscription, SubscribeError> {
    let derived = key.derived(tag);
    let source = Source::Bridge {
        of: key.to_string(),
    };
    let hub2 = hub.clone();
    let original = key.clone();
    hub.subscribe_derived(&derived, source, move |publisher| {
        let span = tracing::info_span!("bridge", stream = %original, to = tag);
        tokio::spawn(run(hub2, original, audio, video, publisher).instrument(span));
    })
    .await
}

/// Runs FFmpeg work on the blocking pool, so decoding and encoding never hold up the async
/// workers that carry every other stream. `None` if the work panicked (the transcoder is
/// then lost).
async fn off_thread<T: Send + 'static, R: Send + 'static>(
    mut t: T,
    work: impl FnOnce(&mut T) -> R + Send + 'static,
) -> Option<(T, R)> {
    tokio::task::spawn_blocking(move || {
        let r = work(&mut t);
        (t, r)
    })
    .await
    .ok()
}

async fn run(hub: Arc<Hub>, original: StreamKey, want: Codec, work: VideoWork, mut out: Publisher) {
    let mut sub = match hub.subscribe(&original, Scope::Any).await {
        Ok(s) => s,
        Err(e) => {
            info!("bridge not started: {e}");
            return;
        }
    };
    match work {
        VideoWork::ToH264 => {
            info!("transcoding video to H.264 and audio to {want:?} for consumers that need it")
        }
        VideoWork::NoBframes => {
            info!("re-encoding video without B-frames and audio to {want:?} for WebRTC viewers")
        }
        VideoWork::Pass => info!("transcoding audio to {want:?} for consumers that need it"),
    }
    if work != VideoWork::Pass {
        sub.request_keyframe();
    }
    let idle = out.idle_waiter(BRIDGE_GRACE);
    tokio::pin!(idle);
    let keyframes = out.keyframe_signal();
    let mut transcoder: Option<(AudioConfig, AudioTranscoder)> = None;
    let mut video: Option<(VideoConfig, VideoTranscoder)> = None;
    // The configuration as published (its video replaced once the encoder has produced one).
    let mut config = StreamConfig::default();
    let mut live = false;
    let mut last_forced: Option<Instant> = None;
    loop {
        let ev = tokio::select! {
            ev = sub.next() => ev,
            _ = &mut idle => {
                info!("no consumers left; bridge stopped");
                return;
            }
            _ = keyframes.wanted() => {
                match video.as_mut() {
                    // Everything is decoded here: the encoder makes the IDR itself, at
                    // once, instead of waiting for the source's (an RTMP source cannot be
                    // asked). Merged: one forced IDR per FORCED_KEYFRAME_GAP at most.
                    Some((_, t)) => {
                        let now = Instant::now();
                        if last_forced.is_none_or(|at| now - at >= FORCED_KEYFRAME_GAP) {
                            t.force_keyframe();
                            last_forced = Some(now);
                        }
                    }
                    None => sub.request_keyframe(),
                }
                continue;
            }
        };
        match ev {
            Ok(StreamEvent::Config(c)) => {
                config = (*c).clone();
                if let Some(audio) = c.audio.as_ref().filter(|a| a.codec != want) {
                    let reuse = transcoder.as_ref().is_some_and(|(from, _)| from == audio);
                    if !reuse {
                        let a = audio.clone();
                        let made =
                            tokio::task::spawn_blocking(move || AudioTranscoder::new(&a, want))
                                .await;
                        transcoder = match made.unwrap_or(Err(TranscodeError::Panicked)) {
                            Ok(t) => Some((audio.clone(), t)),
                            Err(e) => {
                                warn!("cannot bridge audio: {e}; the audio track is dropped");
                                None
                            }
                        };
                    }
                    config.audio = transcoder.as_ref().map(|(_, t)| t.output_config().clone());
                }
                if let Some(v) = c.video.as_ref().filter(|v| work.transcodes(v.codec)) {
                    let reuse = video.as_ref().is_some_and(|(from, _)| from == v);
                    if !reuse {
                        let vc = v.clone();
                        let bitrate = hub.get(&original).and_then(|s| s.bitrate_bps());
                        let made =
                            tokio::task::spawn_blocking(move || VideoTranscoder::new(&vc, bitrate))
                                .await;
                        video = match made.unwrap_or(Err(TranscodeError::Panicked)) {
                            Ok(t) => Some((v.clone(), t)),
                            Err(e) => {
                                warn!("cannot transcode video: {e}; the bridge stops");
                                return;
                            }
                        };
                    }
                    // Published once the encoder has its parameter sets (first keyframe).
                    config.video = video.as_ref().and_then(|(_, t)| t.output_config().cloned());
                    if config.video.is_none() {
                        continue;
                    }
                }
                out.set_config(config.clone());
                if !live {
                    out.set_derived_live();
                    live = true;
                }
            }
            Ok(StreamEvent::Frame(p)) => {
                let f = &p.frame;
                if f.track() == TrackKind::Audio && f.codec != want {
                    if !live {
                        continue;
                    }
                    let Some((from, t)) = transcoder.take() else {
                        continue;
                    };
                    let frame = f.clone();
                    let Some((t, pushed)) = off_thread(t, move |t| t.push(&frame)).await else {
                        warn!("audio transcoder failed; the audio track is dropped");
                        continue;
                    };
                    transcoder = Some((from, t));
                    match pushed {
                        Ok(frames) => {
                            for frame in frames {
                                out.push(Packet::new(frame));
                            }
                        }
                        Err(e) => warn!("audio frame not transcoded: {e}"),
                    }
                } else if video.is_some()
                    && work.transcodes(f.codec)
                    && f.track() == TrackKind::Video
                {
                    let Some((from, t)) = video.take() else {
                        continue;
                    };
                    let frame = f.clone();
                    let Some((t, pushed)) = off_thread(t, move |t| t.push(&frame)).await else {
                        warn!("video transcoder failed; the bridge stops");
                        return;
                    };
                    let (_, t) = video.insert((from, t));
                    let frames = match pushed {
                        Ok(frames) => frames,
                        Err(e) => {
                            warn!("video frame not transcoded: {e}");
                            continue;
                        }
                    };
                    let encoded = t.output_config().cloned();
                    if encoded.is_some() && config.video != encoded {
                        config.video = encoded;
                        out.set_config(config.clone());
                        if !live {
                            out.set_derived_live();
                            live = true;
                        }
                    }
                    for frame in frames {
                        out.push(Packet::new(frame));
                    }
                } else if !live {
                    continue; // waiting for the first encoded keyframe
                } else {
                    // Video (and audio already in the right codec): the same shared packet.
                    out.push(p);
                }
            }
            Ok(StreamEvent::Discontinuity) => {}
            Err(_) => {
                info!("original stream ended");
                return;
            }
        }
    }
}
