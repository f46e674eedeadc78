//! The SQL of one type's writes, built once from its [`RecordSpec`].

use crate::records::{Conflict, Field, FieldType, RecordSpec};

/// The column type a field is stored as (migrations/).
fn sql_type(ty: FieldType) -> &'static str {
    match ty {
        FieldType::Symbol | FieldType::Side => "text",
        FieldType::Timestamp => "timestamptz",
        FieldType::Positive | FieldType::NonNegative | FieldType::Finite => "float8",
        FieldType::PositiveInt | FieldType::NonNegativeInt => "int8",
    }
}

/// SQL built once per type from its spec.
pub(super) struct Statements {
    /// Binary COPY straight into the table (the common case).
    pub copy_direct: String,
    pub create_staging: String,
    /// Binary COPY into the session's staging table.
    pub copy_staging: String,
    /// Staging → table with the type's conflict rule.
    pub merge: String,
    /// Which of some keys (one array parameter per key column) are stored:
    /// their 1-based positions.
    pub stored_keys: String,
}

impl Statements {
    pub fn new(spec: &RecordSpec) -> Self {
        let mut columns: Vec<String> = spec.column_names().map(|c| format!("\"{c}\"")).collect();
        if spec.conflict == Conflict::NewestWins {
            columns.push("stream_seq".into());
        }
        let column_list = columns.join(", ");
        let table = spec.table;
        let staging = format!("tickvault_staging_{table}");
        let key = spec.key_list();
        let on_conflict = match spec.conflict {
            Conflict::KeepFirst => "DO NOTHING".to_string(),
            Conflict::NewestWins => {
                let updated: Vec<&String> = columns
                    .iter()
                    .filter(|c| !spec.key.iter().any(|k| format!("\"{k}\"") == **c))
                    .collect();
                let updates = updated
                    .iter()
                    .map(|c| format!("{c} = EXCLUDED.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                // Doubles compared by their bits: `=` holds 0 and -0 equal,
                // and a version differing only in that sign is still newer.
                let list = |prefix: &str| {
                    updated
                        .iter()
                        .map(|c| {
                            let float = spec.fields.iter().any(|f| {
                                format!("\"{}\"", f.name) == **c
                                    && matches!(
                                        f.ty,
                                        FieldType::Positive
                                            | FieldType::NonNegative
                                            | FieldType::Finite
                                    )
                            });
                            if float {
                                format!("float8send({prefix}.{c})")
                            } else {
                                format!("{prefix}.{c}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                // A lower stream sequence never overwrites a higher one; core
                // mode has no sequence (NULL), so there the last write wins.
                // A version equal to the stored one is left alone, so writing
                // the same rows again changes (and counts) nothing.
                format!(
                    "DO UPDATE SET {updates} WHERE ({table}.stream_seq IS NULL \
                     OR EXCLUDED.stream_seq IS NULL OR {table}.stream_seq <= EXCLUDED.stream_seq) \
                     AND ({}) IS DISTINCT FROM ({})",
                    list(table),
                    list("EXCLUDED"),
                )
            }
        };
        let key_fields: Vec<&Field> = spec
            .key
            .iter()
            .map(|k| {
                spec.fields
                    .iter()
                    .find(|f| f.name == *k)
                    .expect("a key column is a field")
            })
            .collect();
        let arrays = key_fields
            .iter()
            .enumerate()
            .map(|(i, f)| format!("${}::{}[]", i + 1, sql_type(f.ty)))
            .collect::<Vec<_>>()
            .join(", ");
        let names = (0..key_fields.len())
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let matches = key_fields
            .iter()
            .enumerate()
            .map(|(i, f)| format!("t.\"{}\" = k.k{i}", f.name))
            .collect::<Vec<_>>()
            .join(" AND ");
        Statements {
            stored_keys: format!(
                "SELECT k.n FROM unnest({arrays}) WITH ORDINALITY AS k({names}, n) \
                 WHERE EXISTS (SELECT 1 FROM {table} t WHERE {matches})"
            ),
            copy_direct: format!("COPY {table} ({column_list}) FROM STDIN (FORMAT binary)"),
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table}) ON COMMIT DELETE ROWS"
            ),
            copy_staging: format!("COPY {staging} ({column_list}) FROM STDIN (FORMAT binary)"),
            merge: format!(
                // Ordered by key so replicas merging the same keys lock rows in
                // the same order and cannot deadlock each other.
                "INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {staging} \
                 ORDER BY {key} ON CONFLICT ({key}) {on_conflict}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RecordType;

    #[test]
    fn statements_follow_the_spec() {
        let tick = Statements::new(RecordType::Tick.spec());
        assert_eq!(
            tick.copy_direct,
            "COPY tick_data (\"symbol\", \"timestamp\", \"price\", \"volume\", \"side\", \"seq\") FROM STDIN (FORMAT binary)"
        );
        assert!(tick
            .merge
            .ends_with("ON CONFLICT (\"symbol\", \"timestamp\", \"seq\") DO NOTHING"));
        let candle = Statements::new(RecordType::Candle.spec());
        assert!(candle.copy_direct.contains("\"value\", stream_seq)"));
        assert!(candle.merge.contains("\"close\" = EXCLUDED.\"close\""));
        assert!(candle.merge.contains("stream_seq = EXCLUDED.stream_seq"));
        assert!(!candle.merge.contains("\"symbol\" = EXCLUDED"));
        assert!(candle
            .merge
            .contains("candles_1m.stream_seq <= EXCLUDED.stream_seq"));
        assert!(
            candle.merge.ends_with(
                "AND (float8send(candles_1m.\"open\"), float8send(candles_1m.\"high\"), \
                 float8send(candles_1m.\"low\"), float8send(candles_1m.\"close\"), \
                 candles_1m.\"volume\", float8send(candles_1m.\"value\"), candles_1m.stream_seq) \
                 IS DISTINCT FROM (float8send(EXCLUDED.\"open\"), float8send(EXCLUDED.\"high\"), \
                 float8send(EXCLUDED.\"low\"), float8send(EXCLUDED.\"close\"), \
                 EXCLUDED.\"volume\", float8send(EXCLUDED.\"value\"), EXCLUDED.stream_seq)"
            ),
            "an equal version is left alone: {}",
            candle.merge
        );
        assert_eq!(
            tick.stored_keys,
            "SELECT k.n FROM unnest($1::text[], $2::timestamptz[], $3::int8[]) WITH ORDINALITY AS k(k0, k1, k2, n) \
             WHERE EXISTS (SELECT 1 FROM tick_data t WHERE t.\"symbol\" = k.k0 AND t.\"timestamp\" = k.k1 AND t.\"seq\" = k.k2)"
        );
    }
}
