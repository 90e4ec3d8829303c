//! fastws: a WebSocket server for Python applications, with a Rust core.
//!
//! Data flow, one module per stage: `server` (accept) → `handshake` (HTTP upgrade, or `http` for plain requests)
//! → `conn` (per-connection task and its outbox) → `protocol` (decode/encode) → `hub` (channels and fan-out),
//! with `broker` beside the hub for the other nodes of a cluster (Redis).
//! `bridge` is the only way in from Python.

pub mod auth;
pub mod bridge;
pub mod broker;
pub mod config;
pub mod conn;
pub mod error;
pub mod handshake;
pub mod http;
pub mod hub;
pub mod presence;
pub mod protocol;
pub mod server;
pub mod stats;

use pyo3::prelude::*;

/// jemalloc for every Rust allocation of the server (Python keeps its own allocator). Why: tokio allocates each
/// connection's task cell and socket registration 128-byte aligned; glibc serves those with a header and alignment
/// slack, jemalloc from exact size classes. That is ~200 bytes per idle connection (see Cargo.toml).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[pymodule]
fn _fastws(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<bridge::server::PyServer>()?;
    m.add_class::<bridge::publisher::PyRedisPublisher>()?;
    m.add_function(wrap_pyfunction!(bridge::logging::next_log_record, m)?)?;
    Ok(())
}
