//! YAML text to [`PolicyDocument`]s, with errors that name the file, the line and the field.

use std::path::Path;

use super::{PolicyDocument, PolicyError, locate::path_at};
use crate::yaml::{self, YamlError};

/// One document of a YAML stream: its first line (0-based, in the whole file), its text and
/// what it deserialised to.
pub(super) struct Parsed {
    pub line_offset: usize,
    pub text: String,
    pub doc: PolicyDocument,
}

/// Splits `text` into documents and deserialises each; the first malformed one fails the file.
pub(super) fn documents(file: &Path, text: &str) -> Result<Vec<Parsed>, PolicyError> {
    split_documents(text)
        .into_iter()
        .map(|(line_offset, chunk)| {
            let doc: PolicyDocument =
                yaml::from_str(&chunk).map_err(|e| yaml_error(file, &chunk, line_offset, e))?;
            Ok(Parsed {
                line_offset,
                text: chunk,
                doc,
            })
        })
        .collect()
}

/// Serde reports an unknown field inside a buffered (internally tagged) value at the
/// enclosing entry; when the message names an unknown field, find that field's own line.
fn refine_unknown_field(text: &str, line: usize, message: &str) -> Option<usize> {
    let name = message.strip_prefix("unknown field `")?.split('`').next()?;
    let is_key = |l: &str| {
        l.trim_start()
            .trim_start_matches("- ")
            .strip_prefix(name)
            .is_some_and(|r| r.starts_with(':'))
    };
    let start = line.checked_sub(1)?;
    let entry = text.lines().nth(start)?;
    if is_key(entry) {
        return None;
    }
    let entry_indent = entry.len() - entry.trim_start().len();
    for (i, l) in text.lines().enumerate().skip(start + 1) {
        let indent = l.len() - l.trim_start().len();
        let content = l.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if indent <= entry_indent {
            return None;
        }
        if is_key(l) {
            return Some(i + 1);
        }
    }
    None
}

fn yaml_error(file: &Path, text: &str, line_offset: usize, err: YamlError) -> PolicyError {
    let line = err
        .line
        .map(|l| refine_unknown_field(text, l, &err.message).unwrap_or(l));
    PolicyError {
        file: file.to_owned(),
        line: line.map(|l| l + line_offset),
        field: line.map(|l| path_at(text, l)).unwrap_or_default(),
        message: err.message,
    }
}

/// Splits a YAML stream into documents, with the line offset of each.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            out.push((start, std::mem::take(&mut current)));
            start = i + 1;
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    out.push((start, current));
    out.into_iter()
        .filter(|(_, doc)| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}
