//! The web console: one static page that polls the REST API; and the meeting page of
//! rooms (`/meet`, the file `examples/meeting.html`, which also works from anywhere).

/// The meeting page: plain HTML and JavaScript, nothing fetched from elsewhere.
pub const MEETING: &str = include_str!("../../examples/meeting.html");

pub const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshcast</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f4f4f4}code{background:#f4f4f4;padding:1px 4px}
</style></head><body>
<h1>meshcast <small id="node"></small></h1>
<h2>Streams</h2><table id="streams"><tr><th>stream</th><th>source</th><th>viewers</th><th>video</th><th>audio</th><th>frames in</th><th>play</th></tr></table>
<h2>Backbone links</h2><table id="links"><tr><th>peer</th><th>role</th><th>region</th><th>address</th><th>direction</th><th>RTT ms</th></tr></table>
<p><a href="/metrics">metrics</a> · <a href="/api/v1/streams">/api/v1/streams</a> · <a href="/api/v1/links">/api/v1/links</a></p>
<script>
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function row(t,cells){const r=t.insertRow();cells.forEach(c=>{r.insertCell().innerHTML=c})}
async function refresh(){
  const n=await (await fetch('/api/v1/node')).json();
  document.getElementById('node').textContent=`${n.id} · ${n.role} · ${n.region} · v${n.version}`;
  const s=await (await fetch('/api/v1/streams')).json();
  const st=document.getElementById('streams');while(st.rows.length>1)st.deleteRow(1);
  for(const x of s.streams){
    const v=x.video?`${x.video.codec} ${x.video.width}x${x.video.height}`:'-';
    const a=x.audio?`${x.audio.codec} ${x.audio.sample_rate}Hz/${x.audio.channels}`:'-';
    const src=x.source.kind==='local'?'local':'relay from '+x.source.node;
    const flv=`/${x.stream}.flv`;
    row(st,[esc(x.stream),esc(src),x.subscribers,esc(v),esc(a),x.frames_in,
      `<code>rtmp://${esc(location.hostname)}:1935/${esc(x.stream)}</code> <a href="${esc(flv)}">flv</a>`]);
  }
  const l=await (await fetch('/api/v1/links')).json();
  const lt=document.getElementById('links');while(lt.rows.length>1)lt.deleteRow(1);
  for(const x of l.links)row(lt,[esc(x.node),esc(x.role),esc(x.region),esc(x.address),esc(x.direction),x.rtt_ms.toFixed(1)]);
}
refresh();setInterval(refresh,2000);
</script></body></html>
"#;
