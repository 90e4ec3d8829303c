//! Hub micro-bench: the cost of one publish to N local subscribers, without sockets.
//!
//! Measures `Hub::publish` (walk the subscriber map, clone the shared frame into each outbox) and the matching
//! drain on the consumer side, so the figure is the in-process fan-out cost per delivery. Run:
//! `cargo bench --bench hub` (stable; harness = false). Sockets, syscalls and the client are not included: the
//! end-to-end harness is `make bench` (benches/run.py and the load generator in benches/loadgen).

// A bench's output is its report.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use _fastws::conn::outbox::{Outbox, OutboxReceiver};
use _fastws::hub::Hub;
use _fastws::protocol::{encode_publication, Origin};

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let _guard = runtime.enter();
    let payload = format!(r#"{{"event":"tick","data":{{"pad":"{}"}}}}"#, "x".repeat(160));
    let frame = encode_publication("bench", &payload, Origin::Server).expect("frame");
    println!("frame: {} bytes", frame.len());
    for subscribers in [1_000usize, 10_000] {
        let hub = Hub::new(1);
        let mut receivers: Vec<OutboxReceiver> = Vec::with_capacity(subscribers);
        let mut outboxes = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            let (outbox, mut rx) = Outbox::new(hub.new_conn_id(), 1 << 20, 0);
            hub.subscribe("bench", &outbox, None);
            let subscribed = rx.try_recv().expect("the subscribed reply");
            outbox.written(subscribed.frame.len());
            outboxes.push(outbox);
            receivers.push(rx);
        }
        let publishes = 2_000_000 / subscribers;
        let (mut publish_ns, mut drain_ns) = (0u128, 0u128);
        for _ in 0..publishes {
            let started = Instant::now();
            assert_eq!(hub.publish("bench", &frame, None, true), subscribers);
            publish_ns += started.elapsed().as_nanos();
            let started = Instant::now();
            for (rx, outbox) in receivers.iter_mut().zip(&outboxes) {
                let got = rx.try_recv().expect("delivered");
                outbox.written(got.frame.len());
            }
            drain_ns += started.elapsed().as_nanos();
        }
        let deliveries = (publishes * subscribers) as f64;
        println!(
            "{subscribers:>6} subscribers: publish {:.1} ns/delivery ({:.2} M deliveries/s), drain {:.1} ns/delivery",
            publish_ns as f64 / deliveries,
            deliveries / (publish_ns as f64 / 1e9) / 1e6,
            drain_ns as f64 / deliveries,
        );
    }
}
