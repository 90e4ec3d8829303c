//! Process-wide counters, updated with relaxed atomics on the hot path and read as a snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Stats {
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Frames queued for delivery to subscribers (one publish to N subscribers counts N).
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Stats {
    pub fn received(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn published(&self, deliveries: usize, frame_len: usize) {
        self.messages_out.fetch_add(deliveries as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add((deliveries * frame_len) as u64, Ordering::Relaxed);
    }
}
