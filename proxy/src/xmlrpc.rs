//! The `methodName` of an XML-RPC call, from a prefix of the request body.
//!
//! Called as the body arrives, with what was read so far: the answer is the
//! method, "need more bytes", or why the body cannot be classified. Only the
//! `<methodCall><methodName>` element is looked at; comments, processing
//! instructions and whitespace around it are skipped, CDATA and the five
//! predefined entities and character references are resolved, and a
//! document type declaration (the door to entity tricks) or any entity it
//! would define makes the body unclassifiable, never expanded.

use quick_xml::events::Event;
use quick_xml::Reader;

/// Why a body gives no method to classify by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadBody {
    /// Not well-formed XML, not UTF-8, a DOCTYPE, an unknown entity, or
    /// markup inside `methodName`.
    Malformed,
    /// Well-formed, but no `<methodCall><methodName>` in it.
    NoMethodName,
    /// The inspection limit was reached before `methodName` ended.
    TooLarge,
    /// The body did not arrive within the inspection timeout.
    Timeout,
    /// `content-type` is not `text/xml` or `application/xml`.
    ContentType,
}

impl BadBody {
    pub fn as_str(self) -> &'static str {
        match self {
            BadBody::Malformed => "malformed",
            BadBody::NoMethodName => "no_method_name",
            BadBody::TooLarge => "too_large",
            BadBody::Timeout => "timeout",
            BadBody::ContentType => "content_type",
        }
    }
}

/// What a prefix of the body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extract {
    Method(String),
    /// The prefix ends before `methodName` does: read more.
    NeedMore,
    Bad(BadBody),
}

/// Whether a `content-type` is one XML-RPC is sent with.
pub fn xml_content_type(value: Option<&[u8]>) -> bool {
    let Some(v) = value else { return false };
    let v = String::from_utf8_lossy(v).to_ascii_lowercase();
    let mime = v.split(';').next().unwrap_or("").trim();
    mime == "text/xml" || mime == "application/xml"
}

/// Looks for the method in `body` (the first bytes of the request);
/// `complete` says whether the body ends there.
///
/// Only the bytes up to the end of `methodName` are judged: what follows
/// (even invalid UTF-8) does not change the answer, so a body gives the same
/// answer however it is cut into chunks (found by fuzzing).
pub fn method_name(body: &[u8], complete: bool) -> Extract {
    match std::str::from_utf8(body) {
        Ok(text) => parse(text, complete),
        Err(e) => {
            let valid = std::str::from_utf8(&body[..e.valid_up_to()]).expect("checked");
            // Bytes that can never become UTF-8 (or a body that ends inside a
            // character) end the usable text; a character cut by the end of
            // a prefix may still complete.
            let broken = e.error_len().is_some() || complete;
            match parse(valid, false) {
                Extract::NeedMore if broken => Extract::Bad(BadBody::Malformed),
                answer => answer,
            }
        }
    }
}

fn parse(text: &str, complete: bool) -> Extract {
    let truncated = |bad| {
        if complete {
            Extract::Bad(bad)
        } else {
            Extract::NeedMore
        }
    };
    let mut reader = Reader::from_str(text);
    let mut depth = 0usize;
    let mut in_call = false;
    let mut name: Option<String> = None;
    loop {
        let event = match reader.read_event() {
            Ok(e) => e,
            // An error at the end of a prefix may only be a cut tag.
            Err(_) => return truncated(BadBody::Malformed),
        };
        match event {
            Event::Start(s) => {
                if name.is_some() {
                    return Extract::Bad(BadBody::Malformed);
                }
                let local = s.local_name();
                match (depth, local.as_ref()) {
                    (0, "methodCall") => in_call = true,
                    (0, _) => return Extract::Bad(BadBody::NoMethodName),
                    (1, "methodName") if in_call => name = Some(String::new()),
                    _ => {}
                }
                depth += 1;
            }
            Event::Empty(s) => {
                if name.is_some() {
                    return Extract::Bad(BadBody::Malformed);
                }
                if depth == 0 {
                    return Extract::Bad(BadBody::NoMethodName);
                }
                if depth == 1 && s.local_name().as_ref() == "methodName" {
                    return Extract::Bad(BadBody::NoMethodName);
                }
            }
            Event::End(_) => {
                if let Some(n) = name.take() {
                    let n = n.trim();
                    if n.is_empty() {
                        return Extract::Bad(BadBody::NoMethodName);
                    }
                    return Extract::Method(n.to_string());
                }
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    // </methodCall> without a methodName before it.
                    return Extract::Bad(BadBody::NoMethodName);
                }
            }
            Event::Text(t) => {
                if let Some(n) = name.as_mut() {
                    n.push_str(&t.xml10_content());
                }
            }
            Event::CData(c) => {
                if let Some(n) = name.as_mut() {
                    n.push_str(&c.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                let Some(n) = name.as_mut() else { continue };
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => Some(c),
                    Ok(None) => match r.into_inner().as_ref() {
                        "amp" => Some('&'),
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "quot" => Some('"'),
                        "apos" => Some('\''),
                        _ => None,
                    },
                    Err(_) => None,
                };
                match resolved {
                    Some(c) => n.push(c),
                    None => return Extract::Bad(BadBody::Malformed),
                }
            }
            Event::DocType(_) => return Extract::Bad(BadBody::Malformed),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => return truncated(BadBody::NoMethodName),
        }
    }
}

/// A configured method: exact, or a prefix (`list_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodPattern {
    Exact(String),
    Prefix(String),
}

impl std::fmt::Display for MethodPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MethodPattern::Exact(m) => f.write_str(m),
            MethodPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

impl MethodPattern {
    pub fn parse(s: &str) -> MethodPattern {
        match s.strip_suffix('*') {
            Some(p) => MethodPattern::Prefix(p.to_string()),
            None => MethodPattern::Exact(s.to_string()),
        }
    }

    pub fn matches(&self, method: &str) -> bool {
        match self {
            MethodPattern::Exact(m) => m == method,
            MethodPattern::Prefix(p) => method.starts_with(p.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str) -> String {
        format!("<?xml version=\"1.0\"?>\n<methodCall>\n  <methodName>{method}</methodName>\n  <params><param><value><int>41</int></value></param></params>\n</methodCall>\n")
    }

    #[test]
    fn finds_the_method_of_a_plain_call() {
        assert_eq!(
            method_name(call("add_invoice").as_bytes(), true),
            Extract::Method("add_invoice".into())
        );
    }

    #[test]
    fn a_body_split_into_many_small_chunks_is_read_until_the_name_ends() {
        let body = call("reserve_amount");
        let bytes = body.as_bytes();
        let mut answers = Vec::new();
        for end in 1..=bytes.len() {
            let a = method_name(&bytes[..end], end == bytes.len());
            if a != Extract::NeedMore {
                answers.push((end, a));
                break;
            }
        }
        let (end, a) = &answers[0];
        assert_eq!(a, &Extract::Method("reserve_amount".into()));
        assert!(*end < bytes.len(), "known before the body ends");
    }

    #[test]
    fn a_large_comment_before_the_name_is_skipped() {
        let body = format!(
            "<methodCall><!-- {} --><methodName>list_invoices</methodName></methodCall>",
            "x".repeat(30_000)
        );
        assert_eq!(
            method_name(body.as_bytes(), true),
            Extract::Method("list_invoices".into())
        );
    }

    #[test]
    fn cdata_and_predefined_entities_and_char_refs_are_resolved() {
        let body = "<methodCall><methodName>add<![CDATA[_in]]>v&#111;ice</methodName></methodCall>";
        assert_eq!(
            method_name(body.as_bytes(), true),
            Extract::Method("add_invoice".into())
        );
        let body = "<methodCall><methodName>a&amp;b</methodName></methodCall>";
        assert_eq!(
            method_name(body.as_bytes(), true),
            Extract::Method("a&b".into())
        );
    }

    #[test]
    fn a_doctype_or_an_unknown_entity_is_refused_not_expanded() {
        let body = "<!DOCTYPE x [<!ENTITY m \"add_invoice\">]><methodCall><methodName>&m;</methodName></methodCall>";
        assert_eq!(
            method_name(body.as_bytes(), true),
            Extract::Bad(BadBody::Malformed)
        );
        let body = "<methodCall><methodName>&m;</methodName></methodCall>";
        assert_eq!(
            method_name(body.as_bytes(), true),
            Extract::Bad(BadBody::Malformed)
        );
    }

    #[test]
    fn malformed_and_nameless_bodies_say_so() {
        assert_eq!(
            method_name(b"<methodCall><methodName>x</wrong>", true),
            Extract::Bad(BadBody::Malformed)
        );
        assert_eq!(
            method_name(b"not xml at all", true),
            Extract::Bad(BadBody::NoMethodName)
        );
        assert_eq!(
            method_name(b"<methodCall><params/></methodCall>", true),
            Extract::Bad(BadBody::NoMethodName)
        );
        assert_eq!(
            method_name(b"<other><methodName>x</methodName></other>", true),
            Extract::Bad(BadBody::NoMethodName)
        );
        assert_eq!(
            method_name(b"<methodCall><methodName> </methodName></methodCall>", true),
            Extract::Bad(BadBody::NoMethodName)
        );
        assert_eq!(
            method_name(
                b"<methodCall><methodName><b>x</b></methodName></methodCall>",
                true
            ),
            Extract::Bad(BadBody::Malformed)
        );
        assert_eq!(
            method_name(&[0xff, 0xfe, b'<'], true),
            Extract::Bad(BadBody::Malformed)
        );
        assert_eq!(method_name(b"", true), Extract::Bad(BadBody::NoMethodName));
    }

    #[test]
    fn bytes_after_the_name_do_not_change_the_answer() {
        // Found by fuzzing: invalid UTF-8 after </methodName> made the whole
        // body "malformed" while a prefix gave the method.
        let mut body = b"<methodCall><methodName>add_invoice</methodName></meth".to_vec();
        body.extend_from_slice(&[0xff, 0xff]);
        body.extend_from_slice(b"odCall>");
        assert_eq!(
            method_name(&body, true),
            Extract::Method("add_invoice".into())
        );
        assert_eq!(
            method_name(&body[..50], false),
            Extract::Method("add_invoice".into())
        );
        assert_eq!(method_name(&body[..40], false), Extract::NeedMore);
    }

    #[test]
    fn a_prefix_cut_anywhere_asks_for_more() {
        let body = call("add_invoice");
        let cut = body.find("add_").unwrap() + 2;
        assert_eq!(
            method_name(&body.as_bytes()[..cut], false),
            Extract::NeedMore
        );
        // Cut inside a multi-byte character.
        let body = "<methodCall><methodName>zahlung_ä".as_bytes();
        assert_eq!(
            method_name(&body[..body.len() - 1], false),
            Extract::NeedMore
        );
    }

    #[test]
    fn content_types_and_patterns() {
        assert!(xml_content_type(Some(b"text/xml; charset=utf-8")));
        assert!(xml_content_type(Some(b"Application/XML")));
        assert!(!xml_content_type(Some(b"application/json")));
        assert!(!xml_content_type(None));
        assert!(MethodPattern::parse("list_*").matches("list_invoices"));
        assert!(!MethodPattern::parse("list_*").matches("add_invoice"));
        assert!(MethodPattern::parse("add_invoice").matches("add_invoice"));
        assert!(!MethodPattern::parse("add_invoice").matches("add_invoice2"));
    }
}
