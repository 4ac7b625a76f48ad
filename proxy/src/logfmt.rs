//! The text log's fields, written as tracing's default format writes them
//! without colours (`name=value`, space-separated, the message first), for
//! a fraction of the work.
//!
//! tracing-subscriber's `DefaultFields` paints every field name and `=`
//! through its terminal-styling types even when colours are off: with the
//! access log's 25 fields that was about 20 000 of the 34 000 instructions
//! an access line cost (callgrind, docs/benchmarks.md). [`PlainFields`]
//! writes the names directly and quotes plain strings without the
//! formatting machinery; everything else (the message, errors, numbers,
//! `%` and `?` values, strings that need escaping) is written exactly as
//! `DefaultFields` writes it, by `DefaultFields`' own visitor or by `{:?}`.
//! It is used only when the log has no colours.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::FormatFields;

/// Fields as `DefaultFields` writes them without colours.
#[derive(Debug, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut v = PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// The message and errors: `DefaultFields`' own visitor writes them
    /// (escaping, error sources), on the same line.
    fn by_default(&mut self, record: impl FnOnce(&mut dyn Visit)) {
        if self.result.is_err() {
            return;
        }
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }

    /// ` name=` (no space before the first field).
    fn name(&mut self, field: &Field) -> Option<()> {
        if self.result.is_err() {
            return None;
        }
        let name = field.name();
        // tracing-log's metadata fields, which the line already shows.
        if name.starts_with("log.") {
            return None;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let pad = if self.is_empty { "" } else { " " };
        self.is_empty = false;
        self.result = self
            .writer
            .write_str(pad)
            .and_then(|()| self.writer.write_str(name))
            .and_then(|()| self.writer.write_char('='));
        self.result.is_ok().then_some(())
    }
}

/// Whether `{:?}` writes `s` as itself between quotes: printable ASCII
/// without `"` or `\`.
fn quotes_as_is(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.by_default(|v| v.record_str(field, value));
        }
        if self.name(field).is_none() {
            return;
        }
        self.result = if quotes_as_is(value) {
            self.writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'))
        } else {
            write!(self.writer, "{value:?}")
        };
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.by_default(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            return self.by_default(|v| v.record_debug(field, value));
        }
        if self.name(field).is_some() {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::format::DefaultFields;
    use tracing_subscriber::fmt::MakeWriter;

    use super::PlainFields;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Failed;
    impl std::fmt::Display for Failed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("backend \"b1\" failed")
        }
    }
    impl std::error::Error for Failed {}

    /// Events with every kind of field k2proxy logs.
    fn events() {
        let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let none: Option<&str> = None;
        tracing::info!(
            target: "k2proxy::access",
            method = %"GET",
            path = "/checkout/pay",
            query = none,
            spilled_from = Some("secondary"),
            status = 200u16,
            tries = 1usize,
            upstream_ms = Some(1.5f64),
            duration_ms = 2.0f64,
            upstream = %addr,
            user_agent = "curl/8 \"quoted\" \\ back",
            host = "bücher.example",
            control = "tab\there\u{1b}[31m",
            empty = "",
            kept = true,
            r#type = "raw",
            "access"
        );
        tracing::warn!(
            error = &Failed as &dyn std::error::Error,
            "reload refused: {}",
            "line 3"
        );
        tracing::info!(
            count = 3,
            "{} \u{1b}[1mbold\u{1b}[0m",
            "message with escapes"
        );
        tracing::info!(first = "only");
        tracing::debug!(when = ?std::time::Duration::from_millis(1500), "debug value");
    }

    fn lines(fields_plain: bool) -> String {
        let buf = Buf::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::DEBUG);
        if fields_plain {
            let sub = builder.fmt_fields(PlainFields).finish();
            tracing::subscriber::with_default(sub, events);
        } else {
            let sub = builder.fmt_fields(DefaultFields::new()).finish();
            tracing::subscriber::with_default(sub, events);
        }
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_fields_write_what_the_default_fields_write_without_colours() {
        let default = lines(false);
        let plain = lines(true);
        assert_eq!(default.lines().count(), 5, "{default}");
        assert!(default.contains("user_agent=\"curl/8 \\\"quoted\\\" \\\\ back\""));
        assert_eq!(plain, default);
    }
}
