//! The NATS client protocol on the wire, both directions, without I/O: the
//! parser of what a server sends (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`,
//! `+OK`, `-ERR`) and the encoders of what a client sends (`CONNECT`,
//! `PUB`, `HPUB`, `SUB`, `UNSUB`, `PING`, `PONG`).
//!
//! The parser takes whole operations off the front of a read buffer and
//! leaves a partial one in place; a message's subject, reply, header block
//! and payload are slices of that buffer (no copy). Sizes are checked
//! against bounds before any byte of a body is awaited, so a hostile or
//! broken peer cannot make the reader allocate without limit.

use bytes::{BufMut, Bytes, BytesMut};

/// The longest control line accepted (nats-server's own limit is 4 KiB;
/// `INFO` lines of large clusters can be longer).
pub const CONTROL_LINE_BYTES_MAX: usize = 64 * 1024;

/// The largest message body accepted (nats-server's `max_payload` cannot
/// exceed 64 MiB; headers count in it).
pub const BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A message delivered to a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub subject: Bytes,
    pub sid: u64,
    pub reply: Option<Bytes>,
    /// The header block exactly as sent (`NATS/1.0\r\n...\r\n\r\n`), empty
    /// for a message without headers.
    pub headers: Bytes,
    pub payload: Bytes,
}

/// One operation sent by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    Info(Bytes),
    Message(Delivery),
    Ping,
    Pong,
    Ok,
    Err(String),
    /// A leafnode hub's `LS+` / `LS-`: interest in a subject appeared or
    /// went away (the line after the operation name).
    Interest {
        added: bool,
        subject: Bytes,
    },
}

/// The server broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NATS protocol error: {0}")]
pub struct ProtocolError(pub String);

fn error(text: impl Into<String>) -> ProtocolError {
    ProtocolError(text.into())
}

/// Takes the next whole operation off `buffer`, or `None` when more bytes
/// are needed (the buffer is left as it was).
pub fn parse(buffer: &mut BytesMut) -> Result<Option<ServerOp>, ProtocolError> {
    let Some(line_end) = memchr::memchr(b'\n', buffer) else {
        if buffer.len() > CONTROL_LINE_BYTES_MAX {
            return Err(error(format!(
                "a control line longer than {CONTROL_LINE_BYTES_MAX} bytes"
            )));
        }
        return Ok(None);
    };
    let line = buffer[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&buffer[..line_end]);
    let words = Words::split(line);
    let name = words.text(line, 0);
    if name.eq_ignore_ascii_case(b"MSG") || name.eq_ignore_ascii_case(b"HMSG") {
        let header = message_line(line, &words, name.len() == 4)?;
        let body_start = line_end + 1;
        // The body and its trailing CRLF.
        let needed = body_start + header.total + 2;
        if buffer.len() < needed {
            buffer.reserve(needed - buffer.len());
            return Ok(None);
        }
        if &buffer[needed - 2..needed] != b"\r\n" {
            return Err(error("a message body not followed by CRLF"));
        }
        let mut head = buffer.split_to(needed).freeze();
        let subject = head.slice(header.subject.clone());
        let reply = header.reply.clone().map(|range| head.slice(range));
        let mut body = head.split_off(body_start);
        body.truncate(header.total);
        let payload = body.split_off(header.headers);
        return Ok(Some(ServerOp::Message(Delivery {
            subject,
            sid: header.sid,
            reply,
            headers: body,
            payload,
        })));
    }
    // The text after the operation name (INFO's JSON, -ERR's reason).
    let rest = if words.count > 1 {
        &line[words.ranges[1].start..]
    } else {
        &[][..]
    };
    let op = if name.eq_ignore_ascii_case(b"PING") {
        ServerOp::Ping
    } else if name.eq_ignore_ascii_case(b"PONG") {
        ServerOp::Pong
    } else if name.eq_ignore_ascii_case(b"+OK") {
        ServerOp::Ok
    } else if name.eq_ignore_ascii_case(b"-ERR") {
        let text = String::from_utf8_lossy(rest);
        ServerOp::Err(text.trim().trim_matches('\'').to_string())
    } else if name.eq_ignore_ascii_case(b"INFO") {
        ServerOp::Info(Bytes::copy_from_slice(rest))
    } else if name.eq_ignore_ascii_case(b"LS+") || name.eq_ignore_ascii_case(b"LS-") {
        ServerOp::Interest {
            added: name[2] == b'+',
            subject: Bytes::copy_from_slice(rest),
        }
    } else {
        return Err(error(format!(
            "unknown operation '{}'",
            String::from_utf8_lossy(&line[..line.len().min(32)])
        )));
    };
    let _ = buffer.split_to(line_end + 1);
    Ok(Some(op))
}

/// The first words of a control line, as ranges into it (a message line
/// has at most six: name, subject, sid, reply, header size, total size).
struct Words {
    ranges: [std::ops::Range<usize>; 6],
    count: usize,
    /// More words than fit.
    overflow: bool,
}

impl Words {
    fn split(line: &[u8]) -> Words {
        let mut words = Words {
            ranges: Default::default(),
            count: 0,
            overflow: false,
        };
        let mut position = 0;
        while position < line.len() {
            if line[position] == b' ' || line[position] == b'\t' {
                position += 1;
                continue;
            }
            let end = memchr::memchr2(b' ', b'\t', &line[position..])
                .map_or(line.len(), |length| position + length);
            if words.count == words.ranges.len() {
                words.overflow = true;
                break;
            }
            words.ranges[words.count] = position..end;
            words.count += 1;
            position = end;
        }
        words
    }

    fn text<'a>(&self, line: &'a [u8], index: usize) -> &'a [u8] {
        if index < self.count {
            &line[self.ranges[index].clone()]
        } else {
            &[]
        }
    }
}

/// The arguments of a `MSG`/`HMSG` line; ranges index the read buffer
/// (the line starts at its front).
struct MessageLine {
    subject: std::ops::Range<usize>,
    reply: Option<std::ops::Range<usize>>,
    sid: u64,
    headers: usize,
    total: usize,
}

fn message_line(
    line: &[u8],
    words: &Words,
    with_headers: bool,
) -> Result<MessageLine, ProtocolError> {
    let operation = if with_headers { "HMSG" } else { "MSG" };
    let sizes = if with_headers { 2 } else { 1 };
    let arguments = words.count - 1;
    if words.overflow || (arguments != 2 + sizes && arguments != 3 + sizes) {
        return Err(error(format!(
            "a {operation} line with {}{arguments} arguments",
            if words.overflow { "more than " } else { "" }
        )));
    }
    let number = |index: usize, what: &str| {
        parse_decimal(words.text(line, index))
            .ok_or_else(|| error(format!("a {operation} line with a bad {what}")))
    };
    let total = number(words.count - 1, "size")? as usize;
    let headers = if with_headers {
        number(words.count - 2, "header size")? as usize
    } else {
        0
    };
    if total > BODY_BYTES_MAX || headers > total {
        return Err(error(format!(
            "a {operation} of {total} bytes with {headers} of headers (the bound is {BODY_BYTES_MAX})"
        )));
    }
    let has_reply = arguments == 3 + sizes;
    Ok(MessageLine {
        subject: words.ranges[1].clone(),
        sid: number(2, "subscription id")?,
        reply: has_reply.then(|| words.ranges[3].clone()),
        headers,
        total,
    })
}

fn parse_decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 {
        return None;
    }
    let mut value = 0u64;
    for byte in text {
        if !byte.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u64::from(byte - b'0');
    }
    Some(value)
}

/// Which protocol a connection speaks: a client's, or a leafnode's (whose
/// messages to the hub are `LMSG` and `HMSG`, shaped like `PUB` and
/// `HPUB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    Client,
    Leaf,
}

/// Appends a message in `dialect`: `PUB`/`HPUB` or `LMSG`/`HMSG` (with
/// headers when `headers` is not empty), with a reply subject unless
/// `reply` is empty.
pub fn encode_message(
    output: &mut BytesMut,
    dialect: Dialect,
    subject: &[u8],
    reply: &[u8],
    headers: &[u8],
    payload: &[u8],
) {
    output.reserve(subject.len() + reply.len() + headers.len() + payload.len() + 48);
    let name: &[u8] = match (dialect, headers.is_empty()) {
        (Dialect::Client, true) => b"PUB ",
        (Dialect::Client, false) => b"HPUB ",
        (Dialect::Leaf, true) => b"LMSG ",
        (Dialect::Leaf, false) => b"HMSG ",
    };
    output.put_slice(name);
    output.put_slice(subject);
    output.put_u8(b' ');
    if !reply.is_empty() {
        output.put_slice(reply);
        output.put_u8(b' ');
    }
    if !headers.is_empty() {
        put_decimal(output, headers.len() as u64);
        output.put_u8(b' ');
    }
    put_decimal(output, (headers.len() + payload.len()) as u64);
    output.put_slice(b"\r\n");
    output.put_slice(headers);
    output.put_slice(payload);
    output.put_slice(b"\r\n");
}

/// Appends `SUB <subject> [queue] <sid>`.
pub fn encode_subscribe(output: &mut BytesMut, subject: &str, queue: Option<&str>, sid: u64) {
    output.put_slice(b"SUB ");
    output.put_slice(subject.as_bytes());
    output.put_u8(b' ');
    if let Some(queue) = queue {
        output.put_slice(queue.as_bytes());
        output.put_u8(b' ');
    }
    put_decimal(output, sid);
    output.put_slice(b"\r\n");
}

/// Appends `UNSUB <sid>`.
pub fn encode_unsubscribe(output: &mut BytesMut, sid: u64) {
    output.put_slice(b"UNSUB ");
    put_decimal(output, sid);
    output.put_slice(b"\r\n");
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

/// Appends `CONNECT <json>`.
pub fn encode_connect(output: &mut BytesMut, options: &serde_json::Value) {
    output.put_slice(b"CONNECT ");
    output.put_slice(options.to_string().as_bytes());
    output.put_slice(b"\r\n");
}

/// Appends `value` in decimal, without allocating.
pub fn put_decimal(output: &mut BytesMut, value: u64) {
    let mut digits = [0u8; 20];
    let mut position = digits.len();
    let mut rest = value;
    loop {
        position -= 1;
        digits[position] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    output.put_slice(&digits[position..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<ServerOp> {
        let mut buffer = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = parse(&mut buffer).expect("valid") {
            ops.push(op);
        }
        assert!(buffer.is_empty(), "left over: {buffer:?}");
        ops
    }

    fn delivery(
        subject: &str,
        sid: u64,
        reply: Option<&str>,
        headers: &str,
        payload: &str,
    ) -> ServerOp {
        ServerOp::Message(Delivery {
            subject: Bytes::copy_from_slice(subject.as_bytes()),
            sid,
            reply: reply.map(|reply| Bytes::copy_from_slice(reply.as_bytes())),
            headers: Bytes::copy_from_slice(headers.as_bytes()),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        })
    }

    #[test]
    fn a_hubs_interest_operations_parse() {
        let ops = parse_all(b"LS+ $G _INBOX.abc\r\nLS- $G orders.>\r\n");
        assert_eq!(
            ops,
            vec![
                ServerOp::Interest {
                    added: true,
                    subject: Bytes::from_static(b"$G _INBOX.abc"),
                },
                ServerOp::Interest {
                    added: false,
                    subject: Bytes::from_static(b"$G orders.>"),
                },
            ]
        );
    }

    #[test]
    fn every_server_operation_parses() {
        let ops = parse_all(
            b"INFO {\"server_id\":\"x\"}\r\nPING\r\npong\r\n+OK\r\n-ERR 'Authorization Violation'\r\n\
MSG orders.x 7 5\r\nhello\r\nMSG orders.y 8 _INBOX.a 0\r\n\r\n\
HMSG orders.z 9 _INBOX.b 24 27\r\nNATS/1.0\r\nA: b\r\nC: d\r\n\r\nabc\r\n",
        );
        assert_eq!(
            ops,
            vec![
                ServerOp::Info(Bytes::from_static(b"{\"server_id\":\"x\"}")),
                ServerOp::Ping,
                ServerOp::Pong,
                ServerOp::Ok,
                ServerOp::Err("Authorization Violation".to_string()),
                delivery("orders.x", 7, None, "", "hello"),
                delivery("orders.y", 8, Some("_INBOX.a"), "", ""),
                delivery(
                    "orders.z",
                    9,
                    Some("_INBOX.b"),
                    "NATS/1.0\r\nA: b\r\nC: d\r\n\r\n",
                    "abc"
                ),
            ]
        );
    }

    #[test]
    fn an_operation_split_anywhere_waits_for_the_rest() {
        let input: &[u8] =
            b"HMSG s 1 r 12 17\r\nNATS/1.0\r\n\r\nhello\r\nMSG t 2 3\r\nabc\r\nPING\r\n";
        let whole = parse_all(input);
        for cut in 0..input.len() {
            let mut buffer = BytesMut::from(&input[..cut]);
            let mut ops = Vec::new();
            while let Some(op) = parse(&mut buffer).expect("valid prefix") {
                ops.push(op);
            }
            buffer.extend_from_slice(&input[cut..]);
            while let Some(op) = parse(&mut buffer).expect("valid") {
                ops.push(op);
            }
            assert_eq!(ops, whole, "cut at {cut}");
        }
    }

    #[test]
    fn broken_operations_are_errors_that_say_what_is_wrong() {
        let cases: [(&[u8], &str); 7] = [
            (b"MSG s 1\r\n", "MSG line with 2 arguments"),
            (b"MSG s x 3\r\nabc\r\n", "bad subscription id"),
            (b"MSG s 1 -3\r\n", "bad size"),
            (b"HMSG s 1 9 3\r\n", "3 bytes with 9 of headers"),
            (b"MSG s 1 99999999999\r\n", "the bound is"),
            (b"MSG s 1 3\r\nabcXY", "not followed by CRLF"),
            (b"HELLO\r\n", "unknown operation 'HELLO'"),
        ];
        for (input, expected) in cases {
            let mut buffer = BytesMut::from(input);
            let error = parse(&mut buffer).expect_err("broken");
            assert!(error.0.contains(expected), "{input:?}: {error}");
        }
        let mut endless = BytesMut::from(&vec![b'A'; CONTROL_LINE_BYTES_MAX + 1][..]);
        assert!(parse(&mut endless).is_err());
    }

    #[test]
    fn encoders_write_the_protocol() {
        let mut output = BytesMut::new();
        let client = Dialect::Client;
        encode_message(&mut output, client, b"a.b", b"", b"", b"hi");
        encode_message(&mut output, client, b"c", b"", b"NATS/1.0\r\n\r\n", b"xyz");
        encode_message(&mut output, client, b"d", b"r.1", b"", b"");
        encode_message(&mut output, Dialect::Leaf, b"e", b"r@s", b"H\r\n\r\n", b"");
        encode_subscribe(&mut output, "orders.>", None, 1);
        encode_subscribe(&mut output, "q", Some("workers"), 12345678901);
        encode_unsubscribe(&mut output, 0);
        assert_eq!(
            &output[..],
            &b"PUB a.b 2\r\nhi\r\nHPUB c 12 15\r\nNATS/1.0\r\n\r\nxyz\r\nPUB d r.1 0\r\n\r\nHMSG e r@s 5 5\r\nH\r\n\r\n\r\nSUB orders.> 1\r\nSUB q workers 12345678901\r\nUNSUB 0\r\n"[..]
        );
    }
}
