//! The Python bridge: the only pyo3 code besides `lib.rs`. Converts settings in, and snapshots and errors out;
//! everything it calls is plain Rust that never sees a Python object.

pub mod callbacks;
pub mod logging;
pub mod payload;
pub mod publisher;
pub mod push_queue;
pub mod server;
