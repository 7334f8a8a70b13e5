//! Plain-text output for people, and the one place the CLI writes to stdout: tables whose
//! cells are escaped and width-capped, `--output json` for scripts (exact JSON, whole
//! values), and lines written so that a closed pipe is an error `main` can end quietly on.

use std::io::{self, Write};

/// Widest a table cell is shown, in terminal columns. A longer value is cut and ends in
/// `…`: values come from machines (LLDP names, firmware strings) and may be any length,
/// and one 70,000-character rack name must not make a table unreadable (or, with a
/// formatting width past `u16::MAX`, panic). `--output json` shows every value whole.
pub const CELL_COLUMNS_MAX: usize = 96;
/// The same for a row's last cell, which pads nothing after it: longer, so event reasons
/// and error texts are rarely cut, but still bounded.
pub const LAST_CELL_COLUMNS_MAX: usize = 512;
const ELLIPSIS: char = '…';

/// Writes `text` and a newline to stdout. Every line the CLI prints goes through here
/// (not `println!`, which panics when stdout is a closed pipe), so `bearman events | head`
/// ends in one `BrokenPipe` error that `main` turns into a quiet exit.
pub fn out(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

/// Whether `error` is (or was caused by) a write to a closed pipe.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|error| error.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Prints a table (see [`render`]).
pub fn print(headers: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    out(render(headers, rows).trim_end_matches('\n'))
}

/// A table for a terminal: every cell [`escape`]d and cut to [`CELL_COLUMNS_MAX`]
/// columns ([`LAST_CELL_COLUMNS_MAX`] for the last), columns padded to their widest cell,
/// one line per row.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cells = |row: &mut dyn ExactSizeIterator<Item = &str>| -> Vec<String> {
        let last = row.len().saturating_sub(1);
        row.enumerate()
            .map(|(index, text)| {
                let max = if index == last {
                    LAST_CELL_COLUMNS_MAX
                } else {
                    CELL_COLUMNS_MAX
                };
                cut(&escape(text), max)
            })
            .collect()
    };
    let headers = cells(&mut headers.iter().copied());
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| cells(&mut row.iter().map(String::as_str)))
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|header| columns(header)).collect();
    for row in &rows {
        for (index, text) in row.iter().enumerate() {
            if index < widths.len() {
                widths[index] = widths[index].max(columns(text));
            }
        }
    }
    let mut table = String::new();
    for cells in std::iter::once(&headers).chain(&rows) {
        let mut line = String::new();
        for (index, text) in cells.iter().enumerate() {
            line.push_str(text);
            if index + 1 < cells.len() {
                let width = widths.get(index).copied().unwrap_or(0);
                let pad = width.saturating_sub(columns(text)) + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table
}

/// `text` with every control character written out, so what a machine stored cannot move
/// the cursor, recolour or retitle an operator's terminal, or fake a line: newline, tab and
/// carriage return as `\n`, `\t`, `\r`; other C0/C1 controls and DEL as `\x1b`-style
/// escapes; the bidirectional overrides and isolates (which reorder what follows them) as
/// `\u{202e}`. Everything else, backslashes included, is shown as it is.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if c.is_control() => escaped.push_str(&format!("\\x{:02x}", u32::from(c))),
            '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' => {
                escaped.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => escaped.push(c),
        }
    }
    escaped
}

/// `text` cut to at most `max` columns, ending in `…` when anything was cut.
fn cut(text: &str, max: usize) -> String {
    if columns(text) <= max {
        return text.to_string();
    }
    let mut kept = String::new();
    let mut used = 0;
    for c in text.chars() {
        let width = char_columns(c);
        if used + width + 1 > max {
            break;
        }
        kept.push(c);
        used += width;
    }
    kept.push(ELLIPSIS);
    kept
}

/// Terminal columns `text` takes (see [`char_columns`]).
fn columns(text: &str) -> usize {
    text.chars().map(char_columns).sum()
}

/// Columns one character takes: 2 for East Asian wide and fullwidth characters and emoji,
/// 0 for combining marks and zero-width characters, 1 otherwise. An approximation of
/// Unicode's East Asian Width good enough to keep columns aligned for what racks and
/// hostnames hold; a character it gets wrong misaligns a row, never more.
fn char_columns(c: char) -> usize {
    match u32::from(c) {
        0x0300..=0x036f | 0x200b..=0x200d | 0xfe00..=0xfe0f | 0xfeff => 0,
        0x1100..=0x115f
        | 0x2e80..=0x303e
        | 0x3041..=0x33ff
        | 0x3400..=0x4dbf
        | 0x4e00..=0x9fff
        | 0xa000..=0xa4cf
        | 0xac00..=0xd7a3
        | 0xf900..=0xfaff
        | 0xfe30..=0xfe4f
        | 0xff00..=0xff60
        | 0xffe0..=0xffe6
        | 0x1f300..=0x1f64f
        | 0x1f900..=0x1f9ff
        | 0x20000..=0x3fffd => 2,
        _ => 1,
    }
}

pub fn or_dash(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or("-").to_string()
}

/// Milliseconds since the epoch as an RFC 3339-ish UTC timestamp, without a date crate.
pub fn timestamp(ms: i64) -> String {
    bearman::core::calendar::rfc3339_utc(ms.div_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(table: &str) -> Vec<&str> {
        table.lines().collect()
    }

    #[test]
    fn a_70000_character_cell_is_cut_with_an_ellipsis_and_does_not_panic() {
        let long = "r".repeat(70_000);
        let rows = vec![
            vec!["node-1".to_string(), long.clone(), "ready".to_string()],
            vec!["node-2".to_string(), "rack-2".to_string(), long.clone()],
        ];
        let table = render(&["HOSTNAME", "RACK", "STATE"], &rows);
        let lines = lines(&table);
        assert_eq!(lines.len(), 3, "{table}");
        let rack = format!("{}…", "r".repeat(CELL_COLUMNS_MAX - 1));
        assert!(lines[1].contains(&format!("{rack}  ready")), "{}", lines[1]);
        assert!(
            lines[2].ends_with(&format!("{}…", "r".repeat(LAST_CELL_COLUMNS_MAX - 1))),
            "{}",
            lines[2]
        );
        // The STATE column starts at the same column in every line.
        let at = |line: &str, text: &str| columns(&line[..line.find(text).unwrap()]);
        assert_eq!(at(lines[0], "STATE"), at(lines[1], "ready"));
        assert!(table.lines().all(|line| columns(line) < 700), "{table}");
    }

    #[test]
    fn ansi_escapes_and_other_controls_are_shown_escaped() {
        let rows = vec![vec![
            "\u{1b}[31mred\u{1b}[0m".to_string(),
            "\u{1b}]0;pwned\u{7} del\u{7f} csi\u{9b}2J nul\u{0}".to_string(),
        ]];
        let table = render(&["RACK", "WHY"], &rows);
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "{table:?}"
        );
        assert!(table.contains("\\x1b[31mred\\x1b[0m"), "{table}");
        assert!(
            table.contains("\\x1b]0;pwned\\x07 del\\x7f csi\\x9b2J nul\\x00"),
            "{table}"
        );
    }

    #[test]
    fn newlines_tabs_and_bidi_overrides_cannot_fake_a_line_or_reorder_text() {
        let rows = vec![vec![
            "n1".to_string(),
            "ok\nn2  ready  fake\r\tx".to_string(),
            "a\u{202e}txt.exe".to_string(),
        ]];
        let table = render(&["NODE", "WHY", "FILE"], &rows);
        assert_eq!(lines(&table).len(), 2, "{table}");
        assert!(table.contains("ok\\nn2  ready  fake\\r\\tx"), "{table}");
        assert!(table.contains("a\\u{202e}txt.exe"), "{table}");
        assert_eq!(escape("C:\\path é ✓"), "C:\\path é ✓");
    }

    #[test]
    fn wide_characters_are_counted_as_two_columns_and_cut_on_a_character() {
        assert_eq!(columns("ラック"), 6);
        assert_eq!(columns("e\u{301}"), 1);
        let rows = vec![
            vec!["ラック".to_string(), "x".to_string()],
            vec!["abc".to_string(), "y".to_string()],
        ];
        let table = render(&["RACK", "N"], &rows);
        let lines = lines(&table);
        assert_eq!(lines[1], "ラック  x");
        assert_eq!(lines[2], "abc     y");
        let wide = "機".repeat(70_000);
        let cut = cut(&wide, CELL_COLUMNS_MAX);
        assert!(columns(&cut) <= CELL_COLUMNS_MAX, "{}", columns(&cut));
        assert!(cut.ends_with('…') && cut.starts_with('機'));
        let table = render(&["RACK", "N"], &[vec![wide, "z".into()]]);
        assert!(table.lines().nth(1).unwrap().ends_with("…  z"), "{table}");
    }

    #[test]
    fn timestamps_render_in_utc() {
        assert_eq!(super::timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::timestamp(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }
}
