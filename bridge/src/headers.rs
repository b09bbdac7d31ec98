//! NATS header blocks as natswal stores them: `NATS/1.0\r\n`, one
//! `Name: value\r\n` line per value (names sorted, so the same headers always
//! store the same bytes), then `\r\n`. An empty map is stored as no bytes.

use async_nats::HeaderMap;
use bytes::{BufMut, Bytes, BytesMut};

const VERSION_LINE: &[u8] = b"NATS/1.0\r\n";

/// Encodes a header map for storage.
pub fn encode(headers: Option<&HeaderMap>) -> Bytes {
    let Some(headers) = headers else {
        return Bytes::new();
    };
    let mut entries: Vec<(&str, Vec<&str>)> = headers
        .iter()
        .map(|(name, values)| {
            (
                AsRef::<str>::as_ref(name),
                values.iter().map(|value| value.as_str()).collect(),
            )
        })
        .collect();
    if entries.is_empty() {
        return Bytes::new();
    }
    entries.sort_by(|left, right| left.0.cmp(right.0));
    let mut out = BytesMut::with_capacity(64);
    out.put_slice(VERSION_LINE);
    for (name, values) in entries {
        for value in values {
            out.put_slice(name.as_bytes());
            out.put_slice(b": ");
            out.put_slice(value.as_bytes());
            out.put_slice(b"\r\n");
        }
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// Decodes a stored header block; lines that do not parse are skipped.
pub fn decode(bytes: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let Some(rest) = bytes.strip_prefix(VERSION_LINE) else {
        return headers;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return headers;
    };
    for line in text.split("\r\n") {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() {
                headers.append(name, value.trim_start());
            }
        }
    }
    headers
}

/// The first value of a header in a stored block, without decoding it all.
pub fn find<'a>(bytes: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(bytes.strip_prefix(VERSION_LINE)?).ok()?;
    text.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim_start())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_canonical() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "abc");
        headers.append("X-Multi", "1");
        headers.append("X-Multi", "2");
        headers.insert("A-First", "value: with colon");
        let encoded = encode(Some(&headers));
        assert_eq!(
            &encoded[..],
            b"NATS/1.0\r\nA-First: value: with colon\r\nNats-Msg-Id: abc\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n"
        );
        let decoded = decode(&encoded);
        assert_eq!(encode(Some(&decoded)), encoded);
        assert_eq!(find(&encoded, "nats-msg-id"), Some("abc"));
        assert!(encode(None).is_empty());
        assert!(encode(Some(&HeaderMap::new())).is_empty());
    }
}
