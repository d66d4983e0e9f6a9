//! Cluster policy: decisions that span nodes and sit above the drivers (the backbone,
//! RTMP, WebRTC, egress). Which origin an edge forwards a publish to, where a client is
//! sent, how nodes are ranked. The drivers carry bytes; this module decides where.

pub mod forward;
pub mod load;
pub mod route;
