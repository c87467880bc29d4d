//! JSON text written straight from OTLP values, under the per-span limits.
//!
//! Attribute maps become JSON objects keyed by attribute name, with typed values: strings,
//! integers and doubles as numbers, booleans, arrays, key-value lists as objects, bytes as
//! base64 strings, and non-finite doubles as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`.
//! No intermediate tree is built: this runs for every attribute of every span.

use std::fmt::Write as _;

use base64::Engine as _;
use spanlake_engine::schema::MOVED_TO_COLUMN;
use spanlake_proto::view::{AnyValue, KeyValue};

use crate::limits::SpanLimits;

/// What writing JSON had to cut to stay within the limits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cuts {
    /// String values truncated.
    pub truncated_values: u64,
    /// Attributes dropped past the per-span count.
    pub dropped_attributes: u64,
    /// Values replaced because they nested too deep.
    pub too_deep: u64,
}

impl Cuts {
    /// Whether anything was cut.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }

    /// Adds `other`.
    pub fn add(&mut self, other: Cuts) {
        self.truncated_values += other.truncated_values;
        self.dropped_attributes += other.dropped_attributes;
        self.too_deep += other.too_deep;
    }
}

/// Writes JSON under limits, counting what it cut.
#[derive(Debug)]
pub struct JsonWriter<'l> {
    limits: &'l SpanLimits,
    /// What was cut so far.
    pub cuts: Cuts,
}

/// Whether any of the 8 bytes of `w` needs escaping in a JSON string: `"`, `\` or a control
/// character (below 0x20). Exact, no false positives (each test is the classic "has zero
/// byte" / "has byte less than" bit trick, which is exact for the existence question).
#[inline]
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
    below_space || has_zero(w ^ (ONES * u64::from(b'"'))) || has_zero(w ^ (ONES * u64::from(b'\\')))
}

/// Appends `s` as a JSON string literal.
///
/// Prompts and completions are most of an LLM span's bytes and this runs over each of them,
/// so clean runs are found 8 bytes at a time and copied whole.
pub fn write_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if !needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => {
                i += 1;
                continue;
            }
        };
        // `i` is on an ASCII byte, so both slices end on character boundaries.
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The marker appended to a truncated value: what was kept and how long the original was.
pub fn truncation_marker(kept: usize, original: usize) -> String {
    format!("…[truncated: {kept} of {original} bytes]")
}

/// `s` cut to at most `max` bytes on a character boundary, with the marker, if it is longer.
pub fn truncate(s: &str, max: usize) -> Option<String> {
    if s.len() <= max {
        return None;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 48);
    out.push_str(&s[..end]);
    out.push_str(&truncation_marker(end, s.len()));
    Some(out)
}

impl<'l> JsonWriter<'l> {
    /// A writer under `limits`.
    pub fn new(limits: &'l SpanLimits) -> Self {
        Self { limits, cuts: Cuts::default() }
    }

    fn string(&mut self, out: &mut String, s: &str) {
        match truncate(s, self.limits.max_value_bytes) {
            Some(cut) => {
                self.cuts.truncated_values += 1;
                write_str(out, &cut);
            }
            None => write_str(out, s),
        }
    }

    /// Appends an attribute list as a JSON object (at most `max_attributes` entries).
    pub fn attributes(&mut self, out: &mut String, list: &[KeyValue<'_>]) {
        self.object(out, list, 0);
    }

    /// Appends a span's attribute list like [`Self::attributes`], except that a string
    /// attribute whose value is one of `moved` (the same bytes, not an equal copy: the value
    /// a column was read from) is written as a reference to that column (see
    /// [`spanlake_engine::schema::MOVED_TO_COLUMN`]).
    pub fn span_attributes(
        &mut self,
        out: &mut String,
        list: &[KeyValue<'_>],
        moved: &[(&str, &'static str)],
    ) {
        self.object_moving(out, list, 0, moved);
    }

    fn object(&mut self, out: &mut String, list: &[KeyValue<'_>], depth: usize) {
        self.object_moving(out, list, depth, &[]);
    }

    fn object_moving(
        &mut self,
        out: &mut String,
        list: &[KeyValue<'_>],
        depth: usize,
        moved: &[(&str, &'static str)],
    ) {
        out.push('{');
        let max = self.limits.max_attributes;
        for (i, kv) in list.iter().enumerate() {
            if i >= max {
                self.cuts.dropped_attributes += (list.len() - max) as u64;
                break;
            }
            if i > 0 {
                out.push(',');
            }
            write_str(out, kv.key);
            out.push(':');
            let column = match &kv.value {
                AnyValue::String(v) => moved
                    .iter()
                    .find(|(m, _)| std::ptr::eq(m.as_ptr(), v.as_ptr()) && m.len() == v.len()),
                _ => None,
            };
            match column {
                Some((_, column)) => {
                    out.push('{');
                    write_str(out, MOVED_TO_COLUMN);
                    out.push(':');
                    write_str(out, column);
                    out.push('}');
                }
                None => self.value(out, &kv.value, depth + 1),
            }
        }
        out.push('}');
    }

    /// Appends one value.
    pub fn value(&mut self, out: &mut String, v: &AnyValue<'_>, depth: usize) {
        let nested = matches!(v, AnyValue::Array(_) | AnyValue::Kvlist(_));
        if nested && depth > self.limits.max_depth {
            self.cuts.too_deep += 1;
            out.push_str("\"[nesting deeper than ");
            let _ = write!(out, "{}", self.limits.max_depth);
            out.push_str(" levels]\"");
            return;
        }
        match v {
            // Also a string-table index, which is only meaningful in profiles.
            AnyValue::Empty => out.push_str("null"),
            AnyValue::String(s) => self.string(out, s),
            AnyValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            AnyValue::Int(i) => out.push_str(itoa::Buffer::new().format(*i)),
            AnyValue::Double(d) => write_f64(out, *d),
            AnyValue::Bytes(b) => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(b);
                self.string(out, &encoded);
            }
            AnyValue::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.value(out, item, depth + 1);
                }
                out.push(']');
            }
            AnyValue::Kvlist(list) => self.object(out, list, depth),
        }
    }
}

/// Appends a double as a JSON number (non-finite values as strings).
pub fn write_f64(out: &mut String, d: f64) {
    if d.is_nan() {
        out.push_str("\"NaN\"");
    } else if d.is_infinite() {
        out.push_str(if d > 0.0 { "\"Infinity\"" } else { "\"-Infinity\"" });
    } else if d.fract() == 0.0 && d.abs() < 1e15 {
        // Keep the decimal point so readers see a double, not an integer.
        let _ = write!(out, "{d:.1}");
    } else {
        let _ = write!(out, "{d}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv<'a>(key: &'a str, value: AnyValue<'a>) -> KeyValue<'a> {
        KeyValue { key, value }
    }

    #[test]
    fn values_keep_their_types() {
        use AnyValue as V;
        let attrs = vec![
            kv("s", V::String("x\"\n\u{1}é")),
            kv("i", V::Int(-3)),
            kv("d", V::Double(1.5)),
            kv("w", V::Double(2.0)),
            kv("b", V::Bool(true)),
            kv("bytes", V::Bytes(&[1, 2, 3])),
            kv("nan", V::Double(f64::NAN)),
            kv("a", V::Array(vec![V::Int(1)])),
            kv("kv", V::Kvlist(vec![kv("k", V::String("v"))])),
        ];
        let limits = SpanLimits::default();
        let mut w = JsonWriter::new(&limits);
        let mut out = String::new();
        w.attributes(&mut out, &attrs);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"a":[1],"b":true,"bytes":"AQID","d":1.5,"w":2.0,"i":-3,
                "kv":{"k":"v"},"nan":"NaN","s":"x\"\n\u{1}é"})
        );
        assert!(out.contains("\"w\":2.0"), "{out}");
        assert!(!w.cuts.any());
    }

    #[test]
    fn strings_escape_exactly_as_serde_json_does() {
        // Every byte class at every offset within and across the 8-byte steps.
        let specials =
            ["\"", "\\", "\n", "\r", "\t", "\u{1}", "\u{1f}", "é", "日本", " ", "x", "\u{7f}"];
        for len in 0..20 {
            for (n, special) in specials.iter().enumerate() {
                for at in 0..=len {
                    let mut text: String =
                        (0..len).map(|i| (b'a' + ((i + n) % 26) as u8) as char).collect();
                    text.insert_str(at, special);
                    let mut out = String::new();
                    write_str(&mut out, &text);
                    assert_eq!(out, serde_json::to_string(&text).unwrap(), "{text:?}");
                    assert_eq!(serde_json::from_str::<String>(&out).unwrap(), text);
                }
            }
        }
        for w in [
            0x2020_2020_2020_2020_u64,
            0x7f7f_7f7f_7f7f_7f7f,
            0xffff_ffff_ffff_ffff,
            0x2121_2121_2121_2121,
        ] {
            assert!(!needs_escape(w), "{w:x}");
        }
        for b in (0u8..0x20).chain([b'"', b'\\']) {
            for pos in 0..8 {
                let mut bytes = [b'a'; 8];
                bytes[pos] = b;
                assert!(needs_escape(u64::from_le_bytes(bytes)), "{b} at {pos}");
            }
        }
    }

    #[test]
    fn limits_cut_and_count() {
        use AnyValue as V;
        let limits = SpanLimits {
            max_attributes: 2,
            max_value_bytes: 5,
            max_depth: 1,
            ..SpanLimits::default()
        };
        let deep = V::Array(vec![V::Array(vec![])]);
        let attrs = vec![kv("long", V::String("ééééé")), kv("deep", deep), kv("gone", V::Int(1))];
        let mut w = JsonWriter::new(&limits);
        let mut out = String::new();
        w.attributes(&mut out, &attrs);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["long"], "éé…[truncated: 4 of 10 bytes]");
        assert_eq!(parsed["deep"], serde_json::json!(["[nesting deeper than 1 levels]"]));
        assert!(parsed.get("gone").is_none());
        assert_eq!(w.cuts, Cuts { truncated_values: 1, dropped_attributes: 1, too_deep: 1 });
    }
}
