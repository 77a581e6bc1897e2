//! ComfyUI's prompt emphasis syntax: `(word)` weighs a span by 1.1, `(word:1.3)` by 1.3,
//! nesting multiplies, `\(` and `\)` are literal parentheses.
//!
//! Anime workflows lean on this (`(masterpiece:1.2), (best quality)`), so a prompt exported
//! from ComfyUI must weigh the same here. Weights apply after encoding, per token, the way
//! ComfyUI does it: `z = z_empty + (z - z_empty) * weight`, where `z_empty` is the encoding
//! of an empty prompt.

/// Splits `text` into `(segment, weight)` pairs.
pub fn parse_weighted(text: &str) -> Vec<(String, f32)> {
    // Escaped parentheses become private-use characters while parsing, then come back.
    const OPEN: char = '\u{E000}';
    const CLOSE: char = '\u{E001}';
    let escaped = text
        .replace("\\(", &OPEN.to_string())
        .replace("\\)", &CLOSE.to_string());
    weights(&escaped, 1.0)
        .into_iter()
        .map(|(segment, weight)| (segment.replace(OPEN, "(").replace(CLOSE, ")"), weight))
        .filter(|(segment, _)| !segment.is_empty())
        .collect()
}

/// Top-level parenthesised groups and the text between them.
fn split_groups(text: &str) -> Vec<String> {
    let mut groups = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' => {
                if depth == 0 && !current.is_empty() {
                    groups.push(std::mem::take(&mut current));
                }
                current.push(c);
                depth += 1;
            }
            ')' if depth > 0 => {
                depth -= 1;
                current.push(c);
                if depth == 0 {
                    groups.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

fn weights(text: &str, current: f32) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    for group in split_groups(text) {
        let inner = group
            .strip_prefix('(')
            .and_then(|g| g.strip_suffix(')'))
            .filter(|_| group.len() >= 2);
        match inner {
            Some(inner) => {
                let mut weight = current * 1.1;
                let mut body = inner;
                if let Some(colon) = inner.rfind(':')
                    && colon > 0
                    && let Ok(explicit) = inner[colon + 1..].trim().parse::<f32>()
                {
                    weight = explicit;
                    body = &inner[..colon];
                }
                out.extend(weights(body, weight));
            }
            None => out.push((group, current)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comfyui_emphasis() {
        assert_eq!(parse_weighted("a cat"), vec![("a cat".to_string(), 1.0)]);
        let parsed = parse_weighted("(masterpiece:1.2), (best quality), ((cute)) cat");
        assert_eq!(parsed[0], ("masterpiece".to_string(), 1.2));
        assert_eq!(parsed[1], (", ".to_string(), 1.0));
        assert_eq!(parsed[2].0, "best quality");
        assert!((parsed[2].1 - 1.1).abs() < 1e-6);
        assert_eq!(parsed[4].0, "cute");
        assert!((parsed[4].1 - 1.21).abs() < 1e-6);
        assert_eq!(parsed[5], (" cat".to_string(), 1.0));
    }

    #[test]
    fn escaped_parentheses_and_bad_weights_are_text() {
        assert_eq!(
            parse_weighted("smile \\(happy\\)"),
            vec![("smile (happy)".to_string(), 1.0)]
        );
        let parsed = parse_weighted("(time: noon)");
        assert_eq!(parsed[0].0, "time: noon");
        assert!((parsed[0].1 - 1.1).abs() < 1e-6);
        assert_eq!(
            parse_weighted("unclosed (paren"),
            vec![("unclosed ".to_string(), 1.0), ("(paren".to_string(), 1.0)]
        );
    }
}
