//! NATS header blocks: ingest stores a block exactly as the publisher sent
//! it, once [`parse_received`] has checked that replay can carry it; the
//! one block natswal writes itself ([`encode`], the commit marker of an
//! atomic batch ended by `eob`) has `NATS/1.0\r\n`, one `Name: value\r\n`
//! line per value (names sorted), then `\r\n`. No headers: no bytes.
//!
//! Header names are matched exactly (case-sensitive), as nats-server does
//! for `Nats-Msg-Id` and the other JetStream headers. Names starting with
//! [`RESERVED_PREFIX`] (in any case) belong to natswal's replay protocol:
//! ingest refuses them and replay never passes stored ones on, so a status
//! message cannot be imitated by a record.

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::{BufMut, Bytes, BytesMut};
use std::str::FromStr;

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

/// Names starting with this (ASCII case ignored) are natswal's own.
pub const RESERVED_PREFIX: &str = "Nwal-";

/// Whether a header name is reserved for natswal's replay protocol.
pub fn is_reserved(name: &str) -> bool {
    name.len() >= RESERVED_PREFIX.len()
        && name.as_bytes()[..RESERVED_PREFIX.len()].eq_ignore_ascii_case(RESERVED_PREFIX.as_bytes())
}

/// The first reserved name in a received header map, if any.
pub fn first_reserved(headers: Option<&HeaderMap>) -> Option<String> {
    headers?
        .iter()
        .map(|(name, _)| AsRef::<str>::as_ref(name))
        .find(|name| is_reserved(name))
        .map(str::to_string)
}

/// A header block of `pairs`, in order (natswal's own messages: replay
/// statuses and batches). Names and values are natswal's, never a
/// publisher's: no CR or LF in them.
pub fn block(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(VERSION_LINE);
    append_lines(&mut out, pairs);
    out.extend_from_slice(b"\r\n");
    out
}

/// The header block of a replayed record: its stored lines byte for byte,
/// in order, except reserved names (only in records stored before ingest
/// refused them), then `extra`. The version line is always a plain
/// `NATS/1.0`: a stored status code (`NATS/1.0 503`) must not turn the
/// record into a status message for the reader's client.
pub fn replay_block(stored: &[u8], extra: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + 160);
    out.extend_from_slice(VERSION_LINE);
    let body = stored
        .iter()
        .position(|byte| *byte == b'\n')
        .map_or(&[][..], |end| &stored[end + 1..]);
    for line in body.split(|byte| *byte == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let name = line.split(|byte| *byte == b':').next().unwrap_or_default();
        if line.is_empty() || is_reserved(&String::from_utf8_lossy(name)) {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    append_lines(&mut out, extra);
    out.extend_from_slice(b"\r\n");
    out
}

fn append_lines(out: &mut Vec<u8>, pairs: &[(&str, &str)]) {
    for (name, value) in pairs {
        debug_assert!(!name.contains(['\r', '\n']) && !value.contains(['\r', '\n']));
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Lines that async-nats cannot represent are left out (its `append`
/// panics on them): ingest refuses such blocks, so only records damaged on
/// disk could hold one.
fn to_map<'a>(lines: impl Iterator<Item = (&'a str, &'a str)>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in lines {
        if let Ok((name, value)) = typed(name, value) {
            headers.append(name, value);
        }
    }
    headers
}

fn typed(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let typed_name = HeaderName::from_str(name)
        .map_err(|error| format!("header name '{}': {error}", name.escape_debug()))?;
    let typed_value = HeaderValue::from_str(value)
        .map_err(|error| format!("value of header '{}': {error}", name.escape_debug()))?;
    Ok((typed_name, typed_value))
}

/// Checks a header block as a publisher sent it (kept byte for byte as the
/// record's headers) and decodes it for ingest's own checks. `None` for a
/// message without headers. Refused, naming the line: a block that does
/// not start with `NATS/1.0` or end with an empty line, a line that is not
/// `Name: value`, a name or value async-nats (and so replay) cannot carry.
pub fn parse_received(block: &[u8]) -> Result<Option<HeaderMap>, String> {
    if block.is_empty() {
        return Ok(None);
    }
    let text =
        std::str::from_utf8(block).map_err(|_| "the header block is not UTF-8".to_string())?;
    let Some(body) = text
        .strip_suffix("\r\n\r\n")
        .or_else(|| text.strip_suffix("\r\n"))
    else {
        return Err("the header block does not end with CRLF".to_string());
    };
    let mut lines = body.split("\r\n");
    let version = lines.next().unwrap_or_default();
    if !version.starts_with("NATS/1.0") {
        return Err(format!(
            "the header block starts with '{}', not NATS/1.0",
            version.escape_debug()
        ));
    }
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("header line '{}' has no ':'", line.escape_debug()));
        };
        if name.is_empty() || name.trim() != name {
            return Err(format!("header line '{}' has no name", line.escape_debug()));
        }
        let (name, value) = typed(name, value.trim())?;
        headers.append(name, value);
    }
    Ok((!headers.is_empty()).then_some(headers))
}

/// The `(name, value)` lines of a stored block; lines that do not parse
/// are skipped.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    let text = bytes
        .strip_prefix(VERSION_LINE)
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .unwrap_or("");
    text.split("\r\n").filter_map(|line| {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        (!name.is_empty()).then(|| (name, value.trim_start()))
    })
}

/// Decodes a stored header block; lines that do not parse are skipped.
pub fn decode(bytes: &[u8]) -> HeaderMap {
    to_map(lines(bytes))
}

/// The first value of a header in a stored block, without decoding it all;
/// the name matches exactly, as at ingest.
pub fn find<'a>(bytes: &'a [u8], name: &str) -> Option<&'a str> {
    lines(bytes).find_map(|(key, value)| (key == name).then_some(value))
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
        assert_eq!(find(&encoded, "Nats-Msg-Id"), Some("abc"));
        assert_eq!(find(&encoded, "nats-msg-id"), None, "names match exactly");
        assert!(encode(None).is_empty());
        assert!(encode(Some(&HeaderMap::new())).is_empty());
    }

    #[test]
    fn received_blocks_decode_or_are_refused_by_name() {
        let block = b"NATS/1.0\r\nZ-Last: 1\r\nNats-Msg-Id: abc\r\nZ-Last: 2\r\n\r\n";
        let headers = parse_received(block).unwrap().expect("headers");
        assert_eq!(
            headers.get("Nats-Msg-Id").map(|value| value.as_str()),
            Some("abc")
        );
        assert_eq!(headers.get_all("Z-Last").count(), 2);
        assert_eq!(parse_received(b"").unwrap(), None);
        assert_eq!(parse_received(b"NATS/1.0\r\n\r\n").unwrap(), None);
        let refused: [(&[u8], &str); 5] = [
            (b"HTTP/1.1\r\n\r\n", "not NATS/1.0"),
            (b"NATS/1.0\r\nNo-Colon\r\n\r\n", "has no ':'"),
            (b"NATS/1.0\r\n: empty\r\n\r\n", "has no name"),
            (
                b"NATS/1.0\r\nNa\xc3\xafve: x\r\n\r\n",
                "header name 'Na\u{ef}ve'",
            ),
            (b"NATS/1.0\r\nA: b", "does not end with CRLF"),
        ];
        for (block, expected) in refused {
            let error = parse_received(block).unwrap_err();
            assert!(error.contains(expected), "{block:?}: {error}");
        }
    }

    #[test]
    fn replayed_blocks_keep_stored_lines_and_never_a_status() {
        let stored = b"NATS/1.0 503\r\nZ: 1\r\nnwal-status: 204\r\nA:  spaced\r\nZ: 2\r\n\r\n";
        let replayed = replay_block(stored, &[("Nwal-Offset", "7")]);
        assert_eq!(
            &replayed[..],
            &b"NATS/1.0\r\nZ: 1\r\nA:  spaced\r\nZ: 2\r\nNwal-Offset: 7\r\n\r\n"[..]
        );
        assert_eq!(
            &replay_block(b"", &[("Nwal-Offset", "1")])[..],
            &b"NATS/1.0\r\nNwal-Offset: 1\r\n\r\n"[..]
        );
        assert_eq!(
            &block(&[("Nwal-Status", "100"), ("Nwal-Count", "2")])[..],
            &b"NATS/1.0\r\nNwal-Status: 100\r\nNwal-Count: 2\r\n\r\n"[..]
        );
    }

    #[test]
    fn reserved_names_are_found_in_any_case_and_left_out_of_replay() {
        assert!(is_reserved("Nwal-Status") && is_reserved("nwal-x") && is_reserved("NWAL-"));
        assert!(!is_reserved("Nwal") && !is_reserved("X-Nwal-Status"));
        let mut headers = HeaderMap::new();
        headers.insert("X-Kept", "1");
        headers.insert("nwal-status", "204");
        assert_eq!(
            first_reserved(Some(&headers)).as_deref(),
            Some("nwal-status")
        );
        let stored = encode(Some(&headers));
        assert_eq!(
            &replay_block(&stored, &[])[..],
            b"NATS/1.0\r\nX-Kept: 1\r\n\r\n"
        );
    }
}
