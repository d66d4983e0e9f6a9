//! AAC AudioSpecificConfig parsing (ISO 14496-3 §1.6.2.1): sample rate and channel count.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AacError {
    #[error("AudioSpecificConfig truncated")]
    Truncated,
    #[error("AudioSpecificConfig has reserved sampling frequency index {0}")]
    FrequencyIndex(u8),
}

const FREQUENCIES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// What meshcast needs to know of an AudioSpecificConfig.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AacConfig {
    pub object_type: u8,
    pub sample_rate: u32,
    pub channels: u8,
}

pub fn parse_audio_specific_config(b: &[u8]) -> Result<AacConfig, AacError> {
    if b.len() < 2 {
        return Err(AacError::Truncated);
    }
    let bits = u32::from_be_bytes([b[0], b[1], *b.get(2).unwrap_or(&0), *b.get(3).unwrap_or(&0)]);
    let object_type = (bits >> 27) as u8;
    let freq_index = ((bits >> 23) & 0x0f) as u8;
    let (sample_rate, channel_shift) = if freq_index == 15 {
        if b.len() < 5 {
            return Err(AacError::Truncated);
        }
        // 24-bit explicit frequency follows the index.
        let v = u64::from_be_bytes([0, 0, 0, b[0], b[1], b[2], b[3], b[4]]);
        (((v >> 9) & 0xff_ffff) as u32, 5)
    } else {
        let rate = *FREQUENCIES
            .get(freq_index as usize)
            .ok_or(AacError::FrequencyIndex(freq_index))?;
        (rate, 19)
    };
    let channels = if channel_shift == 19 {
        ((bits >> 19) & 0x0f) as u8
    } else {
        (b[4] >> 1) & 0x0f
    };
    Ok(AacConfig {
        object_type,
        sample_rate,
        channels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lc_44100_stereo() {
        // ffmpeg's native aac encoder, 44.1 kHz stereo.
        let c = parse_audio_specific_config(&[0x12, 0x10]).unwrap();
        assert_eq!(
            c,
            AacConfig {
                object_type: 2,
                sample_rate: 44100,
                channels: 2
            }
        );
    }

    #[test]
    fn parses_ffmpeg_sine_extradata() {
        // `ffmpeg -f lavfi -i sine -c:a aac`: 44.1 kHz mono.
        let c = parse_audio_specific_config(&[0x12, 0x08, 0x56, 0xe5, 0x00]).unwrap();
        assert_eq!((c.sample_rate, c.channels), (44100, 1));
    }

    #[test]
    fn parses_lc_48000_mono() {
        let c = parse_audio_specific_config(&[0x11, 0x88]).unwrap();
        assert_eq!((c.sample_rate, c.channels), (48000, 1));
    }

    #[test]
    fn rejects_short_and_reserved() {
        assert_eq!(
            parse_audio_specific_config(&[0x12]),
            Err(AacError::Truncated)
        );
        assert_eq!(
            parse_audio_specific_config(&[0x16, 0x80]),
            Err(AacError::FrequencyIndex(13))
        );
    }
}
