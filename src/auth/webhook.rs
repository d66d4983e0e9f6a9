//! The auth webhook (`[auth] webhook`): the SRS `on_publish` / MediaMTX `authHTTPAddress`
//! habit. Before a publish or play the node POSTs JSON describing it; a 2xx answer allows,
//! anything else refuses, and so does no answer within the timeout (fail closed). An allow
//! is remembered briefly for the same request, so a player reconnecting does not ask again.
//!
//! Also the one small HTTP/1.1 client the node needs ([`post_json`]), shared with the event
//! hook. `http://` only: put a local proxy in front of an `https://` service.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use tracing::warn;

use super::{Access, Denied};

/// Cached allows kept at most; past it the cache is emptied (it only saves round trips).
const MAX_CACHED: usize = 10_000;
/// Bytes of a hook's answer read at most.
const MAX_ANSWER: usize = 64 * 1024;

pub use crate::config::HookUrl;

/// POSTs `body` as JSON to `url`; returns the status code. Everything (connect, send,
/// answer) must fit in `timeout`.
pub async fn post_json(url: &HookUrl, body: Vec<u8>, timeout: Duration) -> Result<u16, String> {
    tokio::time::timeout(timeout, post_inner(url, body))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn post_inner(url: &HookUrl, body: Vec<u8>) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(url.authority())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let path = url.path_and_query();
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "meshcast")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        // Read (a bounded part of) the answer so the connection ends cleanly.
        let mut body = resp.into_body();
        let mut read = 0;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > MAX_ANSWER {
                break;
            }
        }
        Ok(status)
    }
    .await;
    driver.abort();
    result
}

/// The auth webhook with its cache of recent allows.
pub struct AuthWebhook {
    url: HookUrl,
    timeout: Duration,
    cache_for: Duration,
    allowed: Mutex<HashMap<String, Instant>>,
}

impl AuthWebhook {
    pub fn new(url: &str, timeout: Duration, cache_for: Duration) -> Result<AuthWebhook, String> {
        Ok(AuthWebhook {
            url: HookUrl::parse(url)?,
            timeout,
            cache_for,
            allowed: Mutex::new(HashMap::new()),
        })
    }

    pub async fn ask(&self, access: &Access<'_>, node_id: &str) -> Result<(), Denied> {
        let body = serde_json::json!({
            "action": access.action.as_str(),
            "protocol": access.protocol,
            "stream": access.stream.to_string(),
            "namespace": access.stream.namespace(),
            "name": access.stream.name(),
            "client": access.client.ip().to_string(),
            "client_port": access.client.port(),
            "query": access.query,
            "node": node_id,
        });
        let cache_key = format!(
            "{}|{}|{}|{}|{}",
            access.action.as_str(),
            access.protocol,
            access.stream,
            access.client.ip(),
            access.query
        );
        let now = Instant::now();
        if self
            .allowed
            .lock()
            .get(&cache_key)
            .is_some_and(|until| *until > now)
        {
            return Ok(());
        }
        let body = serde_json::to_vec(&body).unwrap_or_default();
        match post_json(&self.url, body, self.timeout).await {
            Ok(status) if (200..300).contains(&status) => {
                if !self.cache_for.is_zero() {
                    let mut cache = self.allowed.lock();
                    if cache.len() >= MAX_CACHED {
                        cache.retain(|_, until| *until > now);
                        if cache.len() >= MAX_CACHED {
                            cache.clear();
                        }
                    }
                    cache.insert(cache_key, now + self.cache_for);
                }
                Ok(())
            }
            Ok(status) => Err(Denied {
                status: 403,
                reason: format!("refused by the auth webhook (it answered {status})"),
            }),
            Err(e) => {
                warn!("auth webhook failed, refusing: {e}");
                Err(Denied {
                    status: 403,
                    reason: "the auth webhook did not answer; refused".into(),
                })
            }
        }
    }
}
