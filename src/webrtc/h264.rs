//! H.264 RTP packetization (RFC 6184, packetization-mode 1), sans-IO.
//!
//! Turns one AVCC access unit into RTP payloads: NAL units that fit go alone, larger ones are
//! split into FU-A fragments, and before an IDR the SPS and PPS from the stream configuration
//! go first as one STAP-A (browsers need them in band). The payloads are built once per frame
//! per node and shared (`Arc<[u8]>`) by every WebRTC viewer; each viewer only adds its own RTP
//! header and SRTP. (str0m has a packetizer too, but keeps it private in RTP mode.)

use std::sync::Arc;

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;
const STAP_A: u8 = 24;
const FU_A: u8 = 28;

/// Iterates the NAL units of an AVCC (4-byte length-prefixed) buffer; stops at the first
/// malformed length.
pub fn avcc_nalus(mut avcc: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if avcc.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([avcc[0], avcc[1], avcc[2], avcc[3]]) as usize;
        let nal = avcc.get(4..4 + len)?;
        avcc = &avcc[4 + len..];
        Some(nal)
    })
}

/// Iterates the NAL units aggregated in a STAP-A payload (after its 1-byte header); stops at
/// the first malformed size.
pub fn stap_a_nalus(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = payload.get(1..).unwrap_or_default();
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let nal = rest.get(2..2 + len)?;
        rest = &rest[2 + len..];
        Some(nal)
    })
}

/// RTP payloads for one access unit, in order; the last one carries the marker bit.
pub fn packetize(avcc: &[u8], sps: &[u8], pps: &[u8], mtu: usize) -> Vec<Arc<[u8]>> {
    let mut out: Vec<Arc<[u8]>> = Vec::new();
    let is_idr = avcc_nalus(avcc).any(|n| n.first().is_some_and(|b| b & 0x1f == NAL_IDR));
    if is_idr && !sps.is_empty() && !pps.is_empty() {
        let stap_len = 1 + 2 + sps.len() + 2 + pps.len();
        if stap_len <= mtu {
            let mut stap = Vec::with_capacity(stap_len);
            // F=0, NRI = the highest of the two, type STAP-A.
            stap.push((sps[0] & 0x60).max(pps[0] & 0x60) | STAP_A);
            for nal in [sps, pps] {
                stap.extend_from_slice(&(nal.len() as u16).to_be_bytes());
                stap.extend_from_slice(nal);
            }
            out.push(stap.into());
        } else {
            push_nal(&mut out, sps, mtu);
            push_nal(&mut out, pps, mtu);
        }
    }
    for nal in avcc_nalus(avcc) {
        let Some(&header) = nal.first() else { continue };
        match header & 0x1f {
            // Parameter sets come from the configuration; delimiters are not needed.
            NAL_AUD => {}
            NAL_SPS | NAL_PPS if is_idr && !sps.is_empty() => {}
            _ => push_nal(&mut out, nal, mtu),
        }
    }
    out
}

fn push_nal(out: &mut Vec<Arc<[u8]>>, nal: &[u8], mtu: usize) {
    if nal.len() <= mtu {
        out.push(nal.into());
        return;
    }
    let indicator = (nal[0] & 0xe0) | FU_A;
    let nal_type = nal[0] & 0x1f;
    let body = &nal[1..];
    let chunk = mtu - 2;
    let count = body.len().div_ceil(chunk);
    for (i, part) in body.chunks(chunk).enumerate() {
        let mut fu = Vec::with_capacity(2 + part.len());
        fu.push(indicator);
        let start = if i == 0 { 0x80 } else { 0 };
        let end = if i + 1 == count { 0x40 } else { 0 };
        fu.push(start | end | nal_type);
        fu.extend_from_slice(part);
        out.push(fu.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avcc(nals: &[&[u8]]) -> Vec<u8> {
        let mut v = vec![];
        for n in nals {
            v.extend_from_slice(&(n.len() as u32).to_be_bytes());
            v.extend_from_slice(n);
        }
        v
    }

    #[test]
    fn small_non_idr_frame_is_one_single_nal_packet() {
        let out = packetize(&avcc(&[&[0x41, 1, 2, 3]]), &[0x67, 1], &[0x68, 2], 1200);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0][..], &[0x41, 1, 2, 3]);
    }

    #[test]
    fn idr_is_preceded_by_stap_a_with_sps_and_pps() {
        let sps = [0x67, 0x64, 0x00, 0x1f];
        let pps = [0x68, 0xeb];
        let out = packetize(
            &avcc(&[&[0x09, 0x10], &[0x06, 5], &[0x65, 9, 9]]),
            &sps,
            &pps,
            1200,
        );
        assert_eq!(
            &out[0][..],
            &[0x78, 0, 4, 0x67, 0x64, 0x00, 0x1f, 0, 2, 0x68, 0xeb],
            "STAP-A (NRI 3, type 24)"
        );
        assert_eq!(&out[1][..], &[0x06, 5], "SEI kept, AUD dropped");
        assert_eq!(&out[2][..], &[0x65, 9, 9]);
    }

    #[test]
    fn large_nal_is_fragmented_into_fu_a() {
        let mut nal = vec![0x65];
        nal.extend((0..3000u32).map(|i| i as u8));
        let out = packetize(&avcc(&[&nal]), &[], &[], 1000);
        assert_eq!(out.len(), 4); // 2999 body bytes... 3000 / 998 = 4 fragments
        assert_eq!(out[0][0], 0x60 | FU_A);
        assert_eq!(out[0][1], 0x80 | 5, "start bit");
        assert_eq!(out[1][1], 5);
        assert_eq!(out[3][1], 0x40 | 5, "end bit");
        let rebuilt: Vec<u8> = out.iter().flat_map(|p| p[2..].to_vec()).collect();
        assert_eq!(rebuilt, nal[1..]);
        assert!(out.iter().all(|p| p.len() <= 1000));
    }

    #[test]
    fn malformed_avcc_stops_cleanly() {
        let out = packetize(&[0, 0, 0, 9, 1, 2], &[], &[], 1200);
        assert!(out.is_empty());
    }
}
