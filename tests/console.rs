//! The web console in headless Chromium, against a three-node cluster with a live stream:
//! it needs an admin token, draws the nodes, their links and which origin serves the edge,
//! lists the stream with its codecs, and its player decodes frames over WHEP and over
//! HTTP-FLV (the vendored mpegts.js). Screenshots go to `target/console-*.png`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::{in_private_network, Browser};
use common::cdp::DevTools;
use common::flv_watch::FlvWatcher;
use common::*;
use meshcast::auth::Action;
use serde_json::Value;

const SECRET: &str = "console-test-secret-0123456789";

fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("console-{name}.png"))
}

#[test]
fn the_console_draws_the_cluster_and_plays_a_stream() {
    if !in_private_network("the_console_draws_the_cluster_and_plays_a_stream") {
        return;
    }
    let auth = format!("\n[auth]\nsecrets = [\"{SECRET}\"]\n");
    let (a_quic, b_quic) = (node_addr(), node_addr());
    let origin = |id: &str, region: &str, peer, quic| {
        let mut spec = NodeSpec::origin(id);
        spec.region = region.into();
        spec.upstreams = vec![peer];
        spec.extra = auth.clone();
        let mut n = NodeProc::start_at(spec, quic);
        n.admin_token = Some(sign(SECRET, &claims(Action::Admin, &[])));
        n
    };
    let a = origin("origin-eu", "eu", b_quic, a_quic);
    let _b = origin("origin-us", "us", a_quic, b_quic);
    let mut spec = NodeSpec::edge("edge-us", vec![b_quic]);
    spec.region = "us".into();
    spec.extra = auth.clone();
    let mut edge = NodeProc::start(spec);
    edge.admin_token = a.admin_token.clone();
    a.wait_for_link_count(2);
    edge.wait_for_link_count(1);

    let publish = sign(SECRET, &claims(Action::Publish, &["live/*"]));
    let _publisher = publish_and_wait(
        &format!("{}?token={publish}", a.rtmp_url("cam")),
        &a,
        "cam",
        PublishOpts::default(),
    );
    // A viewer on the edge: the edge pulls through origin-us, which pulls from origin-eu.
    let play = sign(SECRET, &claims(Action::Play, &["live/*"]));
    let _viewer = FlvWatcher::start(edge.http, &format!("/live/cam.flv?token={play}"));

    // Without a token the console's API calls are refused, and it says so.
    let (status, _) = common::http::http_get(edge.http, "/api/v1/cluster").unwrap();
    assert_eq!(status, 401);
    let admin = edge.admin_token.clone().unwrap();
    let url = format!("http://{}/console#token={admin}&play=live/cam", edge.http);
    let browser = Browser::open(&url);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut page = DevTools::attach(browser.profile()).await;
        let long = Duration::from_secs(30);
        page.wait_for(
            "three nodes drawn",
            "document.querySelectorAll('#map [data-node]').length === 3",
            long,
        )
        .await;
        page.wait_for(
            "the edge served by origin-us",
            "!!document.querySelector('#map [data-serves=\"origin-us|edge-us\"]')",
            long,
        )
        .await;
        let map = page
            .eval(
                "JSON.stringify({nodes: [...document.querySelectorAll('#map [data-node]')].map(e => [e.dataset.node, e.dataset.role]),
                  links: [...document.querySelectorAll('#map [data-link]')].map(e => [e.dataset.link, +e.dataset.rtt, +e.dataset.loss]),
                  regions: [...document.querySelectorAll('#map [data-region]')].map(e => e.dataset.region)})",
            )
            .await;
        let map: Value = serde_json::from_str(map.as_str().unwrap()).unwrap();
        let nodes = map["nodes"].to_string();
        for want in ["origin-eu", "origin-us", "edge-us", "\"edge\"", "\"origin\""] {
            assert!(nodes.contains(want), "{want} not in {nodes}");
        }
        assert_eq!(map["regions"], serde_json::json!(["eu", "us"]));
        let links = map["links"].as_array().unwrap();
        let between = |x: &str, y: &str| {
            links
                .iter()
                .find(|l| l[0] == format!("{x}|{y}") || l[0] == format!("{y}|{x}"))
                .cloned()
        };
        let backbone = between("origin-eu", "origin-us").expect("the origins' link");
        assert!(backbone[1].as_f64().unwrap() >= 0.0 && backbone[2].as_f64().unwrap() >= 0.0);
        assert!(between("edge-us", "origin-us").is_some(), "{links:?}");

        // The stream, its codecs, and the player (WHEP first).
        page.wait_for(
            "the stream listed",
            "!!document.querySelector('#streams tr[data-stream=\"live/cam\"]')",
            long,
        )
        .await;
        let row = page
            .eval("document.querySelector('#streams tr[data-stream=\"live/cam\"]').innerText")
            .await;
        let row = row.as_str().unwrap();
        assert!(row.contains("h264") && row.contains("aac") && row.contains("yes"), "{row}");
        page.wait_for(
            "WHEP frames decoded",
            "document.getElementById('player').getVideoPlaybackQuality().totalVideoFrames > 30",
            long,
        )
        .await;
        let via = page.eval("document.getElementById('playing').textContent").await;
        assert!(via.as_str().unwrap().contains("WHEP"), "{via}");
        page.screenshot(&screenshot_path("cluster"), 1280, 860).await;

        // HTTP-FLV through mpegts.js.
        page.eval("document.getElementById('via').value = 'flv'; play('live/cam'); true")
            .await;
        page.wait_for(
            "HTTP-FLV frames decoded",
            "document.getElementById('playing').textContent.includes('HTTP-FLV') && document.getElementById('player').getVideoPlaybackQuality().totalVideoFrames > 30",
            long,
        )
        .await;
        page.screenshot(&screenshot_path("flv"), 1280, 860).await;
        // The page called the API with the token: a page without it gets nothing.
        let status = page
            .eval("fetch('/api/v1/streams').then(r => r.status)")
            .await;
        assert_eq!(status, 401);
    });
    drop(browser);
    // The vendored player and its licence are served by the node itself.
    let (status, js) = common::http::http_get(edge.http, "/console/mpegts.js").unwrap();
    assert!(status == 200 && js.contains("mpegts"), "{status}");
    let (status, licence) = common::http::http_get(edge.http, "/console/mpegts.LICENSE").unwrap();
    assert!(
        status == 200 && licence.contains("Apache License"),
        "{status}"
    );
    let (status, _) = common::http::http_get(edge.http, "/").unwrap();
    assert_eq!(status, 307);
}
