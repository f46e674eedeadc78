//! Payload → rows: one record object or an array of them, read in one pass
//! straight into typed [`Rows`] ([`rows::read_payload`]), each record
//! checked against its type's [`RecordSpec`]. Nothing in a payload can panic
//! here.

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::records::rows::{self, Shape};
use crate::records::{RecordSpec, Reject, RejectReason, Rows};

/// Limits a message must respect, from `ingest.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_records_per_message: usize,
}

/// Input that is not written: why, and what goes to the dead-letter subject
/// (the whole payload, or the one rejected record's JSON text).
#[derive(Debug, Clone)]
pub struct Rejected {
    pub reject: Reject,
    pub payload: Bytes,
}

/// What one message holds: the rows to write and the rejected input.
#[derive(Debug, Default)]
pub struct Decoded {
    pub rows: Rows,
    pub rejected: Vec<Rejected>,
}

fn whole(spec: &RecordSpec, reject: Reject, payload: &Bytes) -> Decoded {
    Decoded {
        rows: Rows::new(spec),
        rejected: vec![Rejected {
            reject,
            payload: payload.clone(),
        }],
    }
}

pub fn decode(spec: &RecordSpec, payload: &Bytes, limits: Limits) -> Decoded {
    if payload.len() > limits.max_message_bytes {
        let detail = format!(
            "payload is {} bytes, more than ingest.max_message_bytes ({})",
            payload.len(),
            limits.max_message_bytes
        );
        return whole(spec, Reject::new(RejectReason::TooLarge, detail), payload);
    }
    let mut rows = Rows::new(spec);
    // serde_json refuses nesting deeper than 128 levels with an error, not a stack overflow.
    let shape = match rows::read_payload(spec, payload, limits.max_records_per_message, &mut rows) {
        Ok(shape) => shape,
        Err(e) => {
            match record_by_record(spec, payload, limits.max_records_per_message, &mut rows) {
                // An array whose elements are each valid JSON on their own (one
                // of them nested too deep when counted from the payload's root).
                Some(shape) => shape,
                None => {
                    let detail = format!("payload is not valid JSON: {e}");
                    return whole(
                        spec,
                        Reject::new(RejectReason::InvalidJson, detail),
                        payload,
                    );
                }
            }
        }
    };
    let reject = match shape {
        Shape::Record(Ok(())) => {
            return Decoded {
                rows,
                rejected: Vec::new(),
            }
        }
        Shape::Record(Err(reject)) => reject,
        Shape::Array { rejected, .. } => {
            let rejected = if rejected.is_empty() {
                Vec::new()
            } else {
                rejected_records(payload, rejected)
            };
            return Decoded { rows, rejected };
        }
        Shape::Empty => Reject::new(RejectReason::EmptyMessage, "the array holds no record"),
        Shape::TooMany(records) => Reject::new(
            RejectReason::TooManyRecords,
            format!(
                "{records} records, more than ingest.max_records_per_message ({})",
                limits.max_records_per_message
            ),
        ),
        Shape::Other => Reject::new(
            RejectReason::InvalidShape,
            "payload must be a record object or an array of record objects",
        ),
    };
    whole(spec, reject, payload)
}

/// Reads an array element by element, each judged on its own (nesting
/// counted from the record), as [`record_texts`] splits it; `None` when the
/// payload is not an array of JSON values.
fn record_by_record(
    spec: &RecordSpec,
    payload: &Bytes,
    max_records: usize,
    rows: &mut Rows,
) -> Option<Shape> {
    let records: Vec<&RawValue> = serde_json::from_slice(payload).ok()?;
    if records.is_empty() {
        return Some(Shape::Empty);
    }
    if records.len() > max_records {
        return Some(Shape::TooMany(records.len()));
    }
    let mut rejected = Vec::new();
    for (index, raw) in records.iter().enumerate() {
        match rows::read_record(spec, raw.get().as_bytes(), rows) {
            Ok(Ok(())) => {}
            Ok(Err(reject)) => rejected.push((index, reject)),
            Err(e) => rejected.push((
                index,
                Reject::new(
                    RejectReason::InvalidJson,
                    format!("record is not valid JSON: {e}"),
                ),
            )),
        }
    }
    Some(Shape::Array {
        records: records.len(),
        rejected,
    })
}

/// The rejected records of a valid array, each with its original JSON text
/// (found by a second look at the payload, only when something was refused).
fn rejected_records(payload: &Bytes, rejected: Vec<(usize, Reject)>) -> Vec<Rejected> {
    let records: Vec<&RawValue> = serde_json::from_slice(payload).unwrap_or_default();
    rejected
        .into_iter()
        .map(|(index, reject)| Rejected {
            payload: records
                .get(index)
                .map(|raw| payload.slice_ref(raw.get().as_bytes()))
                .unwrap_or_else(|| payload.clone()),
            reject,
        })
        .collect()
}

/// The original JSON text of each record [`decode`] turned into a row, in
/// row order: what a row PostgreSQL refuses is dead-lettered as. (Decoding
/// is a pure function of the payload, so the rows line up.)
pub fn record_texts(spec: &RecordSpec, payload: &Bytes) -> Vec<Bytes> {
    let is_array = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    if !is_array {
        return vec![payload.clone()];
    }
    let records: Vec<&RawValue> = serde_json::from_slice(payload).unwrap_or_default();
    let mut scratch = Rows::new(spec);
    records
        .into_iter()
        .filter(|raw| {
            matches!(
                rows::read_record(spec, raw.get().as_bytes(), &mut scratch),
                Ok(Ok(()))
            )
        })
        .map(|raw| payload.slice_ref(raw.get().as_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RecordType;

    const LIMITS: Limits = Limits {
        max_message_bytes: 4096,
        max_records_per_message: 3,
    };

    fn reasons(payload: &str) -> (usize, Vec<RejectReason>) {
        let decoded = decode(
            RecordType::Tick.spec(),
            &Bytes::from(payload.to_owned()),
            LIMITS,
        );
        (
            decoded.rows.len(),
            decoded.rejected.iter().map(|r| r.reject.reason).collect(),
        )
    }

    const TICK: &str = r#"{"symbol":"FPT","timestamp":1764123303123,"price":97.5,"volume":100,"side":"buy","seq":1}"#;

    #[test]
    fn objects_and_arrays_decode_and_bad_records_are_singled_out() {
        assert_eq!(reasons(TICK), (1, vec![]));
        let bad = TICK.replace("\"buy\"", "\"hold\"");
        let (rows, rejected) = reasons(&format!("[{TICK},{bad},{TICK}]"));
        assert_eq!((rows, rejected), (2, vec![RejectReason::InvalidValue]));
        let decoded = decode(
            RecordType::Tick.spec(),
            &Bytes::from(format!("[{TICK},{bad}]")),
            LIMITS,
        );
        let dead: serde_json::Value = serde_json::from_slice(&decoded.rejected[0].payload).unwrap();
        assert_eq!(
            dead["side"], "hold",
            "the dead letter is the rejected record alone"
        );
    }

    #[test]
    fn a_record_nested_too_deep_is_refused_alone_and_its_neighbours_land() {
        // 127 levels inside the record: within serde_json's 128 when counted
        // from the record, beyond it when counted from the array.
        let deep = format!("{}1{}", "[".repeat(126), "]".repeat(126));
        let nested = TICK.replace("\"seq\":1", &format!("\"seq\":1,\"extra\":{deep}"));
        let payload = format!("[{TICK},{nested}]");
        let decoded = decode(RecordType::Tick.spec(), &Bytes::from(payload), LIMITS);
        assert_eq!(
            (decoded.rows.len(), decoded.rejected.len()),
            (2, 0),
            "each record is within the limit on its own (the unknown field is ignored)"
        );
        let too_deep = "[".repeat(200) + &"]".repeat(200);
        let payload = format!("[{TICK},{too_deep}]");
        let decoded = decode(RecordType::Tick.spec(), &Bytes::from(payload), LIMITS);
        assert_eq!(decoded.rows.len(), 1, "the valid tick is kept");
        let reasons: Vec<_> = decoded.rejected.iter().map(|r| r.reject.reason).collect();
        assert_eq!(reasons, vec![RejectReason::InvalidJson]);
        assert_eq!(decoded.rejected[0].payload, too_deep.as_bytes());
    }

    #[test]
    fn record_texts_line_up_with_the_rows() {
        let bad = TICK.replace("\"buy\"", "\"hold\"");
        let second = TICK.replace("\"seq\":1", "\"seq\":2");
        let payload = Bytes::from(format!("[ {TICK}, {bad},\n{second} ]"));
        let decoded = decode(RecordType::Tick.spec(), &payload, LIMITS);
        let texts = record_texts(RecordType::Tick.spec(), &payload);
        assert_eq!(decoded.rows.len(), texts.len());
        assert_eq!(texts[0], TICK.as_bytes());
        assert_eq!(
            texts[1],
            second.as_bytes(),
            "the rejected record is skipped"
        );
        let object = Bytes::from(format!(" {TICK}\n"));
        assert_eq!(
            record_texts(RecordType::Tick.spec(), &object),
            vec![object.clone()]
        );
    }

    #[test]
    fn whole_message_rejections() {
        assert_eq!(reasons("{not json").1, vec![RejectReason::InvalidJson]);
        assert_eq!(reasons("NaN").1, vec![RejectReason::InvalidJson]);
        assert_eq!(reasons("[]").1, vec![RejectReason::EmptyMessage]);
        assert_eq!(reasons("42").1, vec![RejectReason::InvalidShape]);
        assert_eq!(reasons("[1]").1, vec![RejectReason::InvalidShape]);
        assert_eq!(
            reasons(&format!("[{TICK},{TICK},{TICK},{TICK}]")).1,
            vec![RejectReason::TooManyRecords]
        );
        assert_eq!(reasons(&" ".repeat(5000)).1, vec![RejectReason::TooLarge]);
        let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
        let big = Limits {
            max_message_bytes: 1 << 20,
            ..LIMITS
        };
        let decoded = decode(RecordType::Tick.spec(), &Bytes::from(deep), big);
        assert_eq!(decoded.rejected[0].reject.reason, RejectReason::InvalidJson);
        assert_eq!(reasons("\u{feff}\u{0}").1, vec![RejectReason::InvalidJson]);
    }
}
