//! Publish acknowledgements in JetStream's PubAck JSON shape, so JetStream
//! clients can publish to natswal: `{"stream":"orders","seq":42}`,
//! `"duplicate":true` for a deduplicated `Nats-Msg-Id`, and
//! `{"error":{"code":..,"err_code":..,"description":".."}}`.

use bytes::{BufMut, Bytes, BytesMut};

/// A JetStream-style API error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP-like status code.
    pub code: u16,
    /// JetStream's `err_code` (server/errors.json).
    pub err_code: u32,
    pub description: String,
}

impl ApiError {
    pub fn new(code: u16, err_code: u32, description: impl Into<String>) -> ApiError {
        ApiError {
            code,
            err_code,
            description: description.into(),
        }
    }

    /// JSStreamMessageExceedsMaximumErr.
    pub fn too_large() -> ApiError {
        ApiError::new(400, 10054, "message size exceeds maximum allowed")
    }

    /// A header name reserved for natswal's replay protocol
    /// (JSBadRequestErr).
    pub fn reserved_header(name: &str) -> ApiError {
        ApiError::new(
            400,
            10003,
            format!(
                "header '{name}' is reserved: names starting with {} belong to natswal's replay protocol",
                crate::headers::RESERVED_PREFIX
            ),
        )
    }

    /// A header block that cannot be stored and replayed (JSBadRequestErr).
    pub fn bad_headers(reason: &str) -> ApiError {
        ApiError::new(400, 10003, format!("malformed message headers: {reason}"))
    }

    /// Maps an engine failure to the error a JetStream client expects.
    pub fn from_engine(error: &natswal::Error) -> ApiError {
        match error {
            natswal::Error::RecordTooLarge { .. } => ApiError::too_large(),
            // JSStorageResourcesExceededErr
            natswal::Error::DiskFull { .. } => ApiError::new(
                500,
                10047,
                format!("insufficient storage resources available: {error}"),
            ),
            // JSStreamStoreFailedF
            other => ApiError::new(503, 10077, other.to_string()),
        }
    }
}

fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            control if (control as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", control as u32))
            }
            other => out.push(other),
        }
    }
    out.push('"');
}

/// `{"stream":"<stream>","seq":<seq>}` (plus `"duplicate":true`).
pub fn pub_ack(stream: &str, seq: u64, duplicate: bool) -> Bytes {
    let mut out = String::with_capacity(48 + stream.len());
    out.push_str("{\"stream\":");
    push_json_string(&mut out, stream);
    out.push_str(",\"seq\":");
    out.push_str(&seq.to_string());
    if duplicate {
        out.push_str(",\"duplicate\":true");
    }
    out.push('}');
    Bytes::from(out)
}

/// A PubAck that closes a batch: `{"stream":..,"seq":..,"batch":..,"count":..}`.
pub fn batch_ack(stream: &str, seq: u64, batch: &str, count: u64) -> Bytes {
    let mut out = String::with_capacity(64 + stream.len() + batch.len());
    out.push_str("{\"stream\":");
    push_json_string(&mut out, stream);
    out.push_str(",\"seq\":");
    out.push_str(&seq.to_string());
    out.push_str(",\"batch\":");
    push_json_string(&mut out, batch);
    out.push_str(",\"count\":");
    out.push_str(&count.to_string());
    out.push('}');
    Bytes::from(out)
}

/// Writes PubAcks of one stream into a shared buffer: one allocation per
/// few hundred acks instead of two per ack (acks are the hot path).
pub struct AckWriter {
    prefix: Bytes,
    buffer: BytesMut,
}

impl AckWriter {
    pub fn new(stream: &str) -> AckWriter {
        let mut prefix = String::from("{\"stream\":");
        push_json_string(&mut prefix, stream);
        prefix.push_str(",\"seq\":");
        AckWriter {
            prefix: Bytes::from(prefix),
            buffer: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// The same bytes as [`pub_ack`].
    pub fn pub_ack(&mut self, seq: u64, duplicate: bool) -> Bytes {
        if self.buffer.capacity() - self.buffer.len() < 128 {
            self.buffer.reserve(16 * 1024);
        }
        self.buffer.put_slice(&self.prefix);
        crate::wire::protocol::put_decimal(&mut self.buffer, seq);
        if duplicate {
            self.buffer.put_slice(b",\"duplicate\":true");
        }
        self.buffer.put_u8(b'}');
        self.buffer.split().freeze()
    }
}

/// `{"error":{"code":..,"err_code":..,"description":".."}}`.
pub fn error_ack(error: &ApiError) -> Bytes {
    let mut out = String::with_capacity(64 + error.description.len());
    out.push_str("{\"error\":{\"code\":");
    out.push_str(&error.code.to_string());
    out.push_str(",\"err_code\":");
    out.push_str(&error.err_code.to_string());
    out.push_str(",\"description\":");
    push_json_string(&mut out, &error.description);
    out.push_str("}}");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_valid_json_of_jetstream_shape() {
        let ack: serde_json::Value = serde_json::from_slice(&pub_ack("orders", 42, false)).unwrap();
        assert_eq!(ack, serde_json::json!({"stream":"orders","seq":42}));
        let duplicate: serde_json::Value =
            serde_json::from_slice(&pub_ack("o\"x", 7, true)).unwrap();
        assert_eq!(
            duplicate,
            serde_json::json!({"stream":"o\"x","seq":7,"duplicate":true})
        );
        let error: serde_json::Value =
            serde_json::from_slice(&error_ack(&ApiError::new(503, 10077, "disk \"gone\"\n")))
                .unwrap();
        assert_eq!(error["error"]["description"], "disk \"gone\"\n");
        assert_eq!(error["error"]["err_code"], 10077);
    }
}
