//! Printing rows as they arrive: a [`RowWriter`] writes each row at once,
//! holding nothing but the column layout, so any number of rows prints in
//! constant memory.
//!
//! The table layout is fixed up front from the column types (it cannot be
//! measured from rows not yet received): identifiers 10 characters, numbers
//! 14 right-aligned, timestamps the zone's fixed width. A longer value widens
//! its own line only.

use std::io::{self, Write};

use serde_json::{Map, Value as Json};

use tickvault::records::{FieldType, RecordSpec};

use super::time::Tz;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Fixed-width columns with a header.
    Table,
    /// JSON lines: one JSON object per row, fields in column order.
    Json,
    /// A header line, then one comma-separated line per row.
    Csv,
}

/// How a column's values look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Number,
    Timestamp,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: &'static str,
    pub kind: ColumnKind,
}

impl Column {
    pub fn new(name: &'static str, kind: ColumnKind) -> Column {
        Column { name, kind }
    }

    /// The columns of a record type, in table order.
    pub fn of(spec: &RecordSpec) -> Vec<Column> {
        spec.fields
            .iter()
            .map(|f| {
                let kind = match f.ty {
                    FieldType::Symbol | FieldType::Side => ColumnKind::Text,
                    FieldType::Timestamp => ColumnKind::Timestamp,
                    _ => ColumnKind::Number,
                };
                Column::new(f.name, kind)
            })
            .collect()
    }

    fn width(&self, tz: Tz) -> usize {
        let of_kind = match self.kind {
            ColumnKind::Text => 10,
            ColumnKind::Number => 14,
            ColumnKind::Timestamp => tz.width(),
        };
        of_kind.max(self.name.len())
    }
}

/// Writes rows one by one in a [`Format`], timestamps in a [`Tz`].
pub struct RowWriter<W: Write> {
    out: W,
    format: Format,
    tz: Tz,
    columns: Vec<Column>,
    rows: u64,
    line: String,
}

impl<W: Write> RowWriter<W> {
    pub fn new(out: W, format: Format, tz: Tz, columns: Vec<Column>) -> RowWriter<W> {
        RowWriter {
            out,
            format,
            tz,
            columns,
            rows: 0,
            line: String::with_capacity(256),
        }
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes one row; the header goes before the first.
    pub fn write(&mut self, row: &Map<String, Json>) -> io::Result<()> {
        if self.rows == 0 {
            self.header()?;
        }
        self.line.clear();
        match self.format {
            Format::Json => {
                self.line.push('{');
                for (i, column) in self.columns.iter().enumerate() {
                    if i > 0 {
                        self.line.push(',');
                    }
                    self.line.push_str(&Json::from(column.name).to_string());
                    self.line.push(':');
                    let value = match (column.kind, row.get(column.name)) {
                        (ColumnKind::Timestamp, Some(Json::String(text))) => self
                            .tz
                            .reformat(text)
                            .map_or_else(|| Json::from(text.as_str()), Json::from),
                        (_, Some(value)) => value.clone(),
                        (_, None) => Json::Null,
                    };
                    self.line.push_str(&value.to_string());
                }
                self.line.push('}');
            }
            Format::Csv => {
                for (i, column) in self.columns.iter().enumerate() {
                    if i > 0 {
                        self.line.push(',');
                    }
                    let cell = cell(row, column, self.tz);
                    if cell.contains([',', '"', '\n', '\r']) {
                        self.line.push('"');
                        self.line.push_str(&cell.replace('"', "\"\""));
                        self.line.push('"');
                    } else {
                        self.line.push_str(&cell);
                    }
                }
            }
            Format::Table => {
                for (i, column) in self.columns.iter().enumerate() {
                    if i > 0 {
                        self.line.push_str("  ");
                    }
                    let cell = cell(row, column, self.tz);
                    let width = column.width(self.tz);
                    let padded = if column.kind == ColumnKind::Number {
                        format!("{cell:>width$}")
                    } else {
                        format!("{cell:<width$}")
                    };
                    self.line.push_str(&padded);
                }
                let kept = self.line.trim_end().len();
                self.line.truncate(kept);
            }
        }
        self.line.push('\n');
        self.out.write_all(self.line.as_bytes())?;
        self.rows += 1;
        Ok(())
    }

    fn header(&mut self) -> io::Result<()> {
        let names: Vec<String> = match self.format {
            Format::Json => return Ok(()),
            Format::Csv => self.columns.iter().map(|c| c.name.to_string()).collect(),
            Format::Table => self
                .columns
                .iter()
                .map(|c| {
                    let width = c.width(self.tz);
                    if c.kind == ColumnKind::Number {
                        format!("{:>width$}", c.name)
                    } else {
                        format!("{:<width$}", c.name)
                    }
                })
                .collect(),
        };
        let separator = if self.format == Format::Csv {
            ","
        } else {
            "  "
        };
        let line = names.join(separator);
        writeln!(self.out, "{}", line.trim_end())
    }

    /// Sends what is buffered (after each page).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A value as text: strings bare, null empty, timestamps in the zone.
fn cell(row: &Map<String, Json>, column: &Column, tz: Tz) -> String {
    match row.get(column.name) {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(text)) if column.kind == ColumnKind::Timestamp => {
            tz.reformat(text).unwrap_or_else(|| text.clone())
        }
        Some(Json::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// Whether a write failed only because the reader went away (`| head`).
pub fn reader_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows() -> Vec<Map<String, Json>> {
        [
            json!({"value": null, "symbol": "FPT", "timestamp": "2026-11-26T02:15:00Z", "close": 97.5}),
            json!({"symbol": "FPT", "timestamp": "2026-11-26T02:16:00.5Z", "close": 100, "value": 1.5e9}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect()
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("symbol", ColumnKind::Text),
            Column::new("timestamp", ColumnKind::Timestamp),
            Column::new("close", ColumnKind::Number),
            Column::new("value", ColumnKind::Number),
        ]
    }

    fn render(format: Format, tz: Tz) -> String {
        let mut out = Vec::new();
        let mut writer = RowWriter::new(&mut out, format, tz, columns());
        for row in rows() {
            writer.write(&row).unwrap();
        }
        assert_eq!(writer.rows(), 2);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_lines_keep_column_order_and_convert_the_zone() {
        let text = render(Format::Json, Tz::Market);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"symbol":"FPT","timestamp":"2026-11-26T09:15:00.000000+07:00","close":97.5,"value":null}"#
        );
        let back: Json = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(back["value"], json!(1.5e9));
        assert_eq!(back["timestamp"], "2026-11-26T09:16:00.500000+07:00");
    }

    #[test]
    fn csv_has_a_header_and_quotes_when_needed() {
        assert_eq!(
            render(Format::Csv, Tz::Utc),
            "symbol,timestamp,close,value\n\
             FPT,2026-11-26T02:15:00.000000Z,97.5,\n\
             FPT,2026-11-26T02:16:00.500000Z,100,1500000000.0\n"
        );
        let mut out = Vec::new();
        let mut writer = RowWriter::new(&mut out, Format::Csv, Tz::Utc, columns());
        let mut odd = rows().remove(0);
        odd.insert("symbol".into(), json!("A,\"B\""));
        writer.write(&odd).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("\"A,\"\"B\"\"\""));
    }

    #[test]
    fn table_columns_have_fixed_widths() {
        let text = render(Format::Table, Tz::Market);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("symbol      timestamp"), "{text}");
        // Numbers are right-aligned under their header's right edge.
        let close_end = lines[0].find("close").unwrap() + "close".len();
        assert_eq!(&lines[1][close_end - 4..close_end], "97.5");
        assert_eq!(&lines[2][close_end - 3..close_end], "100");
        assert_eq!(
            lines[1].find("2026").unwrap(),
            lines[2].find("2026").unwrap()
        );
        assert!(lines[2].ends_with("1500000000.0"));
    }

    #[test]
    fn nothing_is_written_without_rows() {
        let mut out = Vec::new();
        let writer = RowWriter::new(&mut out, Format::Csv, Tz::Utc, columns());
        assert_eq!(writer.rows(), 0);
        drop(writer);
        assert!(out.is_empty());
    }
}

/// How the history tools' output looks: `history`, `latest` and `symbols`.
#[derive(Debug, clap::Args)]
pub struct Output {
    /// Output: table (fixed-width columns), json (JSON lines) or csv.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Zone of the printed timestamps: market (UTC+7) or utc.
    #[arg(long, value_enum, default_value = "market")]
    pub tz: super::time::Tz,
    /// Seconds to wait for each reply.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}
