//! The trace index: which data files may hold a trace, without a time range.
//!
//! Every data file gets a small Bloom filter over the distinct trace ids it holds (20 bits per
//! trace, under 0.01 % false positives), written as its own object next to the catalog:
//!
//! ```text
//! _index/trace/v1/<data file path>.bloom
//! ```
//!
//! The filter object is put before the catalog commit that adds its data file, so a committed
//! file's filter always exists; a crash in between leaves an orphan that orphan collection
//! deletes together with the data file. Each node holds every committed file's filter in
//! memory (2.5 bytes per trace: 25 MB for 10 million traces), loaded at start and kept
//! in step with catalog changes, so a lookup by trace id tests every file in microseconds and
//! opens only the one or two files that hold the trace — whatever its time and however many
//! partitions it straddles. The false-positive rate is what keeps this true as files add up:
//! at 1 % (the first release's 10 bits per trace), a lookup over the 1,103 files of 100 M
//! spans opened 15 files for a trace held in 2; at 20 bits it opened the 2 (0.07 false
//! candidates expected per lookup over 1,103 files). Each filter records its own size and hash count, so filters of
//! either size are read alike. Inside a file, Parquet's own bloom filter, statistics and page
//! index narrow the read to a few pages. Files whose filter is not loaded yet are treated as
//! candidates, so a lookup is never wrong, only slower, while the index loads.
//!
//! # Filter format, version 1
//!
//! ```text
//! magic "SLTB" | version u8 = 1 | hashes u8 | reserved u16 | bits u64 (LE) | words u64 (LE)...
//! ```
//!
//! A trace id is hashed as its lowercase hex text with 64-bit FNV-1a followed by the
//! SplitMix64 finaliser; probe `i` sets bit `(h1 + i * h2) mod bits` (double hashing), with
//! `h1`, `h2` the two halves of a second finalisation. The hash is spelled out here because
//! the filters are persisted: it must never change within a format version.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::{BufMut as _, Bytes, BytesMut};

const MAGIC: &[u8; 4] = b"SLTB";
const VERSION: u8 = 1;
const HEADER: usize = 16;
/// Bits per trace: about 0.007 % false positives with 14 hash functions.
const BITS_PER_KEY: u64 = 20;
const HASHES: u8 = 14;

/// Where the filter of a data file lives.
pub fn filter_path(data_path: &str) -> String {
    format!("_index/trace/v1/{data_path}.bloom")
}

/// The prefix of all trace filter objects.
pub const INDEX_PREFIX: &str = "_index/trace/v1";

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A trace id hashed once, to test against the filters of many files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    h1: u64,
    h2: u64,
}

impl Probe {
    /// The probe of `trace_id` (its lowercase hex text).
    pub fn new(trace_id: &str) -> Self {
        let h = splitmix(fnv1a(trace_id.as_bytes()));
        let g = splitmix(h);
        Self { h1: h, h2: g | 1 }
    }
}

/// A Bloom filter over the trace ids of one data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceFilter {
    bits: u64,
    hashes: u8,
    words: Vec<u64>,
}

impl TraceFilter {
    /// A filter sized for `traces` distinct ids.
    pub fn with_capacity(traces: usize) -> Self {
        let bits = (traces as u64 * BITS_PER_KEY).max(64).next_multiple_of(64);
        Self { bits, hashes: HASHES, words: vec![0; (bits / 64) as usize] }
    }

    /// A filter over `ids` (repeats are fine).
    pub fn build<'a>(ids: impl IntoIterator<Item = &'a str>, distinct: usize) -> Self {
        let mut f = Self::with_capacity(distinct);
        for id in ids {
            f.insert(id);
        }
        f
    }

    /// Adds a trace id.
    pub fn insert(&mut self, trace_id: &str) {
        let Probe { h1, h2 } = Probe::new(trace_id);
        for i in 0..u64::from(self.hashes) {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % self.bits;
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// False when the trace is certainly not in the file.
    pub fn may_contain(&self, trace_id: &str) -> bool {
        let probe = Probe::new(trace_id);
        (0..self.hashes).all(|i| self.bit(probe, i))
    }

    /// Whether the `i`th bit of `probe` is set.
    fn bit(&self, Probe { h1, h2 }: Probe, i: u8) -> bool {
        let bit = h1.wrapping_add(u64::from(i).wrapping_mul(h2)) % self.bits;
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Bytes held in memory.
    pub fn memory_size(&self) -> usize {
        self.words.len() * 8 + std::mem::size_of::<Self>()
    }

    /// The persisted form (format version 1).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER + self.words.len() * 8);
        b.put_slice(MAGIC);
        b.put_u8(VERSION);
        b.put_u8(self.hashes);
        b.put_u16_le(0);
        b.put_u64_le(self.bits);
        for w in &self.words {
            b.put_u64_le(*w);
        }
        b.freeze()
    }

    /// Reads the persisted form; `None` when it is not a version 1 filter.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < HEADER || &b[..4] != MAGIC || b[4] != VERSION {
            return None;
        }
        let hashes = b[5];
        let bits = u64::from_le_bytes(b[8..16].try_into().ok()?);
        let body = &b[HEADER..];
        if bits == 0 || !bits.is_multiple_of(64) || body.len() as u64 != bits / 8 || hashes == 0 {
            return None;
        }
        let words = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Some(Self { bits, hashes, words })
    }
}

/// Filters by data file path. A lookup by trace id hashes the path of every data file, so the
/// map uses a fast hash rather than the default SipHash.
type Filters = HashMap<String, Arc<TraceFilter>, foldhash::fast::RandomState>;

/// The filters of the committed data files, by data file path.
#[derive(Debug, Default)]
pub struct TraceIndex {
    filters: RwLock<Filters>,
}

/// One trace id tested against many files: hashed once, with the index read once.
#[derive(Debug)]
pub struct Lookup<'a> {
    filters: RwLockReadGuard<'a, Filters>,
    probe: Probe,
}

impl Lookup<'_> {
    /// Whether each file of `paths` may hold the trace (true when its filter is not loaded),
    /// tested bit by bit across all of them. Each test is a cache miss (the filters of a large
    /// store take hundreds of megabytes); the misses of one round over many files overlap,
    /// where file by file each waited for the last: at 1,500 files the tests took 8.9 % of a
    /// lookup's CPU file by file and about 4 % together.
    pub fn may_contain_all(&self, paths: &[&str]) -> Vec<bool> {
        let mut result = vec![true; paths.len()];
        let mut alive: Vec<(usize, &TraceFilter)> = paths
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.filters.get(*p).map(|f| (i, f.as_ref())))
            .collect();
        let rounds = alive.iter().map(|(_, f)| f.hashes).max().unwrap_or(0);
        for round in 0..rounds {
            // The bits first, with no branch on them, so that their loads run side by side.
            let set: Vec<bool> =
                alive.iter().map(|(_, f)| round >= f.hashes || f.bit(self.probe, round)).collect();
            let mut set = set.into_iter();
            alive.retain(|(i, _)| {
                let keep = set.next().unwrap_or(true);
                if !keep {
                    result[*i] = false;
                }
                keep
            });
            if alive.is_empty() {
                break;
            }
        }
        result
    }
}

impl TraceIndex {
    fn read(&self) -> RwLockReadGuard<'_, Filters> {
        self.filters.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Filters> {
        self.filters.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts testing files for `trace_id`; the index is read-locked until the lookup is dropped.
    pub fn lookup(&self, trace_id: &str) -> Lookup<'_> {
        Lookup { filters: self.read(), probe: Probe::new(trace_id) }
    }

    /// Adds the filter of a data file.
    pub fn insert(&self, path: &str, filter: Arc<TraceFilter>) {
        self.write().insert(path.to_string(), filter);
    }

    /// Forgets the filters of removed files.
    pub fn remove<'a>(&self, paths: impl IntoIterator<Item = &'a String>) {
        let mut f = self.write();
        for p in paths {
            f.remove(p);
        }
    }

    /// Whether the filter of `path` is loaded.
    pub fn has(&self, path: &str) -> bool {
        self.read().contains_key(path)
    }

    /// Filters loaded, and the bytes they hold.
    pub fn stats(&self) -> (usize, usize) {
        let f = self.read();
        (f.len(), f.values().map(|f| f.memory_size()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u64) -> String {
        format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let ids: Vec<String> = (0..10_000).map(id).collect();
        let f = TraceFilter::build(ids.iter().map(String::as_str), ids.len());
        assert!(ids.iter().all(|i| f.may_contain(i)));
        let fp = (10_000..110_000).filter(|i| f.may_contain(&id(*i))).count();
        // 7 here (0.007 %); the first release's 10 bits per trace gave about 1,000.
        assert!(fp < 30, "{fp} false positives in 100000");
        let back = TraceFilter::from_bytes(&f.to_bytes()).unwrap();
        assert_eq!(back, f);
        assert!(TraceFilter::from_bytes(b"SLTB\x02").is_none());
        assert!(TraceFilter::from_bytes(&f.to_bytes()[..40]).is_none());
    }

    #[test]
    fn filters_of_the_first_size_still_answer() {
        // Written by the first release: 10 bits per trace, 7 hashes.
        let ids: Vec<String> = (0..1_000).map(id).collect();
        let mut old = TraceFilter { bits: 10_048, hashes: 7, words: vec![0; 157] };
        for i in &ids {
            old.insert(i);
        }
        let back = TraceFilter::from_bytes(&old.to_bytes()).unwrap();
        assert_eq!((back.bits, back.hashes), (10_048, 7));
        assert!(ids.iter().all(|i| back.may_contain(i)));
        assert!(!back.may_contain(&id(123_456_789)));
    }

    #[test]
    fn hash_is_stable() {
        // Persisted filters depend on it: a change needs a new format version.
        // Value computed independently (FNV-1a 64, then SplitMix64) from the format description.
        assert_eq!(Probe::new("0af7651916cd43dd8448eb211c80319c").h1, 0x4ed1_8b22_d4dc_a35d);
    }

    #[test]
    fn a_lookup_passes_files_that_may_hold_the_trace_or_have_no_filter_loaded() {
        let index = TraceIndex::default();
        let ids: Vec<String> = (0..100).map(id).collect();
        index.insert("a", Arc::new(TraceFilter::build(ids[..50].iter().map(String::as_str), 50)));
        index.insert("b", Arc::new(TraceFilter::build(ids[50..].iter().map(String::as_str), 50)));
        let may = index.lookup(&ids[7]).may_contain_all(&["a", "b", "not loaded"]);
        assert_eq!(may, [true, false, true]);
        index.remove(&["a".to_string()]);
        assert_eq!(index.lookup(&ids[7]).may_contain_all(&["a", "b"]), [true, false]);
    }

    #[test]
    fn files_tested_together_answer_as_one_by_one() {
        // 40 files of 200 ids each, one with filters of the first release's shape (7 hashes,
        // where later ones have their own count), and paths with no filter loaded.
        let index = TraceIndex::default();
        let paths: Vec<String> = (0..40).map(|f| format!("file-{f}")).collect();
        for (f, path) in paths.iter().enumerate() {
            let ids: Vec<String> = (f as u64 * 200..(f as u64 + 1) * 200).map(id).collect();
            let filter = if f == 3 {
                let mut old = TraceFilter { bits: 2_048, hashes: 7, words: vec![0; 32] };
                ids.iter().for_each(|i| old.insert(i));
                old
            } else {
                TraceFilter::build(ids.iter().map(String::as_str), ids.len())
            };
            index.insert(path, Arc::new(filter));
        }
        let mut all: Vec<&str> = paths.iter().map(String::as_str).collect();
        all.extend(["not loaded", "nor this"]);
        let (mut found, mut passed) = (0, 0);
        for i in (0..10_000).step_by(7) {
            let lookup = index.lookup(&id(i));
            let together = lookup.may_contain_all(&all);
            let one_by_one: Vec<bool> = all
                .iter()
                .map(|p| lookup.filters.get(*p).is_none_or(|f| f.may_contain(&id(i))))
                .collect();
            assert_eq!(together, one_by_one, "id {i}");
            if i < 8_000 {
                assert!(together[(i / 200) as usize], "id {i} is in file {}", i / 200);
                found += 1;
            }
            assert!(together[40] && together[41]);
            passed += together[..40].iter().filter(|&&p| p).count();
        }
        // Each id passes its own file (when it has one) and hardly any other.
        assert!(passed - found < 20, "{} false positives", passed - found);
        assert!(index.lookup(&id(1)).may_contain_all(&[]).is_empty());
    }
}
