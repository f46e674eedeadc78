//! Payload bytes → compact typed rows, in one pass: the JSON is read with
//! serde's streaming visitors straight into [`Rows`] (no `serde_json::Value`
//! tree, no second parse of an array), each record checked against its
//! type's [`RecordSpec`] as it goes. A message's rows share two buffers —
//! fixed-size [`Cell`]s and the bytes of their texts — so decoding a message
//! allocates twice, not once per row and string.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use super::field::{Reject, RejectReason, Value};
use super::{Field, RecordSpec};

/// The most fields any record type has (the array a record's fields are
/// gathered in before their rules run).
pub const MAX_FIELDS: usize = super::max_fields();

/// One checked column value. Text lives in its [`Rows`]' byte buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell {
    Null,
    /// `len` bytes from `start` in the text buffer (always ASCII: symbols
    /// and sides).
    Text {
        start: u32,
        len: u32,
    },
    /// Microseconds since the Unix epoch.
    Timestamp(i64),
    Float(f64),
    Int(i64),
}

impl Cell {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Cell::Float(v) => Some(*v),
            Cell::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}

/// The checked rows of one message (or one batch), `width` cells each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    width: usize,
    cells: Vec<Cell>,
    text: String,
}

/// One row of a [`Rows`].
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    cells: &'a [Cell],
    text: &'a str,
}

impl Rows {
    pub fn new(spec: &RecordSpec) -> Rows {
        Rows {
            width: spec.fields.len(),
            cells: Vec::new(),
            text: String::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.cells.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    pub fn row(&self, i: usize) -> Row<'_> {
        Row {
            cells: &self.cells[i * self.width..(i + 1) * self.width],
            text: &self.text,
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Row<'_>> + '_ {
        (0..self.len()).map(|i| self.row(i))
    }

    /// Rows already checked by the spec's rules, given as [`Value`]s
    /// ([`RecordSpec::parse_record`], [`RecordSpec::parse_text_record`]).
    pub fn from_values(spec: &RecordSpec, rows: &[Vec<Value>]) -> Rows {
        let mut all = Rows::new(spec);
        for row in rows {
            all.push_values(row);
        }
        all
    }

    fn push_values(&mut self, values: &[Value]) {
        assert_eq!(values.len(), self.width, "a row has one value per field");
        for value in values {
            let cell = match value {
                Value::Text(text) => self.push_text(text),
                Value::Timestamp(ts) => Cell::Timestamp(ts.timestamp_micros()),
                Value::Float(v) => Cell::Float(*v),
                Value::Int(v) => Cell::Int(*v),
                Value::Null => Cell::Null,
            };
            self.cells.push(cell);
        }
    }

    fn push_text(&mut self, text: &str) -> Cell {
        let start = self.text.len() as u32;
        self.text.push_str(text);
        Cell::Text {
            start,
            len: text.len() as u32,
        }
    }

    /// Undoes a partly pushed record.
    fn truncate(&mut self, mark: (usize, usize)) {
        self.cells.truncate(mark.0);
        self.text.truncate(mark.1);
    }

    fn mark(&self) -> (usize, usize) {
        (self.cells.len(), self.text.len())
    }

    /// Checks a record's fields (in field order, `Null` when absent) and
    /// appends the row, or leaves the rows as they were and says why not.
    fn push_record(&mut self, spec: &RecordSpec, found: &[Scalar<'_>]) -> Result<(), Reject> {
        let mark = self.mark();
        self.cells.reserve(self.width);
        let checked = spec
            .fields
            .iter()
            .zip(found)
            .try_for_each(|(field, scalar)| {
                let cell = self.check(field, scalar)?;
                self.cells.push(cell);
                Ok(())
            })
            .and_then(|()| (spec.check)(&self.cells[mark.0..]));
        if checked.is_err() {
            self.truncate(mark);
        }
        checked
    }

    fn check(&mut self, field: &Field, scalar: &Scalar<'_>) -> Result<Cell, Reject> {
        if let Scalar::Null = scalar {
            return if field.required {
                Err(Reject::new(
                    RejectReason::MissingField,
                    format!("field `{}` is required", field.name),
                ))
            } else {
                Ok(Cell::Null)
            };
        }
        let checked = field.parse(scalar)?;
        Ok(match checked {
            Checked::Text(text) => self.push_text(&text),
            Checked::Cell(cell) => cell,
        })
    }
}

impl<'a> Row<'a> {
    pub fn cells(&self) -> &'a [Cell] {
        self.cells
    }

    /// The text of a [`Cell::Text`] (empty for any other cell).
    pub fn text(&self, cell: &Cell) -> &'a str {
        match *cell {
            Cell::Text { start, len } => &self.text[start as usize..(start + len) as usize],
            _ => "",
        }
    }

    pub fn value(&self, i: usize) -> Value {
        let cell = &self.cells[i];
        match *cell {
            Cell::Null => Value::Null,
            Cell::Text { .. } => Value::Text(self.text(cell).to_owned()),
            Cell::Timestamp(micros) => Value::Timestamp(
                chrono::DateTime::from_timestamp_micros(micros)
                    .expect("only checked timestamps are stored"),
            ),
            Cell::Float(v) => Value::Float(v),
            Cell::Int(v) => Value::Int(v),
        }
    }

    pub fn values(&self) -> Vec<Value> {
        (0..self.cells.len()).map(|i| self.value(i)).collect()
    }

    /// The row's unique key (the cells at `positions`), comparable and
    /// hashable by value.
    pub fn key(self, positions: &'a [usize]) -> Key<'a> {
        Key {
            row: self,
            positions,
        }
    }
}

/// A row's unique key.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    row: Row<'a>,
    positions: &'a [usize],
}

impl Key<'_> {
    fn parts(&self) -> impl Iterator<Item = KeyPart<'_>> + '_ {
        self.positions.iter().map(|&p| {
            let cell = &self.row.cells[p];
            match *cell {
                Cell::Text { .. } => KeyPart::Text(self.row.text(cell)),
                Cell::Timestamp(v) | Cell::Int(v) => KeyPart::Int(v),
                Cell::Float(v) => KeyPart::Int(v.to_bits() as i64),
                Cell::Null => KeyPart::Null,
            }
        })
    }

    /// A 64-bit hash of the key, cheap to compute (a multiply-rotate mix
    /// over its words, as FxHash does): what maps of keys are keyed by,
    /// through [`KeyHasher`].
    pub fn fingerprint(&self) -> u64 {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mix = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(SEED);
        let mut h = 0;
        for part in self.parts() {
            h = match part {
                KeyPart::Text(text) => {
                    let mut chunks = text.as_bytes().chunks_exact(8);
                    for chunk in &mut chunks {
                        h = mix(h, u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
                    }
                    let mut last = [0u8; 8];
                    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
                    mix(mix(h, u64::from_le_bytes(last)), text.len() as u64)
                }
                KeyPart::Int(v) => mix(h, v as u64),
                KeyPart::Null => mix(h, u64::MAX),
            };
        }
        h
    }
}

#[derive(PartialEq, Eq)]
enum KeyPart<'a> {
    Text(&'a str),
    Int(i64),
    Null,
}

impl PartialEq for Key<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.parts().eq(other.parts())
    }
}

impl Eq for Key<'_> {}

impl Hash for Key<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.fingerprint());
    }
}

/// Hashes what is already a hash ([`Key::fingerprint`]) by passing it on.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn write_u64(&mut self, fingerprint: u64) {
        self.0 = fingerprint;
    }
}

/// Hash maps keyed by [`Key`]s or their fingerprints.
pub type KeyHashing = std::hash::BuildHasherDefault<KeyHasher>;

/// One JSON value as a field rule sees it; strings borrowed from the
/// payload when they hold no escapes.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    /// `null`, or the field is absent.
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    /// `true`/`false`, an array or an object.
    Other,
}

impl<'a> Scalar<'a> {
    /// The same reading serde_json's `Value` gives (`as_f64`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Int(v) => Some(*v as f64),
            Scalar::UInt(v) => Some(*v as f64),
            Scalar::Float(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A `serde_json::Value`'s reading of the same JSON.
    pub fn from_json(json: &'a Json) -> Scalar<'a> {
        match json {
            Json::Null => Scalar::Null,
            Json::String(s) => Scalar::Str(Cow::Borrowed(s)),
            Json::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Scalar::UInt(u),
                (None, Some(i)) => Scalar::Int(i),
                _ => Scalar::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            _ => Scalar::Other,
        }
    }
}

/// What a field rule made of a value: a cell, or text to store.
pub enum Checked<'a> {
    Cell(Cell),
    Text(Cow<'a, str>),
}

/// What a payload turned out to be.
#[derive(Debug)]
pub enum Shape {
    /// One record object: appended, or refused.
    Record(Result<(), Reject>),
    /// An array of `records` elements; the valid ones appended in order,
    /// the others refused (with their element index).
    Array {
        records: usize,
        rejected: Vec<(usize, Reject)>,
    },
    /// An empty array.
    Empty,
    /// An array of more than the allowed records (none appended).
    TooMany(usize),
    /// Neither an object nor an array.
    Other,
}

/// Reads a whole payload into `rows`. On a JSON error nothing is appended.
pub fn read_payload(
    spec: &RecordSpec,
    payload: &[u8],
    max_records: usize,
    rows: &mut Rows,
) -> Result<Shape, serde_json::Error> {
    let mark = rows.mark();
    let mut de = serde_json::Deserializer::from_slice(payload);
    let read = PayloadSeed {
        spec,
        rows: &mut *rows,
        max_records,
    }
    .deserialize(&mut de)
    .and_then(|shape| de.end().map(|()| shape));
    if read.is_err() {
        rows.truncate(mark);
    }
    read
}

/// Reads one record's JSON text (an element of an array) into `rows`.
pub fn read_record(
    spec: &RecordSpec,
    text: &[u8],
    rows: &mut Rows,
) -> Result<Result<(), Reject>, serde_json::Error> {
    let mark = rows.mark();
    let mut de = serde_json::Deserializer::from_slice(text);
    let read = RecordSeed {
        spec,
        rows: &mut *rows,
    }
    .deserialize(&mut de)
    .and_then(|record| de.end().map(|()| record));
    if !matches!(read, Ok(Ok(()))) {
        rows.truncate(mark);
    }
    read
}

/// Checks a record already parsed into a `serde_json::Value` and appends it.
pub fn push_json_record(spec: &RecordSpec, json: &Json, rows: &mut Rows) -> Result<(), Reject> {
    let object = json.as_object().ok_or_else(not_an_object)?;
    push_scalars(
        spec,
        spec.fields.iter().map(|field| {
            object
                .get(field.name)
                .map_or(Scalar::Null, Scalar::from_json)
        }),
        rows,
    )
}

/// Checks a record given as its fields' values, in field order, and appends it.
pub fn push_scalars<'a>(
    spec: &RecordSpec,
    values: impl IntoIterator<Item = Scalar<'a>>,
    rows: &mut Rows,
) -> Result<(), Reject> {
    let mut found: [Scalar<'_>; MAX_FIELDS] = std::array::from_fn(|_| Scalar::Null);
    for (slot, value) in found.iter_mut().zip(values) {
        *slot = value;
    }
    rows.push_record(spec, &found)
}

fn not_an_object() -> Reject {
    Reject::new(RejectReason::InvalidShape, "a record must be a JSON object")
}

struct PayloadSeed<'s> {
    spec: &'s RecordSpec,
    rows: &'s mut Rows,
    max_records: usize,
}

impl<'de> DeserializeSeed<'de> for PayloadSeed<'_> {
    type Value = Shape;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PayloadSeed<'_> {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record object or an array of record objects")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shape, A::Error> {
        RecordSeed {
            spec: self.spec,
            rows: self.rows,
        }
        .visit_map(map)
        .map(Shape::Record)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mark = self.rows.mark();
        let mut records = 0;
        let mut rejected = Vec::new();
        loop {
            if records == self.max_records {
                let mut more = 0;
                while seq.next_element_seed(Drain)?.is_some() {
                    more += 1;
                }
                if more == 0 {
                    break;
                }
                self.rows.truncate(mark);
                return Ok(Shape::TooMany(records + more));
            }
            let seed = RecordSeed {
                spec: self.spec,
                rows: &mut *self.rows,
            };
            match seq.next_element_seed(seed)? {
                None => break,
                Some(Ok(())) => {}
                Some(Err(reject)) => rejected.push((records, reject)),
            }
            records += 1;
        }
        Ok(if records == 0 {
            Shape::Empty
        } else {
            Shape::Array { records, rejected }
        })
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
}

/// One record: its fields gathered (unknown ones skipped, a repeated one's
/// last value kept, as a `serde_json::Value` would), then checked in field
/// order. Any other JSON value is drained and refused as not an object.
struct RecordSeed<'s> {
    spec: &'s RecordSpec,
    rows: &'s mut Rows,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = Result<(), Reject>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = Result<(), Reject>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: [Scalar<'de>; MAX_FIELDS] = std::array::from_fn(|_| Scalar::Null);
        while let Some(index) = map.next_key_seed(FieldIndex(self.spec.fields))? {
            match index {
                Some(i) => found[i] = map.next_value_seed(ScalarSeed)?,
                None => {
                    map.next_value_seed(Drain)?;
                }
            }
        }
        Ok(self.rows.push_record(self.spec, &found))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element_seed(Drain)?.is_some() {}
        Ok(Err(not_an_object()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }
}

/// A key's position among the fields (`None`: not a field, skipped).
struct FieldIndex<'s>(&'s [Field]);

impl<'de> DeserializeSeed<'de> for FieldIndex<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldIndex<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|f| f.name == key))
    }
}

/// Reads past any JSON value. Unlike `IgnoredAny` (which serde_json skips
/// without a depth limit), it descends through `deserialize_any`, so nesting
/// deeper than serde_json's 128 levels is an error here as everywhere else.
struct Drain;

impl<'de> DeserializeSeed<'de> for Drain {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Drain {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Drain)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry_seed(PhantomData::<IgnoredAny>, Drain)?
            .is_some()
        {}
        Ok(())
    }
}

struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Scalar<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }

    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::UInt(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Float(v))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element_seed(Drain)?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map
            .next_entry_seed(PhantomData::<IgnoredAny>, Drain)?
            .is_some()
        {}
        Ok(Scalar::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RecordType;

    const TICK: &str = r#"{"symbol":" fpt ","timestamp":1764123303123,"price":97.5,"volume":100.0,"side":"BUY","seq":7,"extra":{"a":[1,2]}}"#;

    fn read(payload: &str) -> (Shape, Rows) {
        let spec = RecordType::Tick.spec();
        let mut rows = Rows::new(spec);
        let shape = read_payload(spec, payload.as_bytes(), 3, &mut rows).unwrap();
        (shape, rows)
    }

    #[test]
    fn one_pass_gives_what_the_json_tree_gives() {
        let (shape, rows) = read(TICK);
        assert!(matches!(shape, Shape::Record(Ok(()))));
        let json: Json = serde_json::from_str(TICK).unwrap();
        let mut from_tree = Rows::new(RecordType::Tick.spec());
        push_json_record(RecordType::Tick.spec(), &json, &mut from_tree).unwrap();
        assert_eq!(rows, from_tree);
        let values = rows.row(0).values();
        assert_eq!(values[0], Value::Text("FPT".into()));
        assert_eq!(values[3], Value::Int(100));
        assert_eq!(values[4], Value::Text("buy".into()));
    }

    #[test]
    fn an_array_keeps_its_good_records_in_order() {
        let bad = TICK.replace("\"BUY\"", "\"hold\"");
        let escaped = TICK.replace("\" fpt \"", "\"\\u0056NM\"");
        let (shape, rows) = read(&format!("[{TICK}, {bad}, {escaped}]"));
        let Shape::Array { records, rejected } = shape else {
            panic!("{shape:?}")
        };
        assert_eq!((records, rows.len()), (3, 2));
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].0, 1);
        assert_eq!(rows.row(1).values()[0], Value::Text("VNM".into()));
        assert!(
            matches!(read("[1]").0, Shape::Array { rejected, .. } if rejected[0].1.reason == RejectReason::InvalidShape)
        );
        assert!(matches!(read("[]").0, Shape::Empty));
        assert!(matches!(read("42").0, Shape::Other));
        let (too_many, rows) = read(&format!("[{TICK},{TICK},{TICK},{TICK}]"));
        assert!(matches!(too_many, Shape::TooMany(4)));
        assert!(rows.is_empty());
    }

    #[test]
    fn a_repeated_field_keeps_its_last_value_and_null_is_absent() {
        let spec = RecordType::Tick.spec();
        let twice = TICK.replace("\"seq\":7", "\"seq\":7,\"seq\":8");
        let (_, rows) = read(&twice);
        assert_eq!(rows.row(0).values()[5], Value::Int(8));
        let nulled = TICK.replace("\"seq\":7", "\"seq\":7,\"seq\":null");
        let (shape, _) = read(&nulled);
        assert!(
            matches!(shape, Shape::Record(Err(ref r)) if r.reason == RejectReason::MissingField)
        );
        let mut rows = Rows::new(spec);
        assert!(read_payload(spec, b"[{\"symbol\":1", 3, &mut rows).is_err());
        assert!(read_payload(spec, format!("{TICK} x").as_bytes(), 3, &mut rows).is_err());
        assert!(rows.is_empty());
    }

    #[test]
    fn keys_compare_by_value() {
        let (_, rows) = read(&format!("[{TICK},{TICK}]"));
        let positions = RecordType::Tick.spec().key_positions();
        assert_eq!(rows.row(0).key(&positions), rows.row(1).key(&positions));
        let other = TICK.replace("\"seq\":7", "\"seq\":9");
        let (_, more) = read(&other);
        assert_ne!(rows.row(0).key(&positions), more.row(0).key(&positions));
    }
}
