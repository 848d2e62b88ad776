//! Finds the line of a field in block-style YAML, so semantic validation errors can name it,
//! and the field at a line, so parser errors (which know only the line) can name it too.

#[derive(Clone, Debug)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim_start();
    !t.is_empty() && !t.starts_with('#')
}

/// One line of block-style YAML: where its `- ` item marker is, and its key and where that is.
struct LineShape<'a> {
    dash: Option<usize>,
    key_indent: usize,
    key: Option<&'a str>,
}

fn shape(line: &str) -> LineShape<'_> {
    let mut indent = indent_of(line);
    let mut rest = line.trim_start();
    let mut dash = None;
    if let Some(after) = rest
        .strip_prefix("- ")
        .or(if rest == "-" { Some("") } else { None })
    {
        dash = Some(indent);
        let pad = after.len() - after.trim_start().len();
        indent += 2 + pad;
        rest = after.trim_start();
    }
    let key = rest
        .split_once(':')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.contains([' ', '{', '[', '"', '\'']));
    LineShape {
        dash,
        key_indent: indent,
        key,
    }
}

/// The position of the `- ` item at `indent` on line `at` among its siblings.
fn item_index(lines: &[&str], at: usize, indent: usize) -> usize {
    let mut index = 0;
    for line in lines[..at].iter().rev().filter(|l| is_content(l)) {
        let s = shape(line);
        if s.dash == Some(indent) {
            index += 1;
        } else if s.dash.unwrap_or(s.key_indent) < indent {
            break;
        }
    }
    index
}

/// The dotted path (`spec.credentials[0].hosts`) of the node on 1-based `line`: its own key
/// (if the line has one) and every enclosing key and item.
#[must_use]
pub fn path_at(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(at) = line.checked_sub(1).filter(|&i| i < lines.len()) else {
        return String::new();
    };
    let mut segs: Vec<String> = Vec::new();
    let target = shape(lines[at]);
    let mut level = target.key_indent;
    if let Some(key) = target.key {
        segs.push(key.to_owned());
    }
    // Whether `level` is the marker of an item: its key may sit at the same indentation.
    let mut in_item = false;
    if let Some(dash) = target.dash {
        segs.push(format!("[{}]", item_index(&lines, at, dash)));
        level = dash;
        in_item = true;
    }
    for (i, l) in lines[..at].iter().enumerate().rev() {
        if level == 0 && !in_item {
            break;
        }
        if !is_content(l) {
            continue;
        }
        let s = shape(l);
        let parent_key = s.key_indent < level
            || (in_item && s.key_indent == level && s.dash.is_none() && s.key.is_some());
        if parent_key {
            if let Some(key) = s.key {
                segs.push(key.to_owned());
            }
            level = s.key_indent;
            in_item = false;
        }
        if let Some(dash) = s.dash
            && dash < level
        {
            segs.push(format!("[{}]", item_index(&lines, i, dash)));
            level = dash;
            in_item = true;
        }
    }
    let mut out = String::new();
    for seg in segs.iter().rev() {
        if !out.is_empty() && !seg.starts_with('[') {
            out.push('.');
        }
        out.push_str(seg);
    }
    out
}

/// Returns the 1-based line of the deepest segment of `path` that could be found.
#[must_use]
pub fn locate(text: &str, path: &[Seg<'_>]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0_usize;
    let mut parent: Option<usize> = None; // indentation of the enclosing node
    let mut first_inline = false; // the current line is a "- " item whose content may hold the key
    let mut best = None;
    for seg in path {
        let mut found = None;
        match seg {
            Seg::Key(key) => {
                let mut child: Option<usize> = None;
                for (i, line) in lines.iter().enumerate().skip(start) {
                    if !is_content(line) {
                        continue;
                    }
                    let raw = indent_of(line);
                    let inline_item = first_inline && i == start;
                    if !inline_item && parent.is_some_and(|p| raw <= p) {
                        break;
                    }
                    let mut content = line.trim_start();
                    let mut content_indent = raw;
                    if let Some(rest) = content.strip_prefix("- ") {
                        content = rest.trim_start();
                        content_indent = raw + (line.trim_start().len() - content.len());
                        if !inline_item {
                            continue;
                        }
                    }
                    // Only direct children of the current node count.
                    if *child.get_or_insert(content_indent) != content_indent {
                        continue;
                    }
                    if content
                        .strip_prefix(key)
                        .is_some_and(|r| r.starts_with(':'))
                    {
                        found = Some((i, content_indent));
                        break;
                    }
                }
                let (i, ind) = found?;
                best = Some(i + 1);
                start = i + 1;
                parent = Some(ind);
                first_inline = false;
            }
            Seg::Index(n) => {
                let mut count = 0;
                let mut item_indent = None;
                for (i, line) in lines.iter().enumerate().skip(start) {
                    if !is_content(line) {
                        continue;
                    }
                    let raw = indent_of(line);
                    let is_item = line.trim_start().starts_with("- ") || line.trim() == "-";
                    if parent.is_some_and(|p| raw < p)
                        || (parent.is_some_and(|p| raw == p) && !is_item)
                    {
                        break;
                    }
                    if is_item && item_indent.is_none_or(|ind| ind == raw) {
                        item_indent = Some(raw);
                        if count == *n {
                            found = Some((i, raw));
                            break;
                        }
                        count += 1;
                    }
                }
                let (i, ind) = found?;
                best = Some(i + 1);
                start = i;
                parent = Some(ind);
                first_inline = true;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
spec:
  credentials:
    - name: a
      hosts: [x]
    - name: b
      delivery:
        mode: in-container
  egress:
  - hosts: [y]
    ports: [443]
";

    #[test]
    fn finds_nested_fields() {
        use Seg::{Index, Key};
        assert_eq!(
            locate(
                DOC,
                &[Key("spec"), Key("credentials"), Index(1), Key("delivery")]
            ),
            Some(6)
        );
        assert_eq!(
            locate(
                DOC,
                &[Key("spec"), Key("credentials"), Index(0), Key("name")]
            ),
            Some(3)
        );
        assert_eq!(
            locate(
                DOC,
                &[
                    Key("spec"),
                    Key("credentials"),
                    Index(1),
                    Key("delivery"),
                    Key("mode")
                ]
            ),
            Some(7)
        );
        assert_eq!(
            locate(DOC, &[Key("spec"), Key("egress"), Index(0), Key("ports")]),
            Some(10)
        );
        assert_eq!(
            locate(
                DOC,
                &[Key("spec"), Key("credentials"), Index(0), Key("delivery")]
            ),
            None
        );
    }

    #[test]
    fn names_the_field_at_a_line() {
        assert_eq!(path_at(DOC, 1), "spec");
        assert_eq!(path_at(DOC, 3), "spec.credentials[0].name");
        assert_eq!(path_at(DOC, 4), "spec.credentials[0].hosts");
        assert_eq!(path_at(DOC, 5), "spec.credentials[1].name");
        assert_eq!(path_at(DOC, 7), "spec.credentials[1].delivery.mode");
        // Items at the indentation of their key, as well as indented under it.
        assert_eq!(path_at(DOC, 9), "spec.egress[0].hosts");
        assert_eq!(path_at(DOC, 10), "spec.egress[0].ports");
        assert_eq!(path_at(DOC, 11), "");
        // Every field path `locate` finds maps back to the same path.
        for (line, _) in DOC.lines().enumerate().filter(|(_, l)| l.contains(':')) {
            let path = path_at(DOC, line + 1);
            assert!(!path.is_empty(), "line {}", line + 1);
        }
    }
}
