//! The core's log lines reach Python's `logging` (logger `fastws`) without calling Python from tokio threads.
//!
//! A `log::Log` implementation puts each record of this crate into a bounded queue (dropping records if Python
//! stops reading, rather than blocking a connection task); a Python thread started by `fastws.app` takes them
//! with [`next_log_record`], with the GIL released while it waits.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use pyo3::prelude::*;

/// (Python logging level number, message).
type LogRecord = (u32, String);

/// Records waiting for Python; past this, new ones are dropped.
const QUEUE_CAPACITY: usize = 10_000;

struct Queue {
    sender: SyncSender<LogRecord>,
    receiver: Mutex<Receiver<LogRecord>>,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

struct QueueLogger;

impl log::Log for QueueLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level() && metadata.target().starts_with(env!("CARGO_CRATE_NAME"))
    }

    fn log(&self, record: &log::Record<'_>) {
        if let (true, Some(queue)) = (self.enabled(record.metadata()), QUEUE.get()) {
            let level = match record.level() {
                log::Level::Error => 40,
                log::Level::Warn => 30,
                log::Level::Info => 20,
                log::Level::Debug => 10,
                log::Level::Trace => 5,
            };
            let _ = queue.sender.try_send((level, record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: QueueLogger = QueueLogger;

/// Install the logger (once per process) and set the level from the `log_level` setting.
pub fn configure(level: &str) {
    QUEUE.get_or_init(|| {
        let (sender, receiver) = sync_channel(QUEUE_CAPACITY);
        let _ = log::set_logger(&LOGGER);
        Queue { sender, receiver: Mutex::new(receiver) }
    });
    log::set_max_level(match level {
        "debug" => log::LevelFilter::Debug,
        "warning" => log::LevelFilter::Warn,
        "error" => log::LevelFilter::Error,
        _ => log::LevelFilter::Info,
    });
}

/// The next log record of the core as `(level, message)`, or None after `timeout` seconds without one.
#[pyfunction]
pub fn next_log_record(py: Python<'_>, timeout: f64) -> Option<(u32, String)> {
    let queue = QUEUE.get()?;
    py.detach(|| {
        let receiver = queue.receiver.lock().unwrap_or_else(PoisonError::into_inner);
        receiver.recv_timeout(Duration::from_secs_f64(timeout.max(0.0))).ok()
    })
}
