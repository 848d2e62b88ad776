//! YAML text to [`PolicyDocument`]s, with errors that name the file, the line and the field.

use std::path::Path;

use super::{PolicyDocument, PolicyError};

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
            let doc: PolicyDocument = serde_yaml_ng::from_str(&chunk)
                .map_err(|e| yaml_error(file, &chunk, line_offset, &e))?;
            Ok(Parsed {
                line_offset,
                text: chunk,
                doc,
            })
        })
        .collect()
}

/// For errors raised inside buffered (internally tagged) values, serde reports the enclosing
/// entry; when the message names an unknown field, point at that field's own line instead.
fn refine_unknown_field(
    text: &str,
    line: Option<usize>,
    field: &str,
    message: &str,
) -> Option<(usize, String)> {
    let name = message.strip_prefix("unknown field `")?.split('`').next()?;
    let start = line?.checked_sub(1)?;
    let entry_indent = text
        .lines()
        .nth(start)
        .map(|l| l.len() - l.trim_start().len())?;
    for (i, l) in text.lines().enumerate().skip(start + 1) {
        let indent = l.len() - l.trim_start().len();
        let content = l.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if indent <= entry_indent {
            return None;
        }
        if content
            .strip_prefix(name)
            .is_some_and(|r| r.starts_with(':'))
        {
            // Walk back up to the entry, collecting the enclosing keys.
            let lines: Vec<&str> = text.lines().collect();
            let mut parents = Vec::new();
            let mut current = indent;
            for parent in lines[start + 1..i].iter().rev() {
                let p_indent = parent.len() - parent.trim_start().len();
                let p_content = parent.trim_start().trim_start_matches("- ");
                if p_indent < current && !p_content.is_empty() && !p_content.starts_with('#') {
                    if let Some((key, _)) = p_content.split_once(':') {
                        parents.push(key.trim());
                    }
                    current = p_indent;
                }
            }
            parents.reverse();
            parents.push(name);
            let tail = parents.join(".");
            let field = if field.is_empty() {
                tail
            } else {
                format!("{field}.{tail}")
            };
            return Some((i + 1, field));
        }
    }
    None
}

fn yaml_error(
    file: &Path,
    text: &str,
    line_offset: usize,
    err: &serde_yaml_ng::Error,
) -> PolicyError {
    let full = err.to_string();
    // serde_yaml_ng renders "<path>: <message> at line L column C"; split it apart.
    let without_mark = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full.clone(),
    };
    let (field, message) = match without_mark.split_once(": ") {
        Some((path, msg)) if !path.contains(' ') => (path.to_owned(), msg.to_owned()),
        _ => (String::new(), without_mark),
    };
    let line = err.location().map(|l| l.line());
    let (line, field) = match refine_unknown_field(text, line, &field, &message) {
        Some((l, f)) => (Some(l), f),
        None => (line, field),
    };
    PolicyError {
        file: file.to_owned(),
        line: line.map(|l| l + line_offset),
        field,
        message,
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
