//! The harness processes' log: `tracing` events at `INFO` and above, one line each on
//! stderr with the wall-clock time in milliseconds since the Unix epoch (the time the
//! lease lines use), so a failed multi-process run can be read back process by process.
//! A few lines of our own instead of `tracing-subscriber`: the harness needs nothing else
//! of it, and the suite's build stays lean.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Installs the log for this process.
pub fn install() {
    let _ = tracing::subscriber::set_global_default(Lines);
}

struct Lines;

struct Fields(String);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Lines {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::INFO
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    #[allow(clippy::disallowed_methods)] // log lines carry the machine's wall-clock time
    fn event(&self, event: &Event<'_>) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let m = event.metadata();
        let _ = writeln!(
            std::io::stderr(),
            "{ms} {} {}{}",
            m.level(),
            m.target(),
            fields.0
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}
