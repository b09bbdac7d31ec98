//! Record layout inside a plain frame body (FORMAT.md 2.3) and the owned and
//! stored record types. Stored records borrow the frame's bytes: subject,
//! headers and payload are `Bytes` slices of the mapped segment, not copies.

use super::{read_i64, read_u16, read_u32};
use bytes::Bytes;

/// Fixed bytes per record before the subject.
pub const RECORD_OVERHEAD: usize = 18;
/// Largest subject the record layout can hold.
pub const SUBJECT_BYTES_MAX: usize = u16::MAX as usize;

/// A record handed to the engine for appending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Nanoseconds since the Unix epoch; `0` lets the writer stamp it.
    pub timestamp_ns: i64,
    pub subject: Bytes,
    /// The NATS header block as received, or empty.
    pub headers: Bytes,
    pub payload: Bytes,
}

impl Record {
    pub fn new(subject: impl Into<Bytes>, payload: impl Into<Bytes>) -> Record {
        Record {
            timestamp_ns: 0,
            subject: subject.into(),
            headers: Bytes::new(),
            payload: payload.into(),
        }
    }

    /// Bytes this record takes inside a plain frame body.
    pub fn encoded_length(&self) -> usize {
        RECORD_OVERHEAD + self.subject.len() + self.headers.len() + self.payload.len()
    }

    /// Appends the encoded record. The caller has checked the lengths with
    /// [`Record::check_lengths`].
    pub fn encode_into(&self, timestamp_ns: i64, out: &mut Vec<u8>) {
        self.encode_prefix_into(timestamp_ns, out);
        out.extend_from_slice(&self.payload);
    }

    /// Appends everything of the encoded record but its payload (the frame
    /// builder writes large payloads from their own buffers).
    pub fn encode_prefix_into(&self, timestamp_ns: i64, out: &mut Vec<u8>) {
        let record_length = (self.encoded_length() - 4) as u32;
        out.extend_from_slice(&record_length.to_le_bytes());
        out.extend_from_slice(&timestamp_ns.to_le_bytes());
        out.extend_from_slice(&(self.subject.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.subject);
        out.extend_from_slice(&self.headers);
    }

    /// Checks that the record fits the layout; returns a reason otherwise.
    pub fn check_lengths(&self) -> Result<(), String> {
        if self.subject.is_empty() {
            return Err("record subject is empty".to_string());
        }
        if self.subject.len() > SUBJECT_BYTES_MAX {
            return Err(format!(
                "record subject is {} bytes, the maximum is {SUBJECT_BYTES_MAX}",
                self.subject.len()
            ));
        }
        if self.encoded_length() > u32::MAX as usize / 2 {
            return Err(format!(
                "record of {} bytes is too large",
                self.encoded_length()
            ));
        }
        Ok(())
    }
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub timestamp_ns: i64,
    pub subject: Bytes,
    pub headers: Bytes,
    pub payload: Bytes,
}

/// Iterates the records of a plain frame body. Yields `Err(reason)` once on
/// malformed input and then stops.
pub struct RecordIter {
    body: Bytes,
    position: usize,
    next_offset: u64,
    remaining: u32,
    failed: bool,
}

impl RecordIter {
    pub fn new(body: Bytes, base_offset: u64, record_count: u32) -> RecordIter {
        RecordIter {
            body,
            position: 0,
            next_offset: base_offset,
            remaining: record_count,
            failed: false,
        }
    }

    /// Records not yet yielded.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Offset of the record the iterator yields next.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    fn decode_next(&mut self) -> Result<StoredRecord, String> {
        let bytes = &self.body[self.position..];
        if bytes.len() < RECORD_OVERHEAD {
            return Err(format!(
                "record at body byte {} needs {RECORD_OVERHEAD} bytes, {} remain",
                self.position,
                bytes.len()
            ));
        }
        let record_length = read_u32(bytes, 0) as usize;
        let timestamp_ns = read_i64(bytes, 4);
        let subject_length = read_u16(bytes, 12) as usize;
        let headers_length = read_u32(bytes, 14) as usize;
        let total = record_length
            .checked_add(4)
            .filter(|total| *total <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "record at body byte {} claims {record_length} bytes, {} remain",
                    self.position,
                    bytes.len().saturating_sub(4)
                )
            })?;
        let fixed_and_variable =
            RECORD_OVERHEAD as u64 + subject_length as u64 + headers_length as u64;
        if fixed_and_variable > total as u64 {
            return Err(format!(
                "record at body byte {} has subject {subject_length} + headers {headers_length} bytes beyond its length {record_length}",
                self.position
            ));
        }
        if subject_length == 0 {
            return Err(format!(
                "record at body byte {} has an empty subject",
                self.position
            ));
        }
        let start = self.position + RECORD_OVERHEAD;
        let subject_end = start + subject_length;
        let headers_end = subject_end + headers_length;
        let end = self.position + total;
        let record = StoredRecord {
            offset: self.next_offset,
            timestamp_ns,
            subject: self.body.slice(start..subject_end),
            headers: self.body.slice(subject_end..headers_end),
            payload: self.body.slice(headers_end..end),
        };
        self.position = end;
        self.next_offset += 1;
        Ok(record)
    }
}

impl RecordIter {
    /// Advances by one record, materializing it only when `accept(offset,
    /// timestamp_ns, subject)` says so: filtered scans skip records without
    /// touching reference counts. `Some(Ok(None))` is a skipped record.
    pub fn next_if(
        &mut self,
        accept: impl FnOnce(u64, i64, &[u8]) -> bool,
    ) -> Option<Result<Option<StoredRecord>, String>> {
        if self.failed || self.remaining == 0 {
            return self.next().map(|item| item.map(Some));
        }
        let bytes = &self.body[self.position..];
        if bytes.len() >= RECORD_OVERHEAD {
            let record_length = read_u32(bytes, 0) as usize;
            let subject_length = read_u16(bytes, 12) as usize;
            let well_formed = record_length + 4 <= bytes.len()
                && RECORD_OVERHEAD + subject_length <= record_length + 4
                && subject_length > 0;
            if well_formed {
                let subject = &bytes[RECORD_OVERHEAD..RECORD_OVERHEAD + subject_length];
                if !accept(self.next_offset, read_i64(bytes, 4), subject) {
                    let headers_length = read_u32(bytes, 14) as usize;
                    if RECORD_OVERHEAD + subject_length + headers_length <= record_length + 4 {
                        self.position += record_length + 4;
                        self.next_offset += 1;
                        self.remaining -= 1;
                        return Some(Ok(None));
                    }
                }
            }
        }
        // Accepted, or malformed: the full decoder reports it.
        self.next().map(|item| item.map(Some))
    }
}

impl Iterator for RecordIter {
    type Item = Result<StoredRecord, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.remaining == 0 {
            if self.position != self.body.len() {
                self.failed = true;
                return Some(Err(format!(
                    "{} bytes follow the last record of the frame",
                    self.body.len() - self.position
                )));
            }
            return None;
        }
        self.remaining -= 1;
        match self.decode_next() {
            Ok(record) => Some(Ok(record)),
            Err(reason) => {
                self.failed = true;
                Some(Err(reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_share_the_body_buffer() {
        let records = [
            Record::new("a.b", "one"),
            Record {
                timestamp_ns: 5,
                subject: Bytes::from_static(b"orders.eu"),
                headers: Bytes::from_static(b"NATS/1.0\r\nX: y\r\n\r\n"),
                payload: Bytes::new(),
            },
        ];
        let mut body = Vec::new();
        for (index, record) in records.iter().enumerate() {
            record.encode_into(index as i64 + 10, &mut body);
        }
        let body = Bytes::from(body);
        let decoded: Vec<StoredRecord> = RecordIter::new(body.clone(), 100, 2)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].offset, 100);
        assert_eq!(decoded[1].offset, 101);
        assert_eq!(decoded[0].timestamp_ns, 10);
        assert_eq!(decoded[1].headers, records[1].headers);
        assert_eq!(decoded[0].payload, records[0].payload);
        let body_range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        assert!(body_range.contains(&(decoded[0].payload.as_ptr() as usize)));
    }

    #[test]
    fn count_mismatch_and_trailing_bytes_are_errors() {
        let mut body = Vec::new();
        Record::new("a", "x").encode_into(1, &mut body);
        let body = Bytes::from(body);
        assert!(RecordIter::new(body.clone(), 0, 2).any(|item| item.is_err()));
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(RecordIter::new(Bytes::from(longer), 0, 1).any(|item| item.is_err()));
    }
}
