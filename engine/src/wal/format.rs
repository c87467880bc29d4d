//! WAL on-disk format, version 1.
//!
//! A segment is one file, `wal/<first lsn, 20 digits>.wal`:
//!
//! ```text
//! header   16 bytes   magic "SPLKWAL\0" | format version u32 LE (= 1) | reserved u32 (= 0)
//! record   repeated   len u32 LE | crc u32 LE | body (len bytes)
//! body                lsn u64 LE | project_len u16 LE | project (UTF-8)
//!                     | Arrow IPC stream: the `spans` schema and one record batch,
//!                       buffers LZ4-frame compressed
//! ```
//!
//! `crc` is CRC-32 (IEEE) of the body. LSNs (log sequence numbers) increase by one per record
//! across segments; a record is acknowledged to the client only after it is written and, in
//! `fsync` durability mode, synced.
//!
//! Reading stops at the first record that does not check out. When nothing follows it, it is a
//! torn write (the process died while appending; never acknowledged) and is cut off. When bytes
//! follow it, the segment is corrupt: the valid prefix is kept and the reader reports where the
//! damage starts.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::CompressionType;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};

use crate::error::{Error, Result};

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"SPLKWAL\0";
/// The format version this module reads and writes.
pub const VERSION: u32 = 1;
/// Length of the segment header.
pub const HEADER_LEN: usize = 16;
/// Length of a record's frame (len and crc).
pub const FRAME_LEN: usize = 8;
/// Largest body a record may have; a larger length is damage, not data.
pub const MAX_BODY: u32 = 1 << 30;

/// The segment header.
pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Encodes the record body payload (everything after the LSN) of one batch.
pub fn encode_payload(project: &str, batch: &RecordBatch) -> Result<Vec<u8>> {
    let arrow_err = |source| Error::Arrow { source };
    let project_len = u16::try_from(project.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 2 + 64);
    out.extend_from_slice(&project_len.to_le_bytes());
    out.extend_from_slice(&project.as_bytes()[..project_len as usize]);
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(CompressionType::LZ4_FRAME))
        .map_err(arrow_err)?;
    let mut w = StreamWriter::try_new_with_options(&mut out, batch.schema_ref(), options)
        .map_err(arrow_err)?;
    w.write(batch).map_err(arrow_err)?;
    w.finish().map_err(arrow_err)?;
    drop(w);
    Ok(out)
}

/// Frames a record: `len | crc | lsn | payload`, appended to `out`.
pub fn frame_record(lsn: u64, payload: &[u8], out: &mut Vec<u8>) {
    let body_len = 8 + payload.len();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(payload);
    out.reserve(FRAME_LEN + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}

/// One decoded record.
#[derive(Debug)]
pub struct Record {
    /// Its log sequence number.
    pub lsn: u64,
    /// The project its spans belong to.
    pub project: Arc<str>,
    /// The spans.
    pub batch: RecordBatch,
}

/// How reading a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belonged to a valid record.
    Clean,
    /// The last record was incomplete or did not check out, and nothing followed it.
    Torn {
        /// Where the valid prefix ends.
        valid_len: u64,
    },
    /// A record did not check out and more bytes followed it.
    Corrupt {
        /// Where the valid prefix ends.
        valid_len: u64,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Reads every valid record of a segment's bytes.
pub fn read_segment(bytes: &[u8]) -> (Vec<Record>, Tail) {
    let mut records = Vec::new();
    if bytes.len() < HEADER_LEN {
        // A segment that died before its header was complete holds no record.
        return (records, Tail::Torn { valid_len: 0 });
    }
    if &bytes[..8] != MAGIC
        || u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default()) != VERSION
    {
        return (records, Tail::Corrupt { valid_len: 0, reason: "bad segment header" });
    }
    let mut pos = HEADER_LEN;
    loop {
        let rest = &bytes[pos..];
        if rest.is_empty() {
            return (records, Tail::Clean);
        }
        let bad = |reason: &'static str, end: usize| {
            if end >= bytes.len() {
                Tail::Torn { valid_len: pos as u64 }
            } else {
                Tail::Corrupt { valid_len: pos as u64, reason }
            }
        };
        if rest.len() < FRAME_LEN {
            return (records, Tail::Torn { valid_len: pos as u64 });
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
        if !(8..=MAX_BODY).contains(&len) {
            // A zeroed or garbage length: torn if only zeros follow (preallocated tail).
            let tail = if rest.iter().all(|b| *b == 0) {
                Tail::Torn { valid_len: pos as u64 }
            } else {
                Tail::Corrupt { valid_len: pos as u64, reason: "invalid record length" }
            };
            return (records, tail);
        }
        let end = pos + FRAME_LEN + len as usize;
        if end > bytes.len() {
            return (records, Tail::Torn { valid_len: pos as u64 });
        }
        let body = &bytes[pos + FRAME_LEN..end];
        if crc32fast::hash(body) != crc {
            return (records, bad("checksum mismatch", end));
        }
        match decode_body(body) {
            Some(record) => records.push(record),
            None => return (records, bad("undecodable record body", end)),
        }
        pos = end;
    }
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let lsn = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let project_len = u16::from_le_bytes(body.get(8..10)?.try_into().ok()?) as usize;
    let project = std::str::from_utf8(body.get(10..10 + project_len)?).ok()?;
    let ipc = body.get(10 + project_len..)?;
    let mut reader = StreamReader::try_new(Cursor::new(ipc), None).ok()?;
    let batch = reader.next()?.ok()?;
    Some(Record { lsn, project: Arc::from(project), batch })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SpanBatchBuilder;
    use crate::record::SpanRecord;

    fn batch(n: usize) -> RecordBatch {
        let mut b = SpanBatchBuilder::with_capacity(n);
        for i in 0..n {
            b.append(&SpanRecord {
                trace_id: [i as u8 + 1; 16],
                span_id: [7; 8],
                name: "s",
                attributes: "{}",
                ..Default::default()
            });
        }
        b.finish().unwrap()
    }

    fn segment(records: &[(u64, usize)]) -> Vec<u8> {
        let mut out = header().to_vec();
        for (lsn, n) in records {
            frame_record(*lsn, &encode_payload("p1", &batch(*n)).unwrap(), &mut out);
        }
        out
    }

    #[test]
    fn round_trip() {
        let bytes = segment(&[(1, 3), (2, 1)]);
        let (records, tail) = read_segment(&bytes);
        assert_eq!(tail, Tail::Clean);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].lsn, 1);
        assert_eq!(&*records[0].project, "p1");
        assert_eq!(records[0].batch, batch(3));
        assert_eq!(records[1].batch.num_rows(), 1);
    }

    #[test]
    fn torn_tail_is_dropped_at_every_cut() {
        let full = segment(&[(1, 2), (2, 2)]);
        let first_end = segment(&[(1, 2)]).len();
        for cut in first_end..full.len() {
            let (records, tail) = read_segment(&full[..cut]);
            assert_eq!(records.len(), 1, "cut at {cut}");
            if cut == first_end {
                assert_eq!(tail, Tail::Clean);
            } else {
                assert_eq!(tail, Tail::Torn { valid_len: first_end as u64 }, "cut at {cut}");
            }
        }
    }

    #[test]
    fn damage_in_the_middle_is_corruption() {
        let mut bytes = segment(&[(1, 2), (2, 2), (3, 2)]);
        let first_end = segment(&[(1, 2)]).len();
        bytes[first_end + 20] ^= 0xff;
        let (records, tail) = read_segment(&bytes);
        assert_eq!(records.len(), 1);
        assert_eq!(
            tail,
            Tail::Corrupt { valid_len: first_end as u64, reason: "checksum mismatch" }
        );
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let mut bytes = segment(&[(1, 2)]);
        let end = bytes.len();
        bytes.extend_from_slice(&[0u8; 100]);
        let (records, tail) = read_segment(&bytes);
        assert_eq!(records.len(), 1);
        assert_eq!(tail, Tail::Torn { valid_len: end as u64 });
    }
}
