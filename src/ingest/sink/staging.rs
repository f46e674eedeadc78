//! A batch's rows made ready for one write: duplicate keys within the batch
//! resolved by the type's rule (a tick keeps its first version, the other
//! types the newest: the higher stream sequence; within one message, or
//! without sequences, the later record).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use crate::records::{Conflict, KeyHashing, RecordSpec, Row, Rows};

/// One row to write: the row, the sequence that orders its versions, and
/// its position among its message's rows.
#[derive(Debug, Clone, Copy)]
pub struct StagedRow<'a> {
    pub row: Row<'a>,
    pub stream_seq: Option<u64>,
    pub index: usize,
}

/// Rows of a batch: each message's rows with its stream sequence.
pub fn stage<'a>(
    spec: &RecordSpec,
    key_positions: &[usize],
    messages: impl IntoIterator<Item = (&'a Rows, Option<u64>)>,
) -> Vec<StagedRow<'a>> {
    let mut by_key: HashMap<_, usize, KeyHashing> = HashMap::default();
    let mut staged: Vec<StagedRow<'a>> = Vec::new();
    for (rows, stream_seq) in messages {
        by_key.reserve(rows.len());
        for (index, row) in rows.iter().enumerate() {
            let staged_row = StagedRow {
                row,
                stream_seq,
                index,
            };
            match by_key.entry(row.key(key_positions)) {
                Entry::Vacant(slot) => {
                    slot.insert(staged.len());
                    staged.push(staged_row);
                }
                Entry::Occupied(slot) => {
                    let kept = &mut staged[*slot.get()];
                    let newer =
                        stream_seq.unwrap_or(u64::MAX) >= kept.stream_seq.unwrap_or(u64::MAX);
                    if spec.conflict == Conflict::NewestWins && newer {
                        *kept = staged_row;
                    }
                }
            }
        }
    }
    staged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{RecordType, Value};
    use chrono::DateTime;

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn at(ms: i64) -> Value {
        Value::Timestamp(DateTime::from_timestamp_millis(ms).unwrap())
    }

    /// A tick row: symbol, timestamp, price, volume, side, seq.
    fn tick(symbol: &str, seq: i64, price: f64) -> Vec<Value> {
        vec![
            text(symbol),
            at(0),
            Value::Float(price),
            Value::Int(1),
            text("buy"),
            Value::Int(seq),
        ]
    }

    /// A candle row whose close tells its version apart.
    fn candle(symbol: &str, close: f64) -> Vec<Value> {
        let c = Value::Float(close);
        vec![
            text(symbol),
            at(0),
            c.clone(),
            c.clone(),
            c.clone(),
            c,
            Value::Int(1),
            Value::Null,
        ]
    }

    fn staged(
        t: RecordType,
        messages: &[(Vec<Vec<Value>>, Option<u64>)],
    ) -> Vec<(Vec<Value>, Option<u64>, usize)> {
        let spec = t.spec();
        let rows: Vec<(Rows, Option<u64>)> = messages
            .iter()
            .map(|(rows, seq)| (Rows::from_values(spec, rows), *seq))
            .collect();
        let positions = spec.key_positions();
        stage(spec, &positions, rows.iter().map(|(r, s)| (r, *s)))
            .into_iter()
            .map(|s| (s.row.values(), s.stream_seq, s.index))
            .collect()
    }

    #[test]
    fn in_batch_duplicates_keep_the_first_tick_and_the_newest_version() {
        let kept = staged(
            RecordType::Tick,
            &[
                (
                    vec![
                        tick("FPT", 1, 10.0),
                        tick("FPT", 1, 99.0),
                        tick("FPT", 2, 11.0),
                    ],
                    Some(5),
                ),
                (vec![tick("FPT", 1, 55.0)], Some(6)),
            ],
        );
        let prices: Vec<(Value, usize)> = kept.iter().map(|(v, _, i)| (v[2].clone(), *i)).collect();
        assert_eq!(
            prices,
            [(Value::Float(10.0), 0), (Value::Float(11.0), 2)],
            "a trade is immutable: the first stays"
        );

        // Newest wins: the higher stream sequence, whatever the batch order;
        // within one message the later record.
        let kept = staged(
            RecordType::Candle,
            &[
                (vec![candle("FPT", 3.0)], Some(9)),
                (
                    vec![candle("FPT", 1.0), candle("FPT", 2.0), candle("VNM", 7.0)],
                    Some(4),
                ),
            ],
        );
        let closes: Vec<(Value, Value, Option<u64>)> = kept
            .iter()
            .map(|(v, seq, _)| (v[0].clone(), v[5].clone(), *seq))
            .collect();
        assert_eq!(
            closes,
            [
                (text("FPT"), Value::Float(3.0), Some(9)),
                (text("VNM"), Value::Float(7.0), Some(4)),
            ]
        );
        let within_one = staged(
            RecordType::Candle,
            &[(vec![candle("FPT", 1.0), candle("FPT", 2.0)], Some(4))],
        );
        assert_eq!(
            (within_one.len(), within_one[0].2),
            (1, 1),
            "the later record of a message"
        );
        // Rows from outside NATS have no sequence: the later row wins.
        let no_sequence = staged(
            RecordType::Candle,
            &[(
                vec![candle("FPT", 1.0), candle("VNM", 7.0), candle("FPT", 2.0)],
                None,
            )],
        );
        let kept: Vec<usize> = no_sequence.iter().map(|(_, _, i)| *i).collect();
        assert_eq!(kept, [2, 1]);
    }
}
