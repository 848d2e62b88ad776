//! Finds the line of a field in block-style YAML, so semantic validation errors can name it.

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
}
