//! Staged rows → PostgreSQL's binary COPY format, straight from the typed
//! cells: a float is its 8 IEEE-754 bytes (stored bit for bit, nothing is
//! formatted or parsed), a timestamp its microseconds since 2000-01-01,
//! text its bytes. The columns are `TEXT`, `TIMESTAMPTZ`, `DOUBLE
//! PRECISION` and `BIGINT` (migrations/), whose binary forms these are.

use crate::records::{Cell, Conflict, RecordSpec};

use super::staging::StagedRow;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The COPY data of `rows`, ready to send.
pub fn encode(spec: &RecordSpec, rows: &[StagedRow<'_>]) -> Vec<u8> {
    let newest_wins = spec.conflict == Conflict::NewestWins;
    let columns = spec.fields.len() + usize::from(newest_wins);
    // 2 bytes per tuple, 12 per fixed-size column, a little text.
    let mut out = Vec::with_capacity(SIGNATURE.len() + 10 + rows.len() * (2 + columns * 14));
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for staged in rows {
        out.extend_from_slice(&(columns as i16).to_be_bytes());
        for cell in staged.row.cells() {
            match *cell {
                Cell::Null => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Cell::Text { .. } => {
                    let text = staged.row.text(cell).as_bytes();
                    out.extend_from_slice(&(text.len() as i32).to_be_bytes());
                    out.extend_from_slice(text);
                }
                Cell::Timestamp(micros) => {
                    eight(&mut out, (micros - PG_EPOCH_MICROS).to_be_bytes())
                }
                Cell::Float(v) => eight(&mut out, v.to_bits().to_be_bytes()),
                Cell::Int(v) => eight(&mut out, v.to_be_bytes()),
            }
        }
        if newest_wins {
            match staged.stream_seq {
                Some(seq) => eight(&mut out, (seq as i64).to_be_bytes()),
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    out
}

fn eight(out: &mut Vec<u8>, bytes: [u8; 8]) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{RecordType, Rows, Value};

    #[test]
    fn a_row_in_the_binary_format() {
        let spec = RecordType::Candle.spec();
        let rows = Rows::from_values(
            spec,
            &[vec![
                Value::Text("FPT".into()),
                Value::Timestamp(
                    chrono::DateTime::from_timestamp_micros(PG_EPOCH_MICROS + 1).unwrap(),
                ),
                Value::Float(-0.0),
                Value::Float(5e-324),
                Value::Float(1.0),
                Value::Float(13.841000000000001),
                Value::Int(-3),
                Value::Null,
            ]],
        );
        let staged = [StagedRow {
            row: rows.row(0),
            stream_seq: Some(7),
            index: 0,
        }];
        let data = encode(spec, &staged);
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&9i16.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 3, b'F', b'P', b'T']);
        for v in [
            1i64.to_be_bytes(),
            (-0.0f64).to_bits().to_be_bytes(),
            1u64.to_be_bytes(),
            1f64.to_bits().to_be_bytes(),
            13.841000000000001f64.to_bits().to_be_bytes(),
            (-3i64).to_be_bytes(),
        ] {
            expected.extend_from_slice(&[0, 0, 0, 8]);
            expected.extend_from_slice(&v);
        }
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&7i64.to_be_bytes());
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(data, expected);
    }
}
