//! Payload → rows: one record object or an array of them, each checked
//! against its type's [`RecordSpec`]. Nothing in a payload can panic here.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value as Json;

use crate::records::{RecordSpec, Reject, RejectReason, Value};

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
    pub rows: Vec<Vec<Value>>,
    pub rejected: Vec<Rejected>,
}

impl Decoded {
    fn whole(reason: RejectReason, detail: impl Into<String>, payload: &Bytes) -> Self {
        Decoded {
            rows: Vec::new(),
            rejected: vec![Rejected {
                reject: Reject::new(reason, detail),
                payload: payload.clone(),
            }],
        }
    }
}

pub fn decode(spec: &RecordSpec, payload: &Bytes, limits: Limits) -> Decoded {
    if payload.len() > limits.max_message_bytes {
        return Decoded::whole(
            RejectReason::TooLarge,
            format!(
                "payload is {} bytes, more than ingest.max_message_bytes ({})",
                payload.len(),
                limits.max_message_bytes
            ),
            payload,
        );
    }
    let is_array = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    if is_array {
        return decode_array(spec, payload, limits);
    }
    // serde_json refuses nesting deeper than 128 levels with an error, not a stack overflow.
    match serde_json::from_slice::<Json>(payload) {
        Ok(json @ Json::Object(_)) => match spec.parse_record(&json) {
            Ok(row) => Decoded {
                rows: vec![row],
                rejected: Vec::new(),
            },
            Err(reject) => Decoded {
                rows: Vec::new(),
                rejected: vec![Rejected {
                    reject,
                    payload: payload.clone(),
                }],
            },
        },
        Ok(_) => Decoded::whole(
            RejectReason::InvalidShape,
            "payload must be a record object or an array of record objects",
            payload,
        ),
        Err(e) => invalid_json(&e, payload),
    }
}

fn invalid_json(error: &serde_json::Error, payload: &Bytes) -> Decoded {
    Decoded::whole(
        RejectReason::InvalidJson,
        format!("payload is not valid JSON: {error}"),
        payload,
    )
}

/// An array: each record is checked alone, and a rejected record goes to the
/// dead letters as its original JSON text.
fn decode_array(spec: &RecordSpec, payload: &Bytes, limits: Limits) -> Decoded {
    let records: Vec<&RawValue> = match serde_json::from_slice(payload) {
        Ok(records) => records,
        Err(e) => return invalid_json(&e, payload),
    };
    if records.is_empty() {
        return Decoded::whole(
            RejectReason::EmptyMessage,
            "the array holds no record",
            payload,
        );
    }
    if records.len() > limits.max_records_per_message {
        return Decoded::whole(
            RejectReason::TooManyRecords,
            format!(
                "{} records, more than ingest.max_records_per_message ({})",
                records.len(),
                limits.max_records_per_message
            ),
            payload,
        );
    }
    let mut decoded = Decoded {
        rows: Vec::with_capacity(records.len()),
        rejected: Vec::new(),
    };
    for raw in records {
        match parse_raw(spec, raw) {
            Ok(row) => decoded.rows.push(row),
            Err(reject) => decoded.rejected.push(Rejected {
                reject,
                payload: payload.slice_ref(raw.get().as_bytes()),
            }),
        }
    }
    decoded
}

fn parse_raw(spec: &RecordSpec, raw: &RawValue) -> Result<Vec<Value>, Reject> {
    serde_json::from_str::<Json>(raw.get())
        .map_err(|e| Reject::new(RejectReason::InvalidJson, e.to_string()))
        .and_then(|record| spec.parse_record(&record))
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
    records
        .into_iter()
        .filter(|raw| parse_raw(spec, raw).is_ok())
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
        let dead: Json = serde_json::from_slice(&decoded.rejected[0].payload).unwrap();
        assert_eq!(
            dead["side"], "hold",
            "the dead letter is the rejected record alone"
        );
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
