//! H.264 (AVC) parsing: the AVCDecoderConfigurationRecord carried by RTMP/FLV/MP4 and just
//! enough of the SPS to know the picture size. Input is untrusted: every read is checked and
//! errors are values.

use bytes::Bytes;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AvcError {
    #[error("AVC decoder configuration record truncated")]
    Truncated,
    #[error("AVC decoder configuration record version {0} (expected 1)")]
    Version(u8),
    #[error("AVC NAL length size {0} unsupported (expected 4)")]
    LengthSize(u8),
    #[error("AVC decoder configuration record has no SPS")]
    NoSps,
    #[error("SPS malformed: {0}")]
    Sps(&'static str),
}

/// What meshcast needs to know of an AVCDecoderConfigurationRecord.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvcConfig {
    pub profile: u8,
    pub level: u8,
    pub width: u32,
    pub height: u32,
    pub sps: Vec<Bytes>,
    pub pps: Vec<Bytes>,
}

/// Parses an AVCDecoderConfigurationRecord (ISO 14496-15 §5.2.4.1).
pub fn parse_decoder_config(record: &Bytes) -> Result<AvcConfig, AvcError> {
    let b = &record[..];
    if b.len() < 7 {
        return Err(AvcError::Truncated);
    }
    if b[0] != 1 {
        return Err(AvcError::Version(b[0]));
    }
    let length_size = (b[4] & 0x03) + 1;
    if length_size != 4 {
        return Err(AvcError::LengthSize(length_size));
    }
    let mut pos = 5;
    let read_sets = |count: usize, pos: &mut usize| -> Result<Vec<Bytes>, AvcError> {
        let mut sets = Vec::with_capacity(count);
        for _ in 0..count {
            let len_bytes = b.get(*pos..*pos + 2).ok_or(AvcError::Truncated)?;
            let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
            *pos += 2;
            if b.len() < *pos + len {
                return Err(AvcError::Truncated);
            }
            sets.push(record.slice(*pos..*pos + len));
            *pos += len;
        }
        Ok(sets)
    };
    let num_sps = (b[pos] & 0x1f) as usize;
    pos += 1;
    let sps = read_sets(num_sps, &mut pos)?;
    let num_pps = *b.get(pos).ok_or(AvcError::Truncated)? as usize;
    pos += 1;
    let pps = read_sets(num_pps, &mut pos)?;
    let first = sps.first().ok_or(AvcError::NoSps)?;
    let (width, height) = sps_picture_size(first)?;
    Ok(AvcConfig {
        profile: b[1],
        level: b[3],
        width,
        height,
        sps,
        pps,
    })
}

/// Reads the display size from an SPS NAL unit (with its one-byte NAL header).
pub fn sps_picture_size(nal: &[u8]) -> Result<(u32, u32), AvcError> {
    let rbsp = unescape(nal.get(1..).ok_or(AvcError::Sps("empty"))?);
    let mut r = BitReader::new(&rbsp);
    let profile_idc = r.bits(8)?;
    r.bits(16)?; // constraint flags, reserved, level_idc
    r.ue()?; // seq_parameter_set_id
    let mut chroma_format_idc = 1;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = r.ue()?;
        if chroma_format_idc == 3 {
            r.bits(1)?; // separate_colour_plane_flag
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.bits(1)?; // qpprime_y_zero_transform_bypass_flag
        if r.bits(1)? == 1 {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bits(1)? == 1 {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.bits(1)?;
            r.se()?;
            r.se()?;
            let n = r.ue()?;
            if n > 255 {
                return Err(AvcError::Sps("num_ref_frames_in_pic_order_cnt_cycle"));
            }
            for _ in 0..n {
                r.se()?;
            }
        }
        2 => {}
        _ => return Err(AvcError::Sps("pic_order_cnt_type")),
    }
    r.ue()?; // max_num_ref_frames
    r.bits(1)?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = r.ue()? + 1;
    let height_map_units = r.ue()? + 1;
    let frame_mbs_only = r.bits(1)?;
    if frame_mbs_only == 0 {
        r.bits(1)?; // mb_adaptive_frame_field_flag
    }
    r.bits(1)?; // direct_8x8_inference_flag
    let (mut crop_l, mut crop_r, mut crop_t, mut crop_b) = (0, 0, 0, 0);
    if r.bits(1)? == 1 {
        crop_l = r.ue()?;
        crop_r = r.ue()?;
        crop_t = r.ue()?;
        crop_b = r.ue()?;
    }
    if width_mbs > 1024 || height_map_units > 1024 {
        return Err(AvcError::Sps("picture too large"));
    }
    let (crop_x, crop_y) = match chroma_format_idc {
        0 | 3 => (1, 2 - frame_mbs_only),
        1 => (2, 2 * (2 - frame_mbs_only)),
        _ => (2, 2 - frame_mbs_only),
    };
    // Crop values come from the peer (up to 2^32 - 2 each): sum them in 64 bits and refuse
    // a crop larger than the picture rather than wrap.
    let crop = |unit: u32, a: u32, b: u32| unit as u64 * (a as u64 + b as u64);
    let full_w = width_mbs as u64 * 16;
    let full_h = (2 - frame_mbs_only) as u64 * height_map_units as u64 * 16;
    let (cw, ch) = (crop(crop_x, crop_l, crop_r), crop(crop_y, crop_t, crop_b));
    if cw >= full_w || ch >= full_h {
        return Err(AvcError::Sps("cropping larger than the picture"));
    }
    Ok(((full_w - cw) as u32, (full_h - ch) as u32))
}

fn skip_scaling_list(r: &mut BitReader<'_>, size: usize) -> Result<(), AvcError> {
    let (mut last, mut next) = (8i64, 8i64);
    for _ in 0..size {
        if next != 0 {
            let delta = r.se()?;
            next = (last + delta + 256).rem_euclid(256);
        }
        if next != 0 {
            last = next;
        }
    }
    Ok(())
}

/// Removes emulation-prevention bytes (00 00 03 → 00 00).
fn unescape(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut zeros = 0;
    for &b in data {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        BitReader { data, pos: 0 }
    }

    fn bits(&mut self, n: u32) -> Result<u32, AvcError> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self
                .data
                .get(self.pos / 8)
                .ok_or(AvcError::Sps("truncated"))?;
            v = (v << 1) | ((byte >> (7 - self.pos % 8)) & 1) as u32;
            self.pos += 1;
        }
        Ok(v)
    }

    fn ue(&mut self) -> Result<u32, AvcError> {
        let mut zeros = 0;
        while self.bits(1)? == 0 {
            zeros += 1;
            if zeros > 31 {
                return Err(AvcError::Sps("exp-golomb code too long"));
            }
        }
        Ok(((1u64 << zeros) - 1 + self.bits(zeros)? as u64) as u32)
    }

    fn se(&mut self) -> Result<i64, AvcError> {
        let k = self.ue()? as i64;
        Ok(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// One H.264 access unit as AVC packaging wants it: the AVCC payload (4-byte lengths;
/// parameter sets and access unit delimiters left out), whether it holds an IDR slice, and
/// the SPS/PPS it carried in band.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AccessUnit {
    pub avcc: Vec<u8>,
    pub keyframe: bool,
    pub sps: Option<Vec<u8>>,
    pub pps: Option<Vec<u8>>,
}

/// Sorts the NAL units of one access unit into an [`AccessUnit`].
pub fn access_unit<N: AsRef<[u8]>>(nals: impl IntoIterator<Item = N>) -> AccessUnit {
    let mut au = AccessUnit::default();
    for nal in nals {
        let nal = nal.as_ref();
        match nal.first().map(|b| b & 0x1f) {
            Some(7) => au.sps = Some(nal.to_vec()),
            Some(8) => au.pps = Some(nal.to_vec()),
            Some(9) | None => {}
            Some(t) => {
                au.keyframe |= t == 5;
                au.avcc.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                au.avcc.extend_from_slice(nal);
            }
        }
    }
    au
}

/// The NAL units of an Annex B byte stream (3- or 4-byte start codes).
pub fn annexb_nalus(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let mut end = starts.get(k + 1).map_or(data.len(), |n| n - 3);
            while end > start && data[end - 1] == 0 {
                end -= 1; // the zero of a 4-byte start code, or trailing zeros
            }
            &data[start..end]
        })
        .collect()
}

/// An AVCDecoderConfigurationRecord for one SPS and PPS.
pub fn decoder_config_record(sps: &[u8], pps: &[u8]) -> Vec<u8> {
    let mut r = vec![
        1,
        *sps.get(1).unwrap_or(&0x42),
        *sps.get(2).unwrap_or(&0),
        *sps.get(3).unwrap_or(&0x1f),
        0xff,
        0xe1,
    ];
    r.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    r.extend_from_slice(sps);
    r.push(1);
    r.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    r.extend_from_slice(pps);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    // SPS and PPS from `ffmpeg -f lavfi -i testsrc2=size=1280x720 -c:v libx264` (High profile).
    const SPS_720P: &[u8] = &[
        0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00, 0x03,
        0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
    ];
    const PPS: &[u8] = &[0x68, 0xeb, 0xe3, 0xcb, 0x22, 0xc0];

    fn record(sps: &[u8], pps: &[u8]) -> Bytes {
        let mut r = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
        r.extend_from_slice(&(sps.len() as u16).to_be_bytes());
        r.extend_from_slice(sps);
        r.push(1);
        r.extend_from_slice(&(pps.len() as u16).to_be_bytes());
        r.extend_from_slice(pps);
        Bytes::from(r)
    }

    #[test]
    fn parses_720p_high_profile_record() {
        let c = parse_decoder_config(&record(SPS_720P, PPS)).unwrap();
        assert_eq!((c.width, c.height), (1280, 720));
        assert_eq!(c.profile, 100);
        assert_eq!(c.sps.len(), 1);
        assert_eq!(&c.pps[0][..], PPS);
    }

    #[test]
    fn truncated_record_is_an_error_at_every_length() {
        let full = record(SPS_720P, PPS);
        for len in 0..full.len() - PPS.len() {
            assert!(
                parse_decoder_config(&full.slice(..len)).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn rejects_wrong_version_and_length_size() {
        let mut r = record(SPS_720P, PPS).to_vec();
        r[0] = 2;
        assert_eq!(
            parse_decoder_config(&Bytes::from(r.clone())),
            Err(AvcError::Version(2))
        );
        r[0] = 1;
        r[4] = 0xfd;
        assert_eq!(
            parse_decoder_config(&Bytes::from(r)),
            Err(AvcError::LengthSize(2))
        );
    }

    #[test]
    fn garbage_sps_never_panics() {
        let mut seed = 0x1234_5678u32;
        for len in 0..64 {
            let mut nal = vec![0x67];
            for _ in 0..len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                nal.push((seed >> 16) as u8);
            }
            let _ = sps_picture_size(&nal);
        }
    }

    #[test]
    fn annexb_splits_into_avcc_and_parameter_sets() {
        let au = [
            &[0, 0, 0, 1, 0x67, 1, 2][..],
            &[0, 0, 1, 0x68, 3][..],
            &[0, 0, 0, 1, 0x65, 9, 9, 9][..],
        ]
        .concat();
        let AccessUnit { avcc, sps, pps, .. } = access_unit(annexb_nalus(&au));
        assert_eq!(sps.unwrap(), [0x67, 1, 2]);
        assert_eq!(pps.unwrap(), [0x68, 3]);
        assert_eq!(avcc, [0, 0, 0, 4, 0x65, 9, 9, 9]);
    }
}
