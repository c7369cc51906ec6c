//! The subset of Go's `encoding/gob` that Weave's mesh uses: the features map and the
//! gossip envelopes and topology payloads.
//!
//! A gob stream is a sequence of messages `[uint length][int type id][body]`. A negative
//! id `-N` carries the type definition of id `N`; a positive id a value of that type.
//! Ids 1..=6 are built in (bool, int, uint, float, []byte, string); user types start at
//! 65 and are handed out by each sender in its own order, so the [`Decoder`] learns them
//! from the stream and resolves them only when it decodes a value.
//!
//! Every length read from the input is checked against the bytes that are left; nothing
//! is allocated from a length alone. Errors are [`GobError`].

use std::collections::HashMap;

use thiserror::Error;

/// Built-in type id of `bool`.
pub const BOOL_ID: i64 = 1;
/// Built-in type id of `int`.
pub const INT_ID: i64 = 2;
/// Built-in type id of `uint`.
pub const UINT_ID: i64 = 3;
/// Built-in type id of `[]byte`.
pub const BYTES_ID: i64 = 5;
/// Built-in type id of `string`.
pub const STRING_ID: i64 = 6;
/// The first id a sender hands out to its own types.
pub const FIRST_USER_ID: i64 = 65;

/// Most type definitions one stream may carry.
const MAX_TYPES: usize = 256;
/// Deepest nesting of values (structs in slices in maps ...) the decoder follows.
const MAX_DEPTH: usize = 32;
/// Longest type or field name accepted (Weave's are a few bytes).
const MAX_NAME: usize = 256;
/// Memory a decoded value may take, as a multiple of its encoded size, plus
/// [`VALUE_BUDGET_BASE`]: names are copied into every value and a one-byte element
/// becomes a whole value, so without a budget a small message could decode into
/// gigabytes.
const VALUE_BUDGET_FACTOR: usize = 48;
/// See [`VALUE_BUDGET_FACTOR`].
const VALUE_BUDGET_BASE: usize = 64 * 1024;
/// What one decoded value node is charged (its own size, roughly).
const VALUE_COST: usize = 32;

/// Why gob data was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GobError {
    /// The input ended inside a number, a string or a message.
    #[error("gob: unexpected end of data")]
    Truncated,
    /// An unsigned integer announced more than 8 bytes.
    #[error("gob: invalid uint data length {0}")]
    BadUintLength(u8),
    /// A length or count is larger than the bytes that are left.
    #[error("gob: length {len} exceeds the {available} bytes left")]
    LengthTooLarge {
        /// The length read.
        len: u64,
        /// The bytes left in the message.
        available: usize,
    },
    /// A value of a type id that was never defined in this stream.
    #[error("gob: unknown type id {0}")]
    UnknownType(i64),
    /// A type this decoder does not handle (float, complex, interface, arrays, ...).
    #[error("gob: unsupported type id {0}")]
    UnsupportedType(i64),
    /// A type id defined twice, or a definition of a built-in id.
    #[error("gob: duplicate type received: {0}")]
    DuplicateType(i64),
    /// More type definitions than a Weave stream ever needs.
    #[error("gob: too many type definitions")]
    TooManyTypes,
    /// A malformed type definition.
    #[error("gob: bad type definition: {0}")]
    BadTypeDef(&'static str),
    /// A struct field number beyond the fields of its type.
    #[error("gob: field number {field} out of range for {type_name} ({count} fields)")]
    FieldOutOfRange {
        /// The struct's type name.
        type_name: String,
        /// The field number reached.
        field: u64,
        /// How many fields the type has.
        count: usize,
    },
    /// A top-level non-struct value without its `00` byte.
    #[error("gob: missing 00 before a non-struct value")]
    MissingSingletonMarker,
    /// A message that holds more bytes than its value.
    #[error("gob: {0} extra bytes after a value")]
    TrailingBytes(usize),
    /// A string that is not UTF-8.
    #[error("gob: string is not UTF-8")]
    InvalidUtf8,
    /// A bool encoded as something other than 0 or 1.
    #[error("gob: invalid bool {0}")]
    InvalidBool(u64),
    /// Values nested deeper than this decoder follows.
    #[error("gob: values nested too deeply")]
    TooDeep,
    /// A value that would take far more memory decoded than encoded.
    #[error("gob: value too large once decoded ({limit} bytes allowed)")]
    TooLargeDecoded {
        /// The budget of the message.
        limit: usize,
    },
    /// A type or field name longer than this decoder accepts.
    #[error("gob: name of {0} bytes is too long")]
    NameTooLong(usize),
    /// A value of another type than the reader expected.
    #[error("gob: expected {expected} for {what}")]
    Unexpected {
        /// What was being read.
        what: &'static str,
        /// The expected kind of value.
        expected: &'static str,
    },
    /// The stream ended where a value was expected.
    #[error("gob: end of stream, expected {0}")]
    EndOfStream(&'static str),
}

// ---------------------------------------------------------------------------------------
// Primitive encoding

/// Appends a gob unsigned integer.
pub fn put_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
        return;
    }
    let bytes = v.to_be_bytes();
    let skip = (v.leading_zeros() / 8) as usize;
    let n = 8 - skip;
    out.push((256 - n) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// Appends a gob signed integer (zig-zag style: `n << 1`, or `(!n << 1) | 1`).
pub fn put_int(out: &mut Vec<u8>, v: i64) {
    let u = if v < 0 {
        ((!v as u64) << 1) | 1
    } else {
        (v as u64) << 1
    };
    put_uint(out, u);
}

/// Appends a gob `[]byte` (length, then the bytes).
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_uint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends a gob string (length, then the bytes).
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

/// Appends a gob bool (uint 0 or 1).
pub fn put_bool(out: &mut Vec<u8>, b: bool) {
    put_uint(out, u64::from(b));
}

/// Appends one gob message: `[uint length][int id][body]`.
pub fn put_message(out: &mut Vec<u8>, type_id: i64, body: &[u8]) {
    let mut id = Vec::with_capacity(10);
    put_int(&mut id, type_id);
    put_uint(out, (id.len() + body.len()) as u64);
    out.extend_from_slice(&id);
    out.extend_from_slice(body);
}

/// Writes a struct value field by field: each field as its number's delta from the
/// previous one, zero values left out, `00` at the end.
#[derive(Debug)]
pub struct StructWriter<'a> {
    out: &'a mut Vec<u8>,
    last: i64,
}

impl<'a> StructWriter<'a> {
    /// Starts a struct value at the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        StructWriter { out, last: -1 }
    }

    /// Writes the delta to field `field` (fields must come in increasing order) and
    /// returns the buffer for its value. Use it for nested values; the typed writers
    /// below leave zero values out by themselves.
    pub fn field(&mut self, field: u32) -> &mut Vec<u8> {
        let field = i64::from(field);
        debug_assert!(field > self.last, "struct fields out of order");
        put_uint(self.out, (field - self.last) as u64);
        self.last = field;
        self.out
    }

    /// A `uint` field (left out when 0).
    pub fn uint(&mut self, field: u32, v: u64) -> &mut Self {
        if v != 0 {
            put_uint(self.field(field), v);
        }
        self
    }

    /// An `int` field (left out when 0).
    pub fn int(&mut self, field: u32, v: i64) -> &mut Self {
        if v != 0 {
            put_int(self.field(field), v);
        }
        self
    }

    /// A string field (left out when empty).
    pub fn string(&mut self, field: u32, s: &str) -> &mut Self {
        if !s.is_empty() {
            put_string(self.field(field), s);
        }
        self
    }

    /// A `[]byte` field (left out when empty).
    pub fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Self {
        if !b.is_empty() {
            put_bytes(self.field(field), b);
        }
        self
    }

    /// A bool field (left out when false).
    pub fn bool(&mut self, field: u32, b: bool) -> &mut Self {
        if b {
            put_bool(self.field(field), true);
        }
        self
    }

    /// Ends the struct (`00`).
    pub fn finish(self) {
        self.out.push(0);
    }
}

// ---------------------------------------------------------------------------------------
// Type definitions

/// A user type as a gob type definition ("wireType") describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeDef {
    /// A struct: its name and its fields (name, type id) in field-number order.
    Struct {
        /// Go's name of the type.
        name: String,
        /// The fields, field number = position.
        fields: Vec<(String, i64)>,
    },
    /// A slice of `elem`.
    Slice {
        /// Element type id.
        elem: i64,
    },
    /// A map from `key` to `elem`.
    Map {
        /// Key type id.
        key: i64,
        /// Value type id.
        elem: i64,
    },
}

impl TypeDef {
    /// Appends the type definition message of this type under `id` (a message with id
    /// `-id`), byte for byte as Go writes it.
    pub fn put_definition(&self, out: &mut Vec<u8>, id: i64) {
        let mut body = Vec::new();
        let mut wire = StructWriter::new(&mut body);
        // wireType fields: 0 ArrayT, 1 SliceT, 2 StructT, 3 MapT.
        let (field, name) = match self {
            TypeDef::Slice { .. } => (1, ""),
            TypeDef::Struct { name, .. } => (2, name.as_str()),
            TypeDef::Map { .. } => (3, ""),
        };
        {
            let buf = wire.field(field);
            let mut inner = StructWriter::new(buf);
            // CommonType {Name string; Id int}, always field 0 of the inner type.
            {
                let mut common = StructWriter::new(inner.field(0));
                common.string(0, name).int(1, id);
                common.finish();
            }
            match self {
                TypeDef::Slice { elem } => {
                    inner.int(1, *elem);
                }
                TypeDef::Map { key, elem } => {
                    inner.int(1, *key).int(2, *elem);
                }
                TypeDef::Struct { fields, .. } => {
                    if !fields.is_empty() {
                        let buf = inner.field(1);
                        put_uint(buf, fields.len() as u64);
                        for (fname, fid) in fields {
                            let mut f = StructWriter::new(buf);
                            f.string(0, fname).int(1, *fid);
                            f.finish();
                        }
                    }
                }
            }
            inner.finish();
        }
        wire.finish();
        put_message(out, -id, &body);
    }
}

/// Appends a top-level value that is not a struct: the message holds the `00` byte,
/// then whatever `write` appends.
pub fn put_singleton(out: &mut Vec<u8>, type_id: i64, write: impl FnOnce(&mut Vec<u8>)) {
    let mut body = vec![0u8];
    write(&mut body);
    put_message(out, type_id, &body);
}

/// Appends a top-level struct value: the message holds the struct's fields directly.
pub fn put_struct(out: &mut Vec<u8>, type_id: i64, write: impl FnOnce(&mut StructWriter<'_>)) {
    let mut body = Vec::new();
    let mut w = StructWriter::new(&mut body);
    write(&mut w);
    w.finish();
    put_message(out, type_id, &body);
}

// ---------------------------------------------------------------------------------------
// Decoding

/// A decoded gob value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `bool`.
    Bool(bool),
    /// `int` (any signed width).
    Int(i64),
    /// `uint` (any unsigned width).
    Uint(u64),
    /// `[]byte`.
    Bytes(Vec<u8>),
    /// `string`.
    String(String),
    /// A struct: the fields that were sent (zero fields are absent).
    Struct(StructValue),
    /// A slice.
    Slice(Vec<Value>),
    /// A map, in wire order.
    Map(Vec<(Value, Value)>),
}

/// A decoded struct: the fields present on the wire, named by the sender's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructValue {
    /// The sender's name of the type.
    pub type_name: String,
    /// The fields that were sent, in wire order.
    pub fields: Vec<(String, Value)>,
}

impl StructValue {
    /// The field called `name`, if it was sent.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// A `uint` field; 0 when absent (gob leaves zero values out).
    pub fn uint(&self, name: &'static str) -> Result<u64, GobError> {
        match self.get(name) {
            None => Ok(0),
            Some(Value::Uint(v)) => Ok(*v),
            Some(_) => Err(GobError::Unexpected {
                what: name,
                expected: "uint",
            }),
        }
    }

    /// A bool field; false when absent.
    pub fn bool(&self, name: &'static str) -> Result<bool, GobError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(v)) => Ok(*v),
            Some(_) => Err(GobError::Unexpected {
                what: name,
                expected: "bool",
            }),
        }
    }

    /// A string field; empty when absent.
    pub fn string(&self, name: &'static str) -> Result<&str, GobError> {
        match self.get(name) {
            None => Ok(""),
            Some(Value::String(v)) => Ok(v),
            Some(_) => Err(GobError::Unexpected {
                what: name,
                expected: "string",
            }),
        }
    }

    /// A `[]byte` field; empty when absent.
    pub fn bytes(&self, name: &'static str) -> Result<&[u8], GobError> {
        match self.get(name) {
            None => Ok(&[]),
            Some(Value::Bytes(v)) => Ok(v),
            Some(_) => Err(GobError::Unexpected {
                what: name,
                expected: "[]byte",
            }),
        }
    }
}

/// A cursor over bytes that never reads past the end.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn byte(&mut self) -> Result<u8, GobError> {
        let (&b, rest) = self.buf.split_first().ok_or(GobError::Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], GobError> {
        if n > self.buf.len() {
            return Err(GobError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Reads a gob unsigned integer.
    pub fn uint(&mut self) -> Result<u64, GobError> {
        let b = self.byte()?;
        if b < 0x80 {
            return Ok(u64::from(b));
        }
        let n = (b as i8).unsigned_abs();
        if n > 8 {
            return Err(GobError::BadUintLength(n));
        }
        let bytes = self.take(usize::from(n))?;
        Ok(bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    /// Reads a gob signed integer.
    pub fn int(&mut self) -> Result<i64, GobError> {
        let u = self.uint()?;
        let v = (u >> 1) as i64;
        Ok(if u & 1 == 1 { !v } else { v })
    }

    /// Reads a length and checks it against the bytes left.
    pub fn length(&mut self) -> Result<usize, GobError> {
        let len = self.uint()?;
        if len > self.buf.len() as u64 {
            return Err(GobError::LengthTooLarge {
                len,
                available: self.buf.len(),
            });
        }
        Ok(len as usize)
    }

    /// Reads a gob `[]byte`.
    pub fn bytes(&mut self) -> Result<&'a [u8], GobError> {
        let n = self.length()?;
        self.take(n)
    }

    /// Reads a gob string.
    pub fn string(&mut self) -> Result<String, GobError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| GobError::InvalidUtf8)
    }

    /// Reads a gob bool.
    pub fn bool(&mut self) -> Result<bool, GobError> {
        match self.uint()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(GobError::InvalidBool(v)),
        }
    }
}

/// Walks the fields of a struct on the wire: yields field numbers until the `00` end.
fn next_field(r: &mut Reader<'_>, current: &mut i64) -> Result<Option<u64>, GobError> {
    let delta = r.uint()?;
    if delta == 0 {
        return Ok(None);
    }
    let next = (*current as i128) + i128::from(delta);
    if next > i128::from(u32::MAX) {
        return Err(GobError::BadTypeDef("field delta out of range"));
    }
    *current = next as i64;
    Ok(Some(next as u64))
}

/// The decoding side of one gob stream: remembers the type definitions it has seen.
#[derive(Debug, Default)]
pub struct Decoder {
    types: HashMap<i64, TypeDef>,
    /// What the value being decoded may still allocate.
    budget: std::cell::Cell<usize>,
    /// The whole budget of the message being decoded (for the error).
    limit: usize,
}

impl Decoder {
    /// A decoder for a fresh stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The type definitions received so far.
    pub fn types(&self) -> &HashMap<i64, TypeDef> {
        &self.types
    }

    /// Reads messages from `r` until one holds a value, and returns that value with its
    /// type id. Type definitions on the way are remembered. `Ok(None)` at the end of
    /// the input.
    pub fn next_value(&mut self, r: &mut Reader<'_>) -> Result<Option<(i64, Value)>, GobError> {
        while !r.is_empty() {
            let len = r.length()?;
            let mut msg = Reader::new(r.take(len)?);
            let id = msg.int()?;
            if id < 0 {
                let id = id.checked_neg().ok_or(GobError::BadTypeDef("type id"))?;
                if id < FIRST_USER_ID || self.types.contains_key(&id) {
                    return Err(GobError::DuplicateType(id));
                }
                if self.types.len() >= MAX_TYPES {
                    return Err(GobError::TooManyTypes);
                }
                let def = decode_wire_type(&mut msg)?;
                if !msg.is_empty() {
                    return Err(GobError::TrailingBytes(msg.remaining().len()));
                }
                self.types.insert(id, def);
                continue;
            }
            let is_struct = matches!(self.types.get(&id), Some(TypeDef::Struct { .. }));
            if !is_struct && msg.byte()? != 0 {
                return Err(GobError::MissingSingletonMarker);
            }
            self.limit = VALUE_BUDGET_BASE + VALUE_BUDGET_FACTOR * len;
            self.budget.set(self.limit);
            let value = self.value(&mut msg, id, 0)?;
            if !msg.is_empty() {
                return Err(GobError::TrailingBytes(msg.remaining().len()));
            }
            return Ok(Some((id, value)));
        }
        Ok(None)
    }

    /// Like [`Decoder::next_value`], but the end of the input is an error naming `what`.
    pub fn expect_value(
        &mut self,
        r: &mut Reader<'_>,
        what: &'static str,
    ) -> Result<Value, GobError> {
        self.next_value(r)?
            .map(|(_, v)| v)
            .ok_or(GobError::EndOfStream(what))
    }

    /// Takes `cost` bytes from the message's budget.
    fn charge(&self, cost: usize) -> Result<(), GobError> {
        let left = self.budget.get();
        if cost > left {
            return Err(GobError::TooLargeDecoded { limit: self.limit });
        }
        self.budget.set(left - cost);
        Ok(())
    }

    fn value(&self, r: &mut Reader<'_>, id: i64, depth: usize) -> Result<Value, GobError> {
        if depth > MAX_DEPTH {
            return Err(GobError::TooDeep);
        }
        self.charge(VALUE_COST)?;
        match id {
            BOOL_ID => return r.bool().map(Value::Bool),
            INT_ID => return r.int().map(Value::Int),
            UINT_ID => return r.uint().map(Value::Uint),
            BYTES_ID => return r.bytes().map(|b| Value::Bytes(b.to_vec())),
            STRING_ID => return r.string().map(Value::String),
            _ => {}
        }
        let def = match self.types.get(&id) {
            Some(def) => def,
            None if id < FIRST_USER_ID => return Err(GobError::UnsupportedType(id)),
            None => return Err(GobError::UnknownType(id)),
        };
        match def {
            TypeDef::Struct { name, fields } => {
                self.charge(name.len())?;
                let mut out = Vec::new();
                let mut current = -1;
                while let Some(field) = next_field(r, &mut current)? {
                    let (fname, fid) = usize::try_from(field)
                        .ok()
                        .and_then(|i| fields.get(i))
                        .ok_or_else(|| GobError::FieldOutOfRange {
                            type_name: name.clone(),
                            field,
                            count: fields.len(),
                        })?;
                    self.charge(fname.len() + VALUE_COST)?;
                    let v = self.value(r, *fid, depth + 1)?;
                    out.push((fname.clone(), v));
                }
                Ok(Value::Struct(StructValue {
                    type_name: name.clone(),
                    fields: out,
                }))
            }
            TypeDef::Slice { elem } => {
                // Every element takes at least one byte.
                let count = r.length()?;
                let mut out = Vec::new();
                for _ in 0..count {
                    out.push(self.value(r, *elem, depth + 1)?);
                }
                Ok(Value::Slice(out))
            }
            TypeDef::Map { key, elem } => {
                let count = r.length()?;
                let mut out = Vec::new();
                for _ in 0..count {
                    let k = self.value(r, *key, depth + 1)?;
                    let v = self.value(r, *elem, depth + 1)?;
                    out.push((k, v));
                }
                Ok(Value::Map(out))
            }
        }
    }
}

/// A type or field name, at most [`MAX_NAME`] bytes.
fn bounded_name(r: &mut Reader<'_>) -> Result<String, GobError> {
    let name = r.string()?;
    if name.len() > MAX_NAME {
        return Err(GobError::NameTooLong(name.len()));
    }
    Ok(name)
}

/// CommonType {Name string; Id int}: returns the name.
fn decode_common(r: &mut Reader<'_>) -> Result<String, GobError> {
    let mut name = String::new();
    let mut cur = -1;
    while let Some(f) = next_field(r, &mut cur)? {
        match f {
            0 => name = bounded_name(r)?,
            1 => {
                r.int()?;
            }
            _ => return Err(GobError::BadTypeDef("CommonType field")),
        }
    }
    Ok(name)
}

/// A type id inside a definition (a field's, a slice's element, a map's key or
/// element). Go never sends 0 (the zero value is left out, so the field is absent) nor a
/// negative id; accepting one would make a definition that cannot be written back.
fn type_ref(r: &mut Reader<'_>) -> Result<i64, GobError> {
    let id = r.int()?;
    if id <= 0 {
        return Err(GobError::BadTypeDef("type id not positive"));
    }
    Ok(id)
}

/// Decodes a wireType body (the value of a type definition message).
fn decode_wire_type(r: &mut Reader<'_>) -> Result<TypeDef, GobError> {
    let mut cur = -1;
    let kind = next_field(r, &mut cur)?.ok_or(GobError::BadTypeDef("empty wireType"))?;
    let mut inner = -1;
    let def = match kind {
        1 => {
            let mut elem = None;
            while let Some(f) = next_field(r, &mut inner)? {
                match f {
                    0 => {
                        decode_common(r)?;
                    }
                    1 => elem = Some(type_ref(r)?),
                    _ => return Err(GobError::BadTypeDef("sliceType field")),
                }
            }
            TypeDef::Slice {
                elem: elem.ok_or(GobError::BadTypeDef("slice without element type"))?,
            }
        }
        2 => {
            let mut name = String::new();
            let mut fields = Vec::new();
            while let Some(f) = next_field(r, &mut inner)? {
                match f {
                    0 => name = decode_common(r)?,
                    1 => {
                        let count = r.length()?;
                        for _ in 0..count {
                            let mut fname = String::new();
                            let mut fid = None;
                            let mut c = -1;
                            while let Some(ff) = next_field(r, &mut c)? {
                                match ff {
                                    0 => fname = bounded_name(r)?,
                                    1 => fid = Some(type_ref(r)?),
                                    _ => return Err(GobError::BadTypeDef("fieldType field")),
                                }
                            }
                            fields.push((
                                fname,
                                fid.ok_or(GobError::BadTypeDef("field without type"))?,
                            ));
                        }
                    }
                    _ => return Err(GobError::BadTypeDef("structType field")),
                }
            }
            TypeDef::Struct { name, fields }
        }
        3 => {
            let (mut key, mut elem) = (None, None);
            while let Some(f) = next_field(r, &mut inner)? {
                match f {
                    0 => {
                        decode_common(r)?;
                    }
                    1 => key = Some(type_ref(r)?),
                    2 => elem = Some(type_ref(r)?),
                    _ => return Err(GobError::BadTypeDef("mapType field")),
                }
            }
            TypeDef::Map {
                key: key.ok_or(GobError::BadTypeDef("map without key type"))?,
                elem: elem.ok_or(GobError::BadTypeDef("map without element type"))?,
            }
        }
        _ => {
            return Err(GobError::BadTypeDef(
                "only slice, struct and map types are supported",
            ));
        }
    };
    if next_field(r, &mut cur)?.is_some() {
        return Err(GobError::BadTypeDef("wireType with more than one kind"));
    }
    Ok(def)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Splices quoted strings: `"abc"` becomes its bytes, the rest is hex.
    pub(crate) fn bytes_of(spec: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, part) in spec.split('"').enumerate() {
            if i % 2 == 1 {
                out.extend_from_slice(part.as_bytes());
            } else {
                out.extend(hex(part));
            }
        }
        out
    }

    fn uint_bytes(v: u64) -> Vec<u8> {
        let mut b = Vec::new();
        put_uint(&mut b, v);
        b
    }

    fn int_bytes(v: i64) -> Vec<u8> {
        let mut b = Vec::new();
        put_int(&mut b, v);
        b
    }

    #[test]
    fn uint_and_int_encodings_from_the_captures() {
        assert_eq!(uint_bytes(3), [0x03]);
        assert_eq!(uint_bytes(127), [0x7f]);
        assert_eq!(uint_bytes(128), [0xff, 0x80]);
        assert_eq!(uint_bytes(2157), [0xfe, 0x08, 0x6d]);
        assert_eq!(uint_bytes(0xaa00_0000_0002), hex("fa aa 00 00 00 00 02"));
        assert_eq!(uint_bytes(u64::MAX), hex("f8 ff ff ff ff ff ff ff ff"));
        assert_eq!(int_bytes(66), [0xff, 0x84]);
        assert_eq!(int_bytes(-66), [0xff, 0x83]);
        assert_eq!(int_bytes(6), [0x0c]);
        assert_eq!(int_bytes(3), [0x06]);
        assert_eq!(int_bytes(5), [0x0a]);
        assert_eq!(int_bytes(i64::MIN), hex("f8 ff ff ff ff ff ff ff ff"));
        for v in [0u64, 1, 127, 128, 255, 256, 65535, 1 << 40, u64::MAX] {
            assert_eq!(Reader::new(&uint_bytes(v)).uint().unwrap(), v);
        }
        for v in [0i64, 1, -1, 66, -66, i64::MAX, i64::MIN] {
            assert_eq!(Reader::new(&int_bytes(v)).int().unwrap(), v);
        }
    }

    #[test]
    fn bad_numbers_are_errors() {
        assert_eq!(Reader::new(&[0xf7]).uint(), Err(GobError::BadUintLength(9)));
        assert_eq!(Reader::new(&[0xfe, 0x01]).uint(), Err(GobError::Truncated));
        assert_eq!(Reader::new(&[]).uint(), Err(GobError::Truncated));
        assert_eq!(
            Reader::new(&[0x05, b'a']).bytes(),
            Err(GobError::LengthTooLarge {
                len: 5,
                available: 1
            })
        );
        assert_eq!(Reader::new(&[0x02]).bool(), Err(GobError::InvalidBool(2)));
        assert_eq!(
            Reader::new(&[0x01, 0xff]).string(),
            Err(GobError::InvalidUtf8)
        );
    }

    pub(crate) fn peer_summary_def() -> TypeDef {
        TypeDef::Struct {
            name: "peerSummary".into(),
            fields: vec![
                ("NameByte".into(), BYTES_ID),
                ("NickName".into(), STRING_ID),
                ("UID".into(), UINT_ID),
                ("Version".into(), UINT_ID),
                ("ShortID".into(), UINT_ID),
                ("HasShortID".into(), BOOL_ID),
            ],
        }
    }

    #[test]
    fn typedefs_are_byte_exact() {
        let mut out = Vec::new();
        TypeDef::Map {
            key: STRING_ID,
            elem: STRING_ID,
        }
        .put_definition(&mut out, 66);
        assert_eq!(out, hex("0e ff 83 04 01 02 ff 84 00 01 0c 01 0c 00 00"));

        let mut out = Vec::new();
        TypeDef::Slice { elem: 68 }.put_definition(&mut out, 69);
        assert_eq!(out, hex("0d ff 89 02 01 02 ff 8a 00 01 ff 88 00 00"));

        let mut out = Vec::new();
        peer_summary_def().put_definition(&mut out, 67);
        let want = bytes_of(
            r#"62 ff 85 03 01 01 0b "peerSummary" 01 ff 86 00 01 06
            01 08 "NameByte" 01 0a 00  01 08 "NickName" 01 0c 00  01 03 "UID" 01 06 00
            01 07 "Version" 01 06 00  01 07 "ShortID" 01 06 00  01 0a "HasShortID" 01 02 00
            00 00"#,
        );
        assert_eq!(want.len(), 99);
        assert_eq!(out, want);

        let mut out = Vec::new();
        TypeDef::Struct {
            name: "connectionSummary".into(),
            fields: vec![
                ("NameByte".into(), BYTES_ID),
                ("RemoteTCPAddr".into(), STRING_ID),
                ("Outbound".into(), BOOL_ID),
                ("Established".into(), BOOL_ID),
            ],
        }
        .put_definition(&mut out, 68);
        let want = bytes_of(
            r#"5b ff 87 03 01 01 11 "connectionSummary" 01 ff 88 00 01 04
            01 08 "NameByte" 01 0a 00  01 0d "RemoteTCPAddr" 01 0c 00
            01 08 "Outbound" 01 02 00  01 0b "Established" 01 02 00  00 00"#,
        );
        assert_eq!(out, want);
    }

    #[test]
    fn typedefs_decode_back() {
        for (def, id) in [
            (
                TypeDef::Map {
                    key: STRING_ID,
                    elem: STRING_ID,
                },
                66,
            ),
            (TypeDef::Slice { elem: 68 }, 69),
            (peer_summary_def(), 67),
        ] {
            let mut out = Vec::new();
            def.put_definition(&mut out, id);
            let mut d = Decoder::new();
            assert_eq!(d.next_value(&mut Reader::new(&out)).unwrap(), None);
            assert_eq!(d.types().get(&id), Some(&def));
        }
    }

    /// Found by the `gob` fuzz target: a definition naming type id 0 (which Go never
    /// sends: a zero field is left out) was accepted, and could not be written back.
    #[test]
    fn typedefs_with_non_positive_type_ids_are_errors() {
        // sliceType {CommonType{}, Elem: 0 or -2}; mapType {CommonType{}, Key: 6, Elem: 0};
        // structType {CommonType{}, Field: [{Name: "A", Id: 0}]}.
        for body in [
            hex("02 01 00 01 00 00 00"),
            hex("02 01 00 01 03 00 00"),
            hex("04 01 00 01 0c 01 00 00 00"),
            bytes_of(r#"03 01 00 01 01 01 01 "A" 01 00 00 00 00"#),
        ] {
            let mut out = Vec::new();
            put_message(&mut out, -69, &body);
            let mut d = Decoder::new();
            assert_eq!(
                d.next_value(&mut Reader::new(&out)),
                Err(GobError::BadTypeDef("type id not positive")),
                "{body:02x?}"
            );
        }
        // The same with valid ids decodes.
        let mut out = Vec::new();
        put_message(&mut out, -69, &hex("02 01 00 01 0c 00 00"));
        let mut d = Decoder::new();
        assert_eq!(d.next_value(&mut Reader::new(&out)), Ok(None));
        assert_eq!(
            d.types().get(&69),
            Some(&TypeDef::Slice { elem: STRING_ID })
        );
    }

    #[test]
    fn struct_values_skip_zero_fields_and_decode_by_name() {
        // h1's summary from h2's first topology message: Version 0 is left out.
        let mut stream = Vec::new();
        peer_summary_def().put_definition(&mut stream, 67);
        let start = stream.len();
        put_struct(&mut stream, 67, |s| {
            s.bytes(0, &[0xaa, 0, 0, 0, 0, 1])
                .string(1, "h1")
                .uint(2, 0xe0c9_b1be_8882_ab4f)
                .uint(3, 0)
                .uint(4, 3170)
                .bool(5, true);
        });
        assert_eq!(
            stream[start..],
            bytes_of(
                r#"1f ff 86 01 06 aa 00 00 00 00 01 01 02 "h1" 01 f8 e0 c9 b1 be 88 82 ab 4f
                02 fe 0c 62 01 01 00"#
            )[..]
        );
        let mut d = Decoder::new();
        let mut r = Reader::new(&stream);
        let (id, v) = d.next_value(&mut r).unwrap().unwrap();
        assert_eq!(id, 67);
        let Value::Struct(s) = v else { panic!("{v:?}") };
        assert_eq!(s.type_name, "peerSummary");
        assert_eq!(s.bytes("NameByte").unwrap(), [0xaa, 0, 0, 0, 0, 1]);
        assert_eq!(s.string("NickName").unwrap(), "h1");
        assert_eq!(s.uint("Version").unwrap(), 0);
        assert_eq!(s.uint("ShortID").unwrap(), 3170);
        assert!(s.bool("HasShortID").unwrap());
        assert!(s.get("Version").is_none());
        assert!(s.string("ShortID").is_err());
        assert_eq!(d.next_value(&mut r).unwrap(), None);
    }

    #[test]
    fn values_resolve_types_late_and_unknown_fields_are_kept_by_name() {
        // A slice defined before its element struct (as Go does), and a struct with a
        // field this code does not know.
        let mut stream = Vec::new();
        TypeDef::Slice { elem: 70 }.put_definition(&mut stream, 71);
        TypeDef::Struct {
            name: "x".into(),
            fields: vec![("Extra".into(), STRING_ID), ("N".into(), UINT_ID)],
        }
        .put_definition(&mut stream, 70);
        put_singleton(&mut stream, 71, |b| {
            put_uint(b, 2);
            let mut s = StructWriter::new(b);
            s.string(0, "zz").uint(1, 7);
            s.finish();
            StructWriter::new(b).finish();
        });
        let mut d = Decoder::new();
        let (_, v) = d.next_value(&mut Reader::new(&stream)).unwrap().unwrap();
        let Value::Slice(items) = v else { panic!() };
        assert_eq!(items.len(), 2);
        let Value::Struct(a) = &items[0] else {
            panic!()
        };
        assert_eq!(a.uint("N").unwrap(), 7);
        assert_eq!(a.string("Extra").unwrap(), "zz");
        let Value::Struct(b) = &items[1] else {
            panic!()
        };
        assert!(b.fields.is_empty());
    }

    #[test]
    fn malformed_streams_are_errors() {
        let mut d = Decoder::new();
        // Value of an undefined user type.
        assert_eq!(
            d.next_value(&mut Reader::new(&hex("03 ff 84 00"))),
            Err(GobError::UnknownType(66))
        );
        // Float is not supported.
        assert_eq!(
            d.next_value(&mut Reader::new(&hex("03 08 00 00"))),
            Err(GobError::UnsupportedType(4))
        );
        // Missing singleton byte.
        assert_eq!(
            d.next_value(&mut Reader::new(&hex("02 0c 05"))),
            Err(GobError::MissingSingletonMarker)
        );
        // Message length beyond the input.
        assert!(matches!(
            d.next_value(&mut Reader::new(&hex("10 0c 00"))),
            Err(GobError::LengthTooLarge { .. })
        ));
        // Trailing bytes inside a message.
        assert_eq!(
            d.next_value(&mut Reader::new(&hex("04 06 00 01 02"))),
            Err(GobError::TrailingBytes(1))
        );
        // Slice count larger than the message.
        let mut s = Vec::new();
        TypeDef::Slice { elem: UINT_ID }.put_definition(&mut s, 65);
        s.extend(hex("06 ff 82 00 fe ff ff"));
        assert!(matches!(
            Decoder::new().next_value(&mut Reader::new(&s)),
            Err(GobError::LengthTooLarge { .. })
        ));
        // Redefinition.
        let mut s = Vec::new();
        TypeDef::Slice { elem: UINT_ID }.put_definition(&mut s, 65);
        TypeDef::Slice { elem: UINT_ID }.put_definition(&mut s, 65);
        assert_eq!(
            Decoder::new().next_value(&mut Reader::new(&s)),
            Err(GobError::DuplicateType(65))
        );
        // Struct field beyond the definition.
        let mut s = Vec::new();
        TypeDef::Struct {
            name: "t".into(),
            fields: vec![("A".into(), UINT_ID)],
        }
        .put_definition(&mut s, 65);
        s.extend(hex("05 ff 82 02 01 00"));
        assert!(matches!(
            Decoder::new().next_value(&mut Reader::new(&s)),
            Err(GobError::FieldOutOfRange { field: 1, .. })
        ));
        // Self-recursive type nested deeper than the limit.
        let mut s = Vec::new();
        TypeDef::Slice { elem: 65 }.put_definition(&mut s, 65);
        let body: Vec<u8> = std::iter::once(0)
            .chain(std::iter::repeat_n(1, 100))
            .chain([0])
            .collect();
        put_message(&mut s, 65, &body);
        assert_eq!(
            Decoder::new().next_value(&mut Reader::new(&s)),
            Err(GobError::TooDeep)
        );
    }

    #[test]
    fn truncations_never_panic() {
        let mut s = Vec::new();
        peer_summary_def().put_definition(&mut s, 67);
        put_struct(&mut s, 67, |w| {
            w.bytes(0, &[1, 2, 3, 4, 5, 6]).string(1, "n").uint(2, 99);
        });
        for cut in 0..s.len() {
            let mut d = Decoder::new();
            let mut r = Reader::new(&s[..cut]);
            let res = d.next_value(&mut r);
            assert!(matches!(res, Err(_) | Ok(None)), "cut {cut}: {res:?}");
        }
        // Flip every byte: still no panic.
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 0xff;
            let _ = Decoder::new().next_value(&mut Reader::new(&t));
        }
    }

    #[test]
    fn small_messages_cannot_decode_into_huge_values() {
        // A struct type with a long name and no fields, then a slice of 20,000 of
        // them, one byte each: every element would copy the name.
        let name = "n".repeat(MAX_NAME);
        let mut out = Vec::new();
        TypeDef::Struct {
            name: name.clone(),
            fields: Vec::new(),
        }
        .put_definition(&mut out, 65);
        TypeDef::Slice { elem: 65 }.put_definition(&mut out, 66);
        let mut body = Vec::new();
        put_int(&mut body, 66);
        body.push(0);
        put_uint(&mut body, 20_000);
        body.extend(std::iter::repeat_n(0u8, 20_000));
        put_uint(&mut out, body.len() as u64);
        out.extend_from_slice(&body);
        let mut dec = Decoder::new();
        let err = dec.next_value(&mut Reader::new(&out)).unwrap_err();
        assert!(matches!(err, GobError::TooLargeDecoded { .. }), "{err}");
        // A name over the limit is refused outright.
        let mut long = Vec::new();
        TypeDef::Struct {
            name: "n".repeat(MAX_NAME + 1),
            fields: Vec::new(),
        }
        .put_definition(&mut long, 65);
        let err = Decoder::new()
            .next_value(&mut Reader::new(&long))
            .unwrap_err();
        assert_eq!(err, GobError::NameTooLong(MAX_NAME + 1));
    }
}
