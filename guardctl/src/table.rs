//! A small aligned-column table for guardctl's human output.

use std::fmt::Write as _;

/// How a column's cells are padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text columns.
    Left,
    /// Numeric columns, so digits line up.
    Right,
}

/// Rows of cells under a header, rendered with two spaces between columns and no trailing
/// whitespace. Cells are expected to be sanitized already (see `format::sanitize`).
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers, all left-aligned.
    pub fn new(header: &[&'static str]) -> Self {
        Table {
            header: header.to_vec(),
            align: vec![Align::Left; header.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns the given columns (by index).
    #[must_use]
    pub fn right(mut self, columns: &[usize]) -> Self {
        for &c in columns {
            if let Some(a) = self.align.get_mut(c) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Appends a row; missing cells render empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the header and rows, each line ending in `\n`, every line prefixed by `indent`.
    pub fn render(&self, indent: &str) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        let header = self.header.iter().map(|h| (*h).to_owned()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, (&w, &align)) in widths.iter().zip(&self.align).enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = w - width(cell);
                let last = i + 1 == n;
                if i > 0 {
                    line.push_str("  ");
                }
                match align {
                    Align::Right => {
                        let _ = write!(line, "{:pad$}{cell}", "");
                    }
                    Align::Left if last => line.push_str(cell),
                    Align::Left => {
                        let _ = write!(line, "{cell}{:pad$}", "");
                    }
                }
            }
            // An empty last column would otherwise leave padding behind.
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Display width, counted in chars: close enough for DNS names and addresses, and avoids a
/// unicode-width dependency.
fn width(s: &str) -> usize {
    s.chars().count()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn strings(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn columns_are_aligned_without_trailing_space() {
        let mut t = Table::new(&["IP", "NAMES", "COMMENT"]);
        t.row(strings(&["192.0.2.1", "a.example", ""]));
        t.row(strings(&["2001:db8::1", "b.example", "hi"]));
        assert_eq!(
            t.render(""),
            "IP           NAMES      COMMENT\n\
             192.0.2.1    a.example\n\
             2001:db8::1  b.example  hi\n"
        );
    }

    #[test]
    fn right_aligned_numbers_and_indent() {
        let mut t = Table::new(&["NAME", "PACKETS"]).right(&[1]);
        t.row(strings(&["accepted", "7"]));
        t.row(strings(&["rejected", "12345678"]));
        assert_eq!(
            t.render("  "),
            "  NAME       PACKETS\n  \
             accepted         7\n  \
             rejected  12345678\n"
        );
    }

    #[test]
    fn ragged_rows_and_wide_chars() {
        let mut t = Table::new(&["A", "B"]);
        t.row(strings(&["µµµ"]));
        t.row(strings(&["x", "y", "dropped"]));
        assert_eq!(t.render(""), "A    B\nµµµ\nx    y\n");
    }

    #[test]
    fn empty_table_renders_header_only() {
        let t = Table::new(&["IP", "NAMES"]);
        assert_eq!(t.render(""), "IP  NAMES\n");
    }
}
