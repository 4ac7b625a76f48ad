//! Request templates: text with placeholders filled per request.
//!
//! `{seq}` is the arrival's number in the run, `{id}` the request's
//! `x-request-id`, and `{rand:N}` a seeded number in `0..N` (for example a
//! merchant id, so per-merchant rate limits see many merchants).

use crate::schedule::Mix;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Seq,
    Id,
    Rand(u64),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        let mut text = String::new();
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            // A placeholder looks like `{word}` or `{word:N}`; any other
            // brace (a JSON body) is text.
            let name = after.find('}').map(|close| &after[..close]).filter(|n| {
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            });
            let Some(name) = name else {
                text.push('{');
                rest = after;
                continue;
            };
            let part = match name {
                "seq" => Part::Seq,
                "id" => Part::Id,
                _ => match name.strip_prefix("rand:").map(str::parse::<u64>) {
                    Some(Ok(n)) if n > 0 => Part::Rand(n),
                    _ => {
                        return Err(format!(
                            "{s:?}: unknown placeholder {{{name}}}; expected {{seq}}, {{id}} or {{rand:N}}"
                        ))
                    }
                },
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
            rest = &after[name.len() + 1..];
        }
        text.push_str(rest);
        let rest = text;
        if !rest.is_empty() {
            parts.push(Part::Text(rest));
        }
        Ok(Template {
            source: s.to_string(),
            parts,
        })
    }

    /// Text sent as it is, braces included.
    pub fn literal(s: &str) -> Template {
        Template {
            source: s.to_string(),
            parts: vec![Part::Text(s.to_string())],
        }
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when every request gets the same text.
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    pub fn render(&self, seq: u64, id: &str, rng: &mut Mix) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Seq => out.push_str(&seq.to_string()),
                Part::Id => out.push_str(id),
                Part::Rand(n) => out.push_str(&rng.below(*n).to_string()),
            }
        }
        out
    }
}

impl TryFrom<String> for Template {
    type Error = String;
    fn try_from(s: String) -> Result<Template, String> {
        Template::parse(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_bad_ones_named() {
        let t = Template::parse("/api/m/{rand:10}/order/{seq}?r={id}").unwrap();
        let mut rng = Mix::new(&[1.0], 1);
        let s = t.render(42, "lt-1-42", &mut rng);
        assert!(s.starts_with("/api/m/"), "{s}");
        assert!(s.ends_with("/order/42?r=lt-1-42"), "{s}");
        assert!(!t.is_constant());
        assert!(Template::parse("plain").unwrap().is_constant());
        let e = Template::parse("/x/{nope}").unwrap_err();
        assert!(e.contains("{nope}"), "{e}");
        assert!(Template::parse("/x/{rand:0}").is_err());
        // Braces that are not placeholders are text (JSON bodies).
        let json = Template::parse(r#"{"amount": 1999, "n": {seq}}"#).unwrap();
        assert_eq!(json.render(7, "i", &mut rng), r#"{"amount": 1999, "n": 7}"#);
        assert_eq!(
            Template::parse("/x/{seq").unwrap().render(1, "i", &mut rng),
            "/x/{seq"
        );
    }
}
