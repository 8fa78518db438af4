//! The primitives of human output: sizes, durations, times, aligned tables and aligned
//! "label  value" blocks. Pure functions, so every shape is unit-tested.

use std::time::{Duration, SystemTime};

const MIB: f64 = 1024.0 * 1024.0;

/// Bytes as MiB with one decimal and no unit ("12.3"), for table columns titled in MiB.
pub fn mib_number(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

/// Bytes as "12.3 MiB".
pub fn mib(bytes: u64) -> String {
    format!("{} MiB", mib_number(bytes))
}

/// "12.3 MiB → 4.5 MiB (-7.8 MiB)": the change is what an operator looks for after a reset.
pub fn mib_change(before: u64, after: u64) -> String {
    let delta = after as f64 - before as f64;
    let sign = if delta < 0.0 { "-" } else { "+" };
    format!(
        "{} → {} ({sign}{:.1} MiB)",
        mib(before),
        mib(after),
        delta.abs() / MIB
    )
}

/// A duration for people: "850 µs", "12.3 ms", "4.2 s", "3m 07s", "2h 05m", "3d 04h".
pub fn duration(duration: Duration) -> String {
    let micros = duration.as_micros();
    // Thresholds sit where rounding to one decimal would print the next unit's "1000.0".
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 999_950 {
        format!("{:.1} ms", micros as f64 / 1_000.0)
    } else if micros < 59_950_000 {
        format!("{:.1} s", duration.as_secs_f64())
    } else {
        let seconds = duration.as_secs();
        let (days, hours) = (seconds / 86_400, seconds / 3_600 % 24);
        let (minutes, seconds) = (seconds / 60 % 60, seconds % 60);
        if days > 0 {
            format!("{days}d {hours:02}h")
        } else if hours > 0 {
            format!("{hours}h {minutes:02}m")
        } else {
            format!("{minutes}m {seconds:02}s")
        }
    }
}

/// A time as RFC 3339 UTC to the second ("2025-03-01T12:00:00Z").
pub fn time(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A time as RFC 3339 UTC to the millisecond, for event streams where order within a second
/// matters.
pub fn time_millis(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table with a header row; columns are as wide as their widest cell, numbers are
/// right-aligned, and no line ends in spaces.
#[derive(Debug)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len(), "one cell per column");
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let header: Vec<String> = self
            .columns
            .iter()
            .map(|(title, _)| title.to_string())
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|column| {
                std::iter::once(&header)
                    .chain(&self.rows)
                    .map(|row| row.get(column).map_or(0, |cell| cell.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (column, (_, align)) in self.columns.iter().enumerate() {
                let cell = row.get(column).map_or("", String::as_str);
                let padding = " ".repeat(widths[column] - cell.chars().count());
                if column > 0 {
                    line.push_str("  ");
                }
                match align {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&padding);
                    }
                    Align::Right => {
                        line.push_str(&padding);
                        line.push_str(cell);
                    }
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// "label  value" lines with the values aligned, for one object's fields.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(label, value)| format!("{label:<width$}  {value}").trim_end().to_string() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_mib_with_one_decimal() {
        assert_eq!(mib(0), "0.0 MiB");
        assert_eq!(mib(12_897_484), "12.3 MiB");
        assert_eq!(mib_number(300 * 1024 * 1024), "300.0");
        assert_eq!(
            mib_change(100 * 1024 * 1024, 20 * 1024 * 1024),
            "100.0 MiB → 20.0 MiB (-80.0 MiB)"
        );
        assert_eq!(mib_change(0, 1024 * 1024), "0.0 MiB → 1.0 MiB (+1.0 MiB)");
    }

    #[test]
    fn durations_read_like_a_person_would_write_them() {
        for (duration, text) in [
            (Duration::from_micros(850), "850 µs"),
            (Duration::from_micros(12_345), "12.3 ms"),
            (Duration::from_micros(999_960), "1.0 s"),
            (Duration::from_millis(4_200), "4.2 s"),
            (Duration::from_secs(187), "3m 07s"),
            (Duration::from_secs(2 * 3600 + 5 * 60 + 9), "2h 05m"),
            (Duration::from_secs(3 * 86_400 + 4 * 3600), "3d 04h"),
        ] {
            assert_eq!(super::duration(duration), text);
        }
    }

    #[test]
    fn tables_align_columns_and_trim_trailing_spaces() {
        let mut table = Table::new(&[
            ("ID", Align::Left),
            ("RUNS", Align::Right),
            ("LABELS", Align::Left),
        ]);
        table.row(vec!["s-1".into(), "7".into(), String::new()]);
        table.row(vec!["s-22".into(), "1234".into(), "a=b".into()]);
        assert_eq!(
            table.render(),
            "ID    RUNS  LABELS\n\
             s-1      7\n\
             s-22  1234  a=b\n"
        );
    }

    #[test]
    fn fields_align_their_values() {
        assert_eq!(
            fields(&[("pid", "7".into()), ("worker pid", "8".into())]),
            "pid         7\nworker pid  8\n"
        );
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(super::time(time), "2023-11-14T22:13:20Z");
        assert_eq!(time_millis(time), "2023-11-14T22:13:20.123Z");
    }
}
