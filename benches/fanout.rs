//! End-to-end fan-out load generator: S subscribers on one channel, one publisher at maximum rate with a bounded
//! window of messages in flight, for a fixed time. Prints one JSON line.
//!
//! It speaks fastws's native protocol through real sockets (tokio-tungstenite clients) and publishes with client
//! publish frames, so the server under test must allow `client_publish` on the channel. Latency is sampled from the
//! send timestamp carried in each payload, found by a text search (no JSON decode per frame). Run it through
//! `benches/run_fanout.sh`, which starts the server pinned to one core and this generator on the other.
//!
//! Usage: fanout URL [subscribers] [seconds] [window] [server_pid]

// A bench's output is its report.
#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

const CHANNEL: &str = "bench";
/// Payload padding so a publish payload is about 200 bytes, as in the issue's scenario.
const PAD: usize = 150;
/// Every Nth message per subscriber is a latency sample.
const SAMPLE_EVERY: u64 = 16;

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn arg<T: std::str::FromStr>(args: &[String], index: usize, default: T) -> T {
    args.get(index).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// CPU seconds (user + system) and RSS in bytes of a process, from /proc.
fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks / 100.0, rss_kb * 1024))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1e6 // nanoseconds → milliseconds
}

async fn subscribe(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut ws, _) = connect_async(url).await.expect("connect");
    ws.next().await.expect("connected frame").expect("connected frame");
    ws.send(Message::text(format!(r#"{{"event":"subscribe","data":{{"channel":"{CHANNEL}"}}}}"#)))
        .await
        .expect("subscribe");
    ws.next().await.expect("subscribed frame").expect("subscribed frame");
    ws
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(url) = args.get(1).cloned() else {
        eprintln!("usage: fanout URL [subscribers] [seconds] [window] [server_pid]");
        std::process::exit(2);
    };
    let subscribers: usize = arg(&args, 2, 1000);
    let seconds: f64 = arg(&args, 3, 10.0);
    let window: u64 = arg(&args, 4, 16);
    let server_pid: u32 = arg(&args, 5, 0);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(run(url, subscribers, seconds, window, server_pid));
}

async fn run(url: String, subscribers: usize, seconds: f64, window: u64, server_pid: u32) {
    let received = Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let samples = Arc::new(Mutex::new(Vec::<u64>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(subscribers);
    for index in 0..subscribers {
        let ws = subscribe(&url).await;
        let (received, samples, done) = (Arc::clone(&received), Arc::clone(&samples), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let (_, mut read) = ws.split();
            let mut count = 0u64;
            while let Some(Ok(message)) = read.next().await {
                if let Message::Text(text) = message {
                    count += 1;
                    received[index].store(count, Ordering::Relaxed);
                    if count.is_multiple_of(SAMPLE_EVERY) {
                        if let Some(sent) = text.split("\"t\":").nth(1).and_then(|r| r.split(',').next()) {
                            if let Ok(sent) = sent.parse::<u64>() {
                                // Uncontended: the generator runs on one thread.
                                samples.lock().expect("samples").push(now_micros().saturating_sub(sent) * 1000);
                            }
                        }
                    }
                }
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }

    let (mut publisher, _) = connect_async(&url).await.expect("publisher connect");
    publisher.next().await.expect("connected").expect("connected");
    let before = process_usage(server_pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let pad = "x".repeat(PAD);
    let mut sent = 0u64;
    // The window is measured on the slowest of a few probe subscribers, so the publisher never runs ahead.
    let probes: Vec<usize> = (0..subscribers).step_by((subscribers / 8).max(1)).collect();
    while Instant::now() < deadline {
        let slowest = probes.iter().map(|&i| received[i].load(Ordering::Relaxed)).min().unwrap_or(0);
        if sent - slowest >= window {
            tokio::task::yield_now().await;
            continue;
        }
        let frame = format!(
            r#"{{"event":"publish","data":{{"channel":"{CHANNEL}","payload":{{"t":{},"seq":{sent},"pad":"{pad}"}}}}}}"#,
            now_micros()
        );
        publisher.send(Message::text(frame)).await.expect("publish");
        sent += 1;
    }
    let publish_elapsed = started.elapsed().as_secs_f64();
    // Let what is in flight arrive, then count.
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < drain_deadline && received.iter().any(|r| r.load(Ordering::Relaxed) < sent) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = process_usage(server_pid);
    done.store(true, Ordering::Relaxed);
    let delivered: u64 = received.iter().map(|r| r.load(Ordering::Relaxed)).sum();
    let expected = sent * subscribers as u64;
    for task in tasks {
        task.abort();
    }
    let mut samples = std::mem::take(&mut *samples.lock().expect("samples"));
    samples.sort_unstable();
    let (cpu_s, rss) = match (before, after) {
        (Some((cpu0, _)), Some((cpu1, rss))) => (cpu1 - cpu0, rss),
        _ => (f64::NAN, 0),
    };
    println!(
        "{{\"scenario\":\"fanout\",\"subscribers\":{subscribers},\"window\":{window},\"seconds\":{publish_elapsed:.2},\
         \"published\":{sent},\"published_per_s\":{:.0},\"delivered\":{delivered},\"delivered_per_s\":{:.0},\
         \"loss\":{},\"latency_ms\":{{\"p50\":{:.2},\"p99\":{:.2},\"p999\":{:.2}}},\"server_cpu_s\":{cpu_s:.2},\
         \"server_cpu_us_per_delivery\":{:.3},\"server_rss_bytes\":{rss}}}",
        sent as f64 / publish_elapsed,
        delivered as f64 / publish_elapsed,
        expected.saturating_sub(delivered),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        percentile(&samples, 0.999),
        cpu_s * 1e6 / delivered.max(1) as f64,
    );
}
