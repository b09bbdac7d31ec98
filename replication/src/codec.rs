//! The one network codec: length-prefixed frames whose body is bincode 2
//! (serde), both with a size limit. Only node-to-node messages go through
//! here; nothing on disk is bincode.
//!
//! ```text
//! u32 little-endian  body length (at most FRAME_BYTES_MAX)
//! body               bincode 2, standard config, same limit
//! ```

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message: a batch of appended frames is bounded by openraft's
/// `max_payload_entries` times natswal's frame size.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Encodes a message as one length-prefixed frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>> {
    let mut frame = vec![0; 4];
    bincode::serde::encode_into_std_write(message, &mut frame, config())
        .map_err(|error| Error::Format(format!("encoding a message: {error}")))?;
    let length = frame.len() - 4;
    if length > FRAME_BYTES_MAX {
        return Err(Error::Format(format!(
            "message of {length} bytes exceeds the {FRAME_BYTES_MAX}-byte frame limit"
        )));
    }
    frame[..4].copy_from_slice(&(length as u32).to_le_bytes());
    Ok(frame)
}

/// Decodes a frame body; every byte must be used.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    let (message, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|error| Error::Format(format!("decoding a message: {error}")))?;
    if used != body.len() {
        return Err(Error::Format(format!(
            "message of {} bytes has {} trailing bytes",
            body.len(),
            body.len() - used
        )));
    }
    Ok(message)
}

/// Reads one frame body; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                context: "reading a frame length".to_string(),
                source,
            })
        }
    }
    let length = u32::from_le_bytes(prefix) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(Error::Format(format!(
            "peer sent a frame of {length} bytes, more than the {FRAME_BYTES_MAX}-byte limit"
        )));
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|source| Error::Io {
            context: format!("reading a {length}-byte frame"),
            source,
        })?;
    Ok(Some(body))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &[u8]) -> Result<()> {
    writer.write_all(frame).await.map_err(|source| Error::Io {
        context: format!("writing a {}-byte frame", frame.len()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_or_trailing_ones_are_refused() {
        let message = (7u64, "stream".to_string(), vec![1u8, 2, 3]);
        let frame = encode(&message).unwrap();
        let mut reader = &frame[..];
        let body = read_frame(&mut reader).await.unwrap().unwrap();
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&body).unwrap(), message);
        assert!(read_frame(&mut reader).await.unwrap().is_none());

        let mut forged = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
        forged.extend_from_slice(&[0; 16]);
        let error = read_frame(&mut &forged[..]).await.unwrap_err().to_string();
        assert!(error.contains("limit"), "{error}");

        let mut longer = body.clone();
        longer.push(0);
        let error = decode::<(u64, String, Vec<u8>)>(&longer)
            .unwrap_err()
            .to_string();
        assert!(error.contains("trailing"), "{error}");

        // A length inside the message claiming more than the limit.
        let forged_vector = [0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<Vec<u8>>(&forged_vector).is_err());
    }
}
