//! VP8 RTP packetization (RFC 7741), sans-IO: the frame split into MTU-sized payloads, each
//! with a one-byte payload descriptor (S set on the first, partition index 0). Built once per
//! frame per node and shared by every viewer, like H.264.

use std::sync::Arc;

pub fn packetize(frame: &[u8], mtu: usize) -> Vec<Arc<[u8]>> {
    frame
        .chunks(mtu - 1)
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = Vec::with_capacity(chunk.len() + 1);
            p.push(if i == 0 { 0x10 } else { 0x00 });
            p.extend_from_slice(chunk);
            Arc::from(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_payload_starts_the_partition() {
        let out = packetize(&[1u8; 2500], 1000);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0][0], 0x10);
        assert_eq!(out[1][0], 0x00);
        assert!(out.iter().all(|p| p.len() <= 1000));
        assert_eq!(out.iter().map(|p| p.len() - 1).sum::<usize>(), 2500);
    }
}
