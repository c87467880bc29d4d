//! OTLP trace requests decoded in place: every string and id borrows the request's bytes.
//!
//! `prost` decodes an export request into owned structs, one allocation per string, per id and
//! per attribute list: for a small span, a dozen allocations that are freed again as soon as the
//! span has been copied into Arrow columns. This decoder reads the same protobuf into structs
//! whose strings and ids are slices of the received bytes, so a span costs one allocation per
//! non-empty list (attributes, events, links). It follows protobuf's decoding rules as `prost`
//! does: unknown fields (of every wire type, groups included) are skipped; a scalar field sent
//! twice keeps its last value; a message field sent twice is merged; a field of the wrong wire
//! type, a length past the end, a bad varint or a string that is not UTF-8 is an error naming
//! the field. Fields spanlake does not store (dropped counts, flags, schema URLs, entity
//! references) are checked the same way and then dropped.
//!
//! The module's tests check it against `prost` on captured instrumentation output, on every
//! truncation of it and on corrupted copies.

use std::fmt;

/// Why bytes are not a valid OTLP trace request: the field being read and the problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    /// The message and field (`Span.name`), or the message alone.
    pub field: &'static str,
    /// What is wrong.
    pub reason: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for DecodeError {}

type Result<T> = std::result::Result<T, DecodeError>;

/// `ExportTraceServiceRequest`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ExportRequest<'a> {
    /// Spans grouped by the resource that produced them.
    pub resource_spans: Vec<ResourceSpans<'a>>,
}

/// `ResourceSpans` (with its `Resource`'s attributes).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ResourceSpans<'a> {
    /// Attributes of the resource (`service.name`, ...).
    pub resource_attributes: Vec<KeyValue<'a>>,
    /// Spans grouped by instrumentation scope.
    pub scope_spans: Vec<ScopeSpans<'a>>,
}

/// `ScopeSpans`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ScopeSpans<'a> {
    /// The instrumentation scope, when sent.
    pub scope: Option<Scope<'a>>,
    /// The spans.
    pub spans: Vec<Span<'a>>,
}

/// `InstrumentationScope`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Scope<'a> {
    /// Name of the instrumentation library.
    pub name: &'a str,
    /// Its version.
    pub version: &'a str,
    /// Its attributes.
    pub attributes: Vec<KeyValue<'a>>,
}

/// `Span`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Span<'a> {
    /// Trace id as sent (16 bytes when valid).
    pub trace_id: &'a [u8],
    /// Span id as sent (8 bytes when valid).
    pub span_id: &'a [u8],
    /// W3C trace state.
    pub trace_state: &'a str,
    /// Parent span id as sent (empty for a root).
    pub parent_span_id: &'a [u8],
    /// Operation name.
    pub name: &'a str,
    /// `SpanKind` as its number.
    pub kind: i32,
    /// Start time.
    pub start_time_unix_nano: u64,
    /// End time.
    pub end_time_unix_nano: u64,
    /// Attributes in the order sent.
    pub attributes: Vec<KeyValue<'a>>,
    /// Events.
    pub events: Vec<Event<'a>>,
    /// Links.
    pub links: Vec<Link<'a>>,
    /// Status, when sent.
    pub status: Option<Status<'a>>,
}

/// `Span.Event`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Event<'a> {
    /// When it happened.
    pub time_unix_nano: u64,
    /// Its name.
    pub name: &'a str,
    /// Its attributes.
    pub attributes: Vec<KeyValue<'a>>,
}

/// `Span.Link`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Link<'a> {
    /// Linked trace id as sent.
    pub trace_id: &'a [u8],
    /// Linked span id as sent.
    pub span_id: &'a [u8],
    /// Its trace state.
    pub trace_state: &'a str,
    /// Its attributes.
    pub attributes: Vec<KeyValue<'a>>,
}

/// `Status`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Status<'a> {
    /// Description for people.
    pub message: &'a str,
    /// `StatusCode` as its number.
    pub code: i32,
}

/// `KeyValue`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeyValue<'a> {
    /// Attribute name.
    pub key: &'a str,
    /// Its value ([`AnyValue::Empty`] when not sent).
    pub value: AnyValue<'a>,
}

/// `AnyValue`.
#[derive(Debug, Default, Clone, PartialEq)]
pub enum AnyValue<'a> {
    /// No value set (also a string-table index, which only profiles use).
    #[default]
    Empty,
    /// `string_value`.
    String(&'a str),
    /// `bool_value`.
    Bool(bool),
    /// `int_value`.
    Int(i64),
    /// `double_value`.
    Double(f64),
    /// `array_value`.
    Array(Vec<AnyValue<'a>>),
    /// `kvlist_value`.
    Kvlist(Vec<KeyValue<'a>>),
    /// `bytes_value`.
    Bytes(&'a [u8]),
}

impl<'a> AnyValue<'a> {
    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            AnyValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Nesting allowed for values, groups and messages (as `prost`'s recursion limit).
const MAX_DEPTH: u32 = 100;

/// Wire bytes per span assumed at least when a span list is sized from its first span.
const MIN_RESERVED_SPAN_BYTES: usize = 64;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Decodes an `ExportTraceServiceRequest`.
pub fn decode(bytes: &[u8]) -> Result<ExportRequest<'_>> {
    let mut req = ExportRequest::default();
    let mut r = Reader { buf: bytes, what: "ExportTraceServiceRequest" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                let mut rs = ResourceSpans::default();
                resource_spans(
                    r.message(wire, "ExportTraceServiceRequest.resource_spans")?,
                    &mut rs,
                )?;
                req.resource_spans.push(rs);
            }
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(req)
}

fn resource_spans<'a>(buf: &'a [u8], out: &mut ResourceSpans<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "ResourceSpans" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => resource(r.message(wire, "ResourceSpans.resource")?, out)?,
            2 => {
                let mut ss = ScopeSpans::default();
                scope_spans(r.message(wire, "ResourceSpans.scope_spans")?, &mut ss)?;
                out.scope_spans.push(ss);
            }
            3 => _ = r.string(wire, "ResourceSpans.schema_url")?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn resource<'a>(buf: &'a [u8], out: &mut ResourceSpans<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "Resource" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                out.resource_attributes.push(key_value(r.message(wire, "Resource.attributes")?, 0)?)
            }
            2 => _ = r.varint_field(wire, "Resource.dropped_attributes_count")?,
            3 => entity_ref(r.message(wire, "Resource.entity_refs")?)?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn scope_spans<'a>(buf: &'a [u8], out: &mut ScopeSpans<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "ScopeSpans" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => scope(r.message(wire, "ScopeSpans.scope")?, out.scope.get_or_insert_default())?,
            2 => {
                let body = r.message(wire, "ScopeSpans.spans")?;
                if out.spans.is_empty() {
                    // Room for as many spans as the rest of the list holds if they are the size
                    // of the first: spans of one scope are alike, and the list grows only once.
                    // Counted at no less than 64 bytes a span, so that a tiny first span before
                    // a large one cannot make this reserve many times the request's size.
                    // The span's wire size: its bytes, its tag and its length prefix.
                    let prefix = (usize::BITS - body.len().leading_zeros()).div_ceil(7).max(1);
                    let wire = (body.len() + 1 + prefix as usize).max(MIN_RESERVED_SPAN_BYTES);
                    let rest = r.buf.len() / wire;
                    // A little over, for spans a little smaller than the first.
                    out.spans.reserve(1 + rest + rest / 16);
                }
                let mut s = Span::default();
                span(body, &mut s)?;
                out.spans.push(s);
            }
            3 => _ = r.string(wire, "ScopeSpans.schema_url")?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn scope<'a>(buf: &'a [u8], out: &mut Scope<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "InstrumentationScope" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => out.name = r.string(wire, "InstrumentationScope.name")?,
            2 => out.version = r.string(wire, "InstrumentationScope.version")?,
            3 => out
                .attributes
                .push(key_value(r.message(wire, "InstrumentationScope.attributes")?, 0)?),
            4 => _ = r.varint_field(wire, "InstrumentationScope.dropped_attributes_count")?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn span<'a>(buf: &'a [u8], out: &mut Span<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "Span" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => out.trace_id = r.message(wire, "Span.trace_id")?,
            2 => out.span_id = r.message(wire, "Span.span_id")?,
            3 => out.trace_state = r.string(wire, "Span.trace_state")?,
            4 => out.parent_span_id = r.message(wire, "Span.parent_span_id")?,
            5 => out.name = r.string(wire, "Span.name")?,
            6 => out.kind = r.enumeration(wire, "Span.kind")?,
            7 => out.start_time_unix_nano = r.fixed64(wire, "Span.start_time_unix_nano")?,
            8 => out.end_time_unix_nano = r.fixed64(wire, "Span.end_time_unix_nano")?,
            9 => {
                if out.attributes.is_empty() {
                    // One allocation for a span's usual handful of attributes (fewer when the
                    // rest of the span is too short to hold them).
                    out.attributes.reserve((r.buf.len() / 16 + 1).min(8));
                }
                out.attributes.push(key_value(r.message(wire, "Span.attributes")?, 0)?);
            }
            10 => _ = r.varint_field(wire, "Span.dropped_attributes_count")?,
            12 => _ = r.varint_field(wire, "Span.dropped_events_count")?,
            14 => _ = r.varint_field(wire, "Span.dropped_links_count")?,
            16 => _ = r.fixed32(wire, "Span.flags")?,
            11 => {
                let mut e = Event::default();
                event(r.message(wire, "Span.events")?, &mut e)?;
                out.events.push(e);
            }
            13 => {
                let mut l = Link::default();
                link(r.message(wire, "Span.links")?, &mut l)?;
                out.links.push(l);
            }
            15 => status(r.message(wire, "Span.status")?, out.status.get_or_insert_default())?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn event<'a>(buf: &'a [u8], out: &mut Event<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "Span.Event" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => out.time_unix_nano = r.fixed64(wire, "Span.Event.time_unix_nano")?,
            2 => out.name = r.string(wire, "Span.Event.name")?,
            3 => out.attributes.push(key_value(r.message(wire, "Span.Event.attributes")?, 0)?),
            4 => _ = r.varint_field(wire, "Span.Event.dropped_attributes_count")?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn link<'a>(buf: &'a [u8], out: &mut Link<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "Span.Link" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => out.trace_id = r.message(wire, "Span.Link.trace_id")?,
            2 => out.span_id = r.message(wire, "Span.Link.span_id")?,
            3 => out.trace_state = r.string(wire, "Span.Link.trace_state")?,
            4 => out.attributes.push(key_value(r.message(wire, "Span.Link.attributes")?, 0)?),
            5 => _ = r.varint_field(wire, "Span.Link.dropped_attributes_count")?,
            6 => _ = r.fixed32(wire, "Span.Link.flags")?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn status<'a>(buf: &'a [u8], out: &mut Status<'a>) -> Result<()> {
    let mut r = Reader { buf, what: "Status" };
    while let Some((field, wire)) = r.key()? {
        match field {
            2 => out.message = r.string(wire, "Status.message")?,
            3 => out.code = r.enumeration(wire, "Status.code")?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

/// `EntityRef`: not stored, but checked as `prost` checks it.
fn entity_ref(buf: &[u8]) -> Result<()> {
    let mut r = Reader { buf, what: "EntityRef" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => _ = r.string(wire, "EntityRef.schema_url")?,
            2 => _ = r.string(wire, "EntityRef.type")?,
            3 => _ = r.string(wire, "EntityRef.id_keys")?,
            4 => _ = r.string(wire, "EntityRef.description_keys")?,
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(())
}

fn key_value(buf: &[u8], depth: u32) -> Result<KeyValue<'_>> {
    let mut kv = KeyValue::default();
    let mut r = Reader { buf, what: "KeyValue" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => kv.key = r.string(wire, "KeyValue.key")?,
            2 => any_value(r.message(wire, "KeyValue.value")?, &mut kv.value, depth + 1)?,
            3 => _ = r.varint_field(wire, "KeyValue.key_strindex")?,
            _ => r.skip(field, wire, depth)?,
        }
    }
    Ok(kv)
}

fn any_value<'a>(buf: &'a [u8], out: &mut AnyValue<'a>, depth: u32) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(DecodeError { field: "AnyValue", reason: "nested too deep" });
    }
    let mut r = Reader { buf, what: "AnyValue" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => *out = AnyValue::String(r.string(wire, "AnyValue.string_value")?),
            2 => *out = AnyValue::Bool(r.varint_field(wire, "AnyValue.bool_value")? != 0),
            3 => *out = AnyValue::Int(r.varint_field(wire, "AnyValue.int_value")? as i64),
            4 => {
                let bits = r.fixed64(wire, "AnyValue.double_value")?;
                *out = AnyValue::Double(f64::from_bits(bits));
            }
            5 => {
                let body = r.message(wire, "AnyValue.array_value")?;
                // A oneof message sent twice merges into the value already there.
                if !matches!(out, AnyValue::Array(_)) {
                    *out = AnyValue::Array(Vec::new());
                }
                let AnyValue::Array(items) = out else { unreachable!("set above") };
                array_value(body, items, depth)?;
            }
            6 => {
                let body = r.message(wire, "AnyValue.kvlist_value")?;
                if !matches!(out, AnyValue::Kvlist(_)) {
                    *out = AnyValue::Kvlist(Vec::new());
                }
                let AnyValue::Kvlist(items) = out else { unreachable!("set above") };
                kvlist_value(body, items, depth)?;
            }
            7 => *out = AnyValue::Bytes(r.message(wire, "AnyValue.bytes_value")?),
            8 => {
                r.varint_field(wire, "AnyValue.string_value_strindex")?;
                *out = AnyValue::Empty;
            }
            _ => r.skip(field, wire, depth)?,
        }
    }
    Ok(())
}

fn array_value<'a>(buf: &'a [u8], out: &mut Vec<AnyValue<'a>>, depth: u32) -> Result<()> {
    let mut r = Reader { buf, what: "ArrayValue" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                let mut v = AnyValue::Empty;
                any_value(r.message(wire, "ArrayValue.values")?, &mut v, depth + 1)?;
                out.push(v);
            }
            _ => r.skip(field, wire, depth)?,
        }
    }
    Ok(())
}

fn kvlist_value<'a>(buf: &'a [u8], out: &mut Vec<KeyValue<'a>>, depth: u32) -> Result<()> {
    let mut r = Reader { buf, what: "KeyValueList" };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => out.push(key_value(r.message(wire, "KeyValueList.values")?, depth + 1)?),
            _ => r.skip(field, wire, depth)?,
        }
    }
    Ok(())
}

/// The unread rest of one message.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, field: &'static str, reason: &'static str) -> DecodeError {
        DecodeError { field, reason }
    }

    #[inline]
    fn varint(&mut self, field: &'static str) -> Result<u64> {
        let mut value = 0u64;
        for (i, &b) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b > 1 {
                    break;
                }
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(self.err(field, "invalid varint"))
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    #[inline]
    fn key(&mut self) -> Result<Option<(u32, u8)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint(self.what)?;
        let key = u32::try_from(key).map_err(|_| self.err(self.what, "invalid key"))?;
        let field = key >> 3;
        if field == 0 {
            return Err(self.err(self.what, "invalid field number 0"));
        }
        Ok(Some((field, (key & 7) as u8)))
    }

    fn expect(&self, wire: u8, expected: u8, field: &'static str) -> Result<()> {
        if wire == expected { Ok(()) } else { Err(self.err(field, "wrong wire type")) }
    }

    /// A length-delimited field's bytes (a message, bytes or a string).
    #[inline]
    fn message(&mut self, wire: u8, field: &'static str) -> Result<&'a [u8]> {
        self.expect(wire, LEN, field)?;
        self.len_prefixed(field)
    }

    fn len_prefixed(&mut self, field: &'static str) -> Result<&'a [u8]> {
        let len = self.varint(field)?;
        let len = usize::try_from(len).map_err(|_| self.err(field, "length past the end"))?;
        if len > self.buf.len() {
            return Err(self.err(field, "length past the end"));
        }
        let (body, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(body)
    }

    #[inline]
    fn string(&mut self, wire: u8, field: &'static str) -> Result<&'a str> {
        let bytes = self.message(wire, field)?;
        std::str::from_utf8(bytes).map_err(|_| self.err(field, "string is not UTF-8"))
    }

    fn varint_field(&mut self, wire: u8, field: &'static str) -> Result<u64> {
        self.expect(wire, VARINT, field)?;
        self.varint(field)
    }

    fn enumeration(&mut self, wire: u8, field: &'static str) -> Result<i32> {
        // Enums are int32: a negative number is sent as ten bytes and truncates back.
        Ok(self.varint_field(wire, field)? as i32)
    }

    fn fixed64(&mut self, wire: u8, field: &'static str) -> Result<u64> {
        self.expect(wire, FIXED64, field)?;
        let (bytes, rest) =
            self.buf.split_first_chunk::<8>().ok_or(self.err(field, "length past the end"))?;
        self.buf = rest;
        Ok(u64::from_le_bytes(*bytes))
    }

    fn fixed32(&mut self, wire: u8, field: &'static str) -> Result<u32> {
        self.expect(wire, FIXED32, field)?;
        let (bytes, rest) =
            self.buf.split_first_chunk::<4>().ok_or(self.err(field, "length past the end"))?;
        self.buf = rest;
        Ok(u32::from_le_bytes(*bytes))
    }

    /// Skips an unknown field of any wire type (a group up to its matching end).
    fn skip(&mut self, field: u32, wire: u8, depth: u32) -> Result<()> {
        let what = self.what;
        match wire {
            VARINT => {
                self.varint(what)?;
            }
            FIXED64 | FIXED32 => {
                let n = if wire == FIXED64 { 8 } else { 4 };
                if self.buf.len() < n {
                    return Err(self.err(what, "length past the end"));
                }
                self.buf = &self.buf[n..];
            }
            LEN => {
                self.len_prefixed(what)?;
            }
            START_GROUP => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(what, "nested too deep"));
                }
                loop {
                    let Some((f, w)) = self.key()? else {
                        return Err(self.err(what, "group without its end"));
                    };
                    if w == END_GROUP {
                        if f != field {
                            return Err(self.err(what, "unexpected end group"));
                        }
                        break;
                    }
                    self.skip(f, w, depth + 1)?;
                }
            }
            END_GROUP => return Err(self.err(what, "unexpected end group")),
            _ => return Err(self.err(what, "invalid wire type")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
