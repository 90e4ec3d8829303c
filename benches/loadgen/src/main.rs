//! fastws load generator: RFC 6455 clients on one tokio thread, one JSON line per measured run on stdout.
//!
//! Scenarios (see `loadgen help`): `fanout`, `latency`, `idle`, `connect`, `subscribe` (the subscriber side of
//! benches/push_bench.py) and `smoke` (every scenario in miniature, with pass/fail checks). Any server speaking
//! the tiny bench protocol works: `subscribe` → a frame containing `"subscribed"`; `publish` → every other
//! subscriber of the channel gets one text frame per publication, in order. Frames are counted by parsing headers
//! only; a latency sample (every Nth message per subscriber) copies the frame's first bytes and finds the send time
//! after `"t":` by a text search. Only loopback targets are accepted, every run is bounded in time, and the process
//! exits when it is done.
//!
//! Several servers (the nodes of one cluster behind one Redis): `--url` takes a comma-separated list, subscribers
//! are assigned to them round robin, and the publisher connects to `--publish-url` (default: the first URL), so a
//! publication reaches the other nodes' subscribers only through the cluster's broker.

mod report;
mod ws;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::{spawn_local, JoinHandle};

use report::{cpu_delta, json_list, percentile_ms, usage, Cores, Json, Servers};
use ws::{After, Frame, Masker, Parser, Target};

/// Slots of the outstanding-message ring: a window may not be larger.
const RING: usize = 1 << 16;
/// Publish payload padding: with the timestamp and sequence number the payload is about 200 bytes.
const PAD: usize = 168;
const READ_BUFFER: usize = 256 * 1024;

thread_local! {
    /// One read buffer for every connection: reads are synchronous between awaits on this single thread.
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0u8; READ_BUFFER]);
}

const HELP: &str = "\
loadgen SCENARIO --url ws://127.0.0.1:PORT/ [options]     (one JSON line per run on stdout)

scenarios
  fanout     S subscribers on one channel; one publisher at maximum rate with at most W messages not yet
             delivered to every subscriber. --subscribers 1000 --window 16 (a list runs each in turn on the same
             connections: --window 4,16,64) --seconds 10 --warmup 1 --sample-every 16
  latency    the same clients, publishing at a fixed rate: --subscribers 1000 --rate 100 --seconds 10
  idle       N connections, each subscribed to one of C channels, held; server RSS before/after; then one
             publication per channel, and every connection must receive it: --connections 10000 --channels 100
             --hold 2
  connect    open, upgrade, close C connections at concurrency K: --connections 20000 --concurrency 200
             (--token JWT appends ?token=)
  subscribe  S subscribers on --channel; print {\"ready\":...} once subscribed, then wait until each got --expect
             messages (or --timeout s) and print the counts (the subscriber side of benches/push_bench.py)
  smoke      every scenario in miniature against one server (it must allow client publish on bench*), in a
             few seconds; exit status 0 when every check passed, 1 when one failed (also: loadgen --smoke)

common options
  --url URL[,URL...]   loopback ws:// URL of the server under test (required); several (the nodes of a cluster):
                       subscribers and connections are spread over them round robin
  --publish-url URL    where the publisher connects (default: the first --url)
  --server-pid PID[,PID...]  read the servers' CPU time and RSS from /proc, summed, and each one when there are
                       several (0 or absent: not reported)
  --src-ips LIST       loopback source addresses, round robin: 127.0.0.1,127.0.0.2 or 127.0.0.1-16
  --concurrency K      connections opened at once during set-up (default 200)
  --channel NAME       channel of fanout/latency/subscribe (default bench)
  --tag TEXT           copied into each JSON line as \"tag\"
  --busy-poll 1        never sleep in epoll_wait: uses the generator's whole core, so only for a generator pinned
                       to a core of its own; a server's writes then never wake it (reported as \"busy_poll\")
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(scenario) = args.first().cloned() else {
        eprint!("{HELP}");
        std::process::exit(2);
    };
    if scenario == "help" || scenario == "--help" || scenario == "-h" {
        print!("{HELP}");
        return;
    }
    // `loadgen --smoke --url ...` is the same as `loadgen smoke --url ...`.
    let scenario = if scenario == "--smoke" { "smoke".to_string() } else { scenario };
    let opts = match Opts::parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => fail(&e),
    };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&runtime, async move {
        match run(&scenario, &opts).await {
            Ok(ok) => i32::from(!ok),
            Err(e) => {
                eprintln!("loadgen {scenario}: {e}");
                2
            }
        }
    });
    // Connections still open close with the process.
    std::process::exit(code);
}

/// With `--busy-poll 1`: a task that is always ready, so the runtime never parks in epoll_wait. Each yield lets
/// the runtime poll epoll with a zero timeout and run what became ready. The generator then uses its whole core,
/// but a server's write never has to wake it from sleep (the wake-up that makes a loopback write cost about twice
/// as much and loopback figures bimodal), so the server's own cost shows alone. Only for a generator on a core of
/// its own (`taskset`): beside an unpinned server it would take CPU the server needs.
async fn spin() {
    loop {
        tokio::task::yield_now().await;
    }
}

fn fail(message: &str) -> ! {
    eprintln!("loadgen: {message}\n\n{HELP}");
    std::process::exit(2);
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

struct Opts {
    values: BTreeMap<String, String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut values = BTreeMap::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let key = arg.strip_prefix("--").ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            let (key, value) = match key.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (key.to_string(), iter.next().ok_or_else(|| format!("--{key} needs a value"))?.clone()),
            };
            values.insert(key, value);
        }
        Ok(Opts { values })
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.values.get(key) {
            Some(v) => v.parse().map_err(|_| format!("--{key}: bad value {v:?}")),
            None => Ok(default),
        }
    }

    fn str(&self, key: &str, default: &str) -> String {
        self.values.get(key).cloned().unwrap_or_else(|| default.to_string())
    }

    fn list<T: std::str::FromStr>(&self, key: &str, default: &str) -> Result<Vec<T>, String> {
        self.str(key, default)
            .split(',')
            .map(|v| v.trim().parse().map_err(|_| format!("--{key}: bad value {v:?}")))
            .collect()
    }

    fn target(&self, url: &str) -> Result<Target, String> {
        let target = Target::parse(url.trim())?;
        Ok(match self.values.get("token") {
            Some(token) => target.with_query(&format!("token={token}")),
            None => target,
        })
    }

    fn src_ips(&self) -> Result<Vec<Option<Ipv4Addr>>, String> {
        let Some(spec) = self.values.get("src-ips") else { return Ok(vec![None]) };
        let mut ips = Vec::new();
        for part in spec.split(',') {
            let part = part.trim();
            if let Some((first, last)) = part.split_once('-') {
                let first: Ipv4Addr = first.parse().map_err(|_| format!("--src-ips: bad address {first:?}"))?;
                let last: u8 = last.parse().map_err(|_| format!("--src-ips: bad range end {last:?}"))?;
                let o = first.octets();
                for x in o[3]..=last {
                    ips.push(Ipv4Addr::new(o[0], o[1], o[2], x));
                }
            } else {
                ips.push(part.parse().map_err(|_| format!("--src-ips: bad address {part:?}"))?);
            }
        }
        if ips.is_empty() || ips.iter().any(|ip| !ip.is_loopback()) {
            return Err("--src-ips must list loopback addresses (127.0.0.0/8)".into());
        }
        Ok(ips.into_iter().map(Some).collect())
    }
}

struct Common {
    /// Subscribers (and idle or connect-scenario connections) go to these round robin: connection i to
    /// `targets[i % len]`.
    targets: Vec<Target>,
    /// `--url` as given, one entry per target, for the per-node counts in the report.
    urls: Vec<String>,
    publish_target: Target,
    publish_url: String,
    srcs: Vec<Option<Ipv4Addr>>,
    /// Processes whose CPU and RSS are reported (summed); empty: not reported.
    server_pids: Vec<u32>,
    concurrency: usize,
    channel: String,
    tag: Option<String>,
    /// `--busy-poll 1`: never sleep in epoll_wait (see [`spin`]).
    busy_poll: bool,
}

impl Common {
    fn new(opts: &Opts) -> Result<Common, String> {
        let url = opts.values.get("url").ok_or("--url is required")?;
        let urls: Vec<String> = url.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
        let targets = urls.iter().map(|u| opts.target(u)).collect::<Result<Vec<_>, _>>()?;
        let Some(first) = urls.first() else { return Err("--url lists no URL".into()) };
        let publish_url = opts.str("publish-url", first);
        let publish_target = opts.target(&publish_url)?;
        let pids: Vec<u32> = opts.list("server-pid", "0")?;
        Ok(Common {
            targets,
            urls,
            publish_target,
            publish_url,
            srcs: opts.src_ips()?,
            server_pids: pids.into_iter().filter(|&pid| pid != 0).collect(),
            concurrency: opts.get("concurrency", 200usize)?.max(1),
            channel: opts.str("channel", "bench"),
            tag: opts.values.get("tag").cloned(),
            busy_poll: opts.get("busy-poll", 0u8)? != 0,
        })
    }

    fn json(&self, scenario: &str) -> Json {
        let mut j = Json::new().str("scenario", scenario);
        if self.busy_poll {
            j = j.bool("busy_poll", true);
        }
        match &self.tag {
            Some(tag) => j.str("tag", tag),
            None => j,
        }
    }

    /// The servers' CPU and RSS now (summed by `Servers::total`).
    fn servers(&self) -> Servers {
        Servers::now(&self.server_pids)
    }

    fn server_usage(&self) -> Option<report::Usage> {
        self.servers().total()
    }

    /// Several servers only (a single one's line keeps its former fields): how many connections each URL got,
    /// and each server's share of the CPU over `elapsed` seconds.
    fn cluster_fields(&self, j: Json, per_target: &[u64], cpu: Option<(&Servers, &Servers, f64)>) -> Json {
        let mut j = j;
        if self.targets.len() > 1 {
            let mut counts = BTreeMap::new();
            for (url, n) in self.urls.iter().zip(per_target) {
                *counts.entry(url.clone()).or_insert(0) += n;
            }
            j = j
                .int("servers", self.targets.len() as u64)
                .counts("subscribed_per_url", &counts)
                .str("publish_url", &self.publish_url);
        }
        if let (true, Some((before, after, elapsed))) = (self.server_pids.len() > 1, cpu) {
            let each: Vec<f64> = after.cpu_each_since(before).iter().map(|c| c / elapsed.max(1e-9)).collect();
            j = j.raw("server_cpu_util_each", &json_list(&each));
        }
        j
    }
}

async fn run(scenario: &str, opts: &Opts) -> Result<bool, String> {
    let common = Common::new(opts)?;
    if common.busy_poll {
        tokio::task::spawn_local(spin());
    }
    match scenario {
        "fanout" => {
            let windows: Vec<u64> = opts.list("window", "16")?;
            let p = FanoutParams {
                subscribers: opts.get("subscribers", 1000)?,
                loads: windows.into_iter().map(Load::Window).collect(),
                seconds: opts.get("seconds", 10.0)?,
                warmup: opts.get("warmup", 1.0)?,
                sample_every: opts.get("sample-every", 16)?,
            };
            fanout(&common, &p).await.map(|_| true)
        }
        "latency" => {
            let rates: Vec<f64> = opts.list("rate", "100")?;
            let p = FanoutParams {
                subscribers: opts.get("subscribers", 1000)?,
                loads: rates.into_iter().map(Load::Rate).collect(),
                seconds: opts.get("seconds", 10.0)?,
                warmup: opts.get("warmup", 0.5)?,
                sample_every: opts.get("sample-every", 1)?,
            };
            fanout(&common, &p).await.map(|_| true)
        }
        "idle" => {
            let p = IdleParams {
                connections: opts.get("connections", 10_000)?,
                channels: opts.get("channels", 100)?,
                hold: opts.get("hold", 2.0)?,
                settle: opts.get("settle", 2.0)?,
            };
            idle(&common, &p).await.map(|_| true)
        }
        "connect" => {
            let p = ConnectParams {
                connections: opts.get("connections", 20_000)?,
                concurrency: opts.get("concurrency", 200)?,
                token: opts.values.contains_key("token"),
            };
            connect_bench(&common, &p).await.map(|_| true)
        }
        "subscribe" => {
            subscribe_mode(&common, opts.get("subscribers", 1000)?, opts.get("expect", 1)?, opts.get("timeout", 60.0)?)
                .await
        }
        "smoke" => smoke(&common).await,
        other => Err(format!("unknown scenario {other:?} (see loadgen help)")),
    }
}

fn emit(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn count(map: &RefCell<BTreeMap<String, u64>>, key: String) {
    *map.borrow_mut().entry(key).or_insert(0) += 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared state of one run (single thread: Cell/RefCell, no atomics).

struct Hub {
    epoch: Instant,
    /// Subscribers that got their `subscribed` reply and are still connected.
    live: Cell<u64>,
    /// Data messages counted (after `subscribed`), over every subscriber.
    delivered: Cell<u64>,
    /// Subscribers that received their first message (the idle scenario's final push).
    first_deliveries: Cell<u64>,
    /// Subscribers that received `expect` messages (subscribe mode).
    expect: u64,
    complete: Cell<u64>,
    last_delivery: Cell<Option<Instant>>,
    first_delivery: Cell<Option<Instant>>,
    /// Outstanding-window bookkeeping: deliveries per sequence number, and the first sequence number not yet
    /// delivered to every live subscriber.
    track: bool,
    ring: RefCell<Vec<u32>>,
    completed: Cell<u64>,
    advanced: Notify,
    ended: Notify,
    sampling: Cell<bool>,
    samples: RefCell<Vec<u32>>,
    /// Close codes received by subscribers, and other ways subscribers ended.
    endings: RefCell<BTreeMap<String, u64>>,
    publisher_errors: Cell<u64>,
}

impl Hub {
    fn new(track: bool, expect: u64) -> Rc<Hub> {
        Rc::new(Hub {
            epoch: Instant::now(),
            live: Cell::new(0),
            delivered: Cell::new(0),
            first_deliveries: Cell::new(0),
            expect,
            complete: Cell::new(0),
            last_delivery: Cell::new(None),
            first_delivery: Cell::new(None),
            track,
            ring: RefCell::new(if track { vec![0; RING] } else { Vec::new() }),
            completed: Cell::new(0),
            advanced: Notify::new(),
            ended: Notify::new(),
            sampling: Cell::new(false),
            samples: RefCell::new(Vec::new()),
            endings: RefCell::new(BTreeMap::new()),
            publisher_errors: Cell::new(0),
        })
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn on_message(&self, index: u64, captured: Option<&[u8]>) {
        self.delivered.set(self.delivered.get() + 1);
        if index == 0 {
            self.first_deliveries.set(self.first_deliveries.get() + 1);
        }
        if self.expect > 0 {
            let now = Instant::now();
            if self.first_delivery.get().is_none() {
                self.first_delivery.set(Some(now));
            }
            self.last_delivery.set(Some(now));
            if index + 1 == self.expect {
                self.complete.set(self.complete.get() + 1);
                self.ended.notify_one();
            }
        }
        if self.track {
            let completed = self.completed.get();
            if index >= completed && index < completed + RING as u64 {
                let full = {
                    let mut ring = self.ring.borrow_mut();
                    let slot = &mut ring[index as usize % RING];
                    *slot += 1;
                    u64::from(*slot) >= self.live.get()
                };
                if full && index == completed {
                    self.advance();
                }
            }
        }
        if let Some(captured) = captured {
            if self.sampling.get() {
                if let Some(sent) = ws::timestamp(captured) {
                    let us = self.now_us().saturating_sub(sent).min(u32::MAX as u64) as u32;
                    self.samples.borrow_mut().push(us);
                }
            }
        }
    }

    /// Move `completed` past every sequence number that every live subscriber has.
    fn advance(&self) {
        let live = self.live.get();
        let mut ring = self.ring.borrow_mut();
        let mut completed = self.completed.get();
        let start = completed;
        while completed < start + RING as u64 && u64::from(ring[completed as usize % RING]) >= live.max(1) {
            ring[completed as usize % RING] = 0;
            completed += 1;
        }
        if completed != start {
            self.completed.set(completed);
            self.advanced.notify_one();
        }
    }

    /// Give up on the oldest outstanding message (a subscriber never got it).
    fn force_advance(&self) {
        let c = self.completed.get();
        self.ring.borrow_mut()[c as usize % RING] = 0;
        self.completed.set(c + 1);
        self.advance();
    }

    fn subscriber_ended(&self, counting: bool, why: String) {
        if counting {
            self.live.set(self.live.get().saturating_sub(1));
            if self.track {
                self.advance();
            }
        }
        count(&self.endings, why);
        self.ended.notify_one();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One subscriber connection.

struct Sub {
    hub: Rc<Hub>,
    ready: Option<oneshot::Sender<Result<(), String>>>,
    counting: bool,
    replies: Vec<u8>,
    closed: Option<u16>,
    masker: Masker,
}

impl Sub {
    fn on_frame(&mut self, f: &Frame<'_>) -> After {
        match f.opcode {
            ws::OP_PING => {
                let payload = f.captured.unwrap_or(&[]).to_vec();
                self.masker.frame(&mut self.replies, 0xA, &payload);
                After::Continue
            }
            ws::OP_CLOSE => {
                self.closed = Some(ws::close_code(f.captured.unwrap_or(&[])));
                After::Continue
            }
            0xA => After::Continue,
            _ if !f.fin => After::Continue,
            _ if self.counting => {
                self.hub.on_message(f.index, f.captured);
                After::Continue
            }
            _ => {
                let text = f.captured.unwrap_or(&[]);
                if ws::find(text, b"\"subscribed\"").is_some() {
                    self.counting = true;
                    self.hub.live.set(self.hub.live.get() + 1);
                    if let Some(tx) = self.ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                    return After::StartCounting;
                }
                if ws::find(text, b"\"error\"").is_some() {
                    if let Some(tx) = self.ready.take() {
                        let _ = tx.send(Err(format!("subscribe refused: {}", String::from_utf8_lossy(text))));
                    }
                }
                After::Continue
            }
        }
    }
}

enum ReadEnd {
    Eof,
    Closed(u16),
    Error(String),
}

/// Read everything the socket has into the shared buffer and feed it to `parser`, until the socket would block.
/// Returns Some when the connection ended. A short read is taken as "drained" (readiness cleared), which saves
/// the extra read that would only return EAGAIN; tokio re-arms on the next edge.
async fn read_some<F: FnMut(&Frame<'_>) -> After>(
    stream: &TcpStream,
    parser: &mut Parser,
    on_frame: &mut F,
) -> Option<ReadEnd> {
    if let Err(e) = stream.readable().await {
        return Some(ReadEnd::Error(e.to_string()));
    }
    loop {
        let mut end: Option<ReadEnd> = None;
        let result = stream.try_io(Interest::READABLE, || {
            BUFFER.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                // SAFETY: reading into a live buffer of the given length from an open socket.
                let n = unsafe { libc::read(stream.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = n as usize;
                if n == 0 {
                    end = Some(ReadEnd::Eof);
                    return Ok(());
                }
                if let Err(e) = parser.feed(&buffer[..n], on_frame) {
                    end = Some(ReadEnd::Error(e));
                    return Ok(());
                }
                if n < buffer.len() {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            })
        });
        if end.is_some() {
            return end;
        }
        match result {
            Ok(()) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(ReadEnd::Error(e.to_string())),
        }
    }
}

async fn subscriber(
    hub: Rc<Hub>,
    mut stream: TcpStream,
    leftover: Vec<u8>,
    channel: String,
    sample_every: u64,
    ready: oneshot::Sender<Result<(), String>>,
    seed: u32,
) {
    let mut sub = Sub {
        hub: Rc::clone(&hub),
        ready: Some(ready),
        counting: false,
        replies: Vec::new(),
        closed: None,
        masker: Masker::new(seed),
    };
    let mut parser = Parser::new(sample_every);
    let mut out = Vec::new();
    sub.masker.frame(
        &mut out,
        ws::OP_TEXT,
        format!(r#"{{"event":"subscribe","data":{{"channel":"{channel}"}}}}"#).as_bytes(),
    );
    let ending = 'conn: {
        if let Err(e) = stream.write_all(&out).await {
            break 'conn ReadEnd::Error(e.to_string());
        }
        if let Err(e) = parser.feed(&leftover, &mut |f| sub.on_frame(f)) {
            break 'conn ReadEnd::Error(e);
        }
        loop {
            let end = read_some(&stream, &mut parser, &mut |f| sub.on_frame(f)).await;
            if !sub.replies.is_empty() {
                let replies = std::mem::take(&mut sub.replies);
                if let Err(e) = stream.write_all(&replies).await {
                    break 'conn ReadEnd::Error(e.to_string());
                }
            }
            if let Some(code) = sub.closed {
                break 'conn ReadEnd::Closed(code);
            }
            if let Some(end) = end {
                break 'conn end;
            }
        }
    };
    let why = match ending {
        ReadEnd::Eof => "eof".to_string(),
        ReadEnd::Closed(code) => format!("close {code}"),
        ReadEnd::Error(e) => format!("error: {e}"),
    };
    if let Some(tx) = sub.ready.take() {
        let _ = tx.send(Err(format!("ended before subscribed: {why}")));
    }
    hub.subscriber_ended(sub.counting, why);
}

struct OpenResult {
    handles: Vec<JoinHandle<()>>,
    failures: BTreeMap<String, u64>,
    /// Subscribed connections per target (per `--url`), in the order given.
    per_target: Vec<u64>,
    seconds: f64,
}

/// Open `n` subscribers, `channel_of(i)` each, with at most `concurrency` set-ups in flight; each is counted once
/// its `subscribed` reply arrived.
async fn open_subscribers(
    hub: &Rc<Hub>,
    common: &Common,
    n: usize,
    channel_of: Rc<dyn Fn(usize) -> String>,
    sample_every: u64,
) -> OpenResult {
    let started = Instant::now();
    let next = Rc::new(Cell::new(0usize));
    let handles = Rc::new(RefCell::new(Vec::with_capacity(n)));
    let failures = Rc::new(RefCell::new(BTreeMap::new()));
    let per_target = Rc::new(RefCell::new(vec![0u64; common.targets.len()]));
    let mut workers = Vec::new();
    let progress_every = (n / 5).max(1000);
    for _ in 0..common.concurrency.min(n.max(1)) {
        let (hub, next, handles, failures, channel_of) =
            (Rc::clone(hub), Rc::clone(&next), Rc::clone(&handles), Rc::clone(&failures), Rc::clone(&channel_of));
        let (targets, srcs, per_target) = (common.targets.clone(), common.srcs.clone(), Rc::clone(&per_target));
        workers.push(spawn_local(async move {
            loop {
                let i = next.get();
                if i >= n {
                    break;
                }
                next.set(i + 1);
                if i > 0 && i % progress_every == 0 {
                    eprintln!("loadgen: {i}/{n} connections");
                }
                let src = srcs[i % srcs.len()];
                // Round robin over the servers: 10,000 on three nodes is 3,334 + 3,333 + 3,333.
                let t = i % targets.len();
                let connected = tokio::time::timeout(Duration::from_secs(15), ws::connect(&targets[t], src)).await;
                let (stream, leftover) = match connected {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        count(&failures, format!("connect: {e}"));
                        continue;
                    }
                    Err(_) => {
                        count(&failures, "connect: timeout".into());
                        continue;
                    }
                };
                let (tx, rx) = oneshot::channel();
                let task = spawn_local(subscriber(
                    Rc::clone(&hub),
                    stream,
                    leftover,
                    channel_of(i),
                    sample_every,
                    tx,
                    i as u32 ^ 0x9e37_79b9,
                ));
                match tokio::time::timeout(Duration::from_secs(15), rx).await {
                    Ok(Ok(Ok(()))) => {
                        handles.borrow_mut().push(task);
                        per_target.borrow_mut()[t] += 1;
                    }
                    Ok(Ok(Err(e))) => {
                        task.abort();
                        count(&failures, e);
                    }
                    _ => {
                        task.abort();
                        count(&failures, "subscribe: timeout".into());
                    }
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    let handles = std::mem::take(&mut *handles.borrow_mut());
    let failures = std::mem::take(&mut *failures.borrow_mut());
    let per_target = std::mem::take(&mut *per_target.borrow_mut());
    OpenResult { handles, failures, per_target, seconds: started.elapsed().as_secs_f64() }
}

/// The publisher: a connection whose replies are read (errors counted) while its write half publishes.
async fn open_publisher(hub: &Rc<Hub>, common: &Common) -> Result<(OwnedWriteHalf, JoinHandle<()>), String> {
    let (stream, leftover) =
        ws::connect(&common.publish_target, common.srcs[0]).await.map_err(|e| format!("publisher: {e}"))?;
    let (read, write) = stream.into_split();
    let hub = Rc::clone(hub);
    let reader = spawn_local(async move {
        let mut parser = Parser::new(0);
        let mut on_frame = |f: &Frame<'_>| {
            if f.opcode == ws::OP_TEXT && f.fin {
                if let Some(text) = f.captured {
                    if ws::find(text, b"\"error\"").is_some() {
                        if hub.publisher_errors.get() == 0 {
                            eprintln!("loadgen: the server answered a publish with {}", String::from_utf8_lossy(text));
                        }
                        hub.publisher_errors.set(hub.publisher_errors.get() + 1);
                    }
                }
            }
            After::Continue
        };
        let _ = parser.feed(&leftover, &mut on_frame);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            if read.readable().await.is_err() {
                break;
            }
            match read.try_read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    if parser.feed(&buffer[..n], &mut on_frame).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        }
    });
    Ok((write, reader))
}

struct Publisher {
    write: OwnedWriteHalf,
    masker: Masker,
    seq: u64,
    buffer: Vec<u8>,
    pad: String,
}

impl Publisher {
    fn new(write: OwnedWriteHalf) -> Publisher {
        Publisher {
            write,
            masker: Masker::new(0x5eed),
            seq: 0,
            buffer: Vec::with_capacity(64 * 1024),
            pad: "x".repeat(PAD),
        }
    }

    /// Publish `count` messages on `channel` in one write, stamped `t` (µs since the generator started).
    async fn publish(&mut self, channel: &str, count: u64, t: u64) -> Result<(), String> {
        self.buffer.clear();
        for _ in 0..count {
            let frame = format!(
                r#"{{"event":"publish","data":{{"channel":"{channel}","payload":{{"t":{t},"seq":{},"pad":"{}"}}}}}}"#,
                self.seq, self.pad
            );
            self.masker.frame(&mut self.buffer, ws::OP_TEXT, frame.as_bytes());
            self.seq += 1;
        }
        self.write.write_all(&self.buffer).await.map_err(|e| format!("publish: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// fanout and latency

/// What the publisher does during one measured run.
#[derive(Clone, Copy)]
enum Load {
    /// Maximum rate, with at most this many messages not yet delivered to every subscriber (fanout).
    Window(u64),
    /// A fixed number of publishes per second (latency).
    Rate(f64),
}

struct FanoutParams {
    subscribers: usize,
    /// One measured run per load, in turn, on the same connections.
    loads: Vec<Load>,
    seconds: f64,
    warmup: f64,
    sample_every: u64,
}

async fn fanout(common: &Common, p: &FanoutParams) -> Result<Vec<String>, String> {
    let hub = Hub::new(true, 0);
    let channel = common.channel.clone();
    let idle_rss = common.server_usage().map(|u| u.rss_bytes);
    let channel_of: Rc<dyn Fn(usize) -> String> = Rc::new(move |_| channel.clone());
    let opened = open_subscribers(&hub, common, p.subscribers, channel_of, p.sample_every).await;
    eprintln!(
        "loadgen: {} subscribers in {:.1} s ({} failed)",
        hub.live.get(),
        opened.seconds,
        opened.failures.values().sum::<u64>()
    );
    if hub.live.get() == 0 {
        return Err(format!("no subscriber could subscribe: {:?}", opened.failures));
    }
    let (write, reader) = open_publisher(&hub, common).await?;
    let mut publisher = Publisher::new(write);
    let mut lines = Vec::new();
    for &load in &p.loads {
        match load {
            Load::Window(w) if w == 0 || w as usize > RING / 2 => {
                return Err(format!("--window must be between 1 and {}", RING / 2))
            }
            Load::Rate(r) if !(r > 0.0 && r <= 1e6) => return Err("--rate must be in (0, 1e6]".into()),
            _ => {}
        }
        // Warm-up at the same load, not measured; then wait until it is all delivered.
        let warm_until = Instant::now() + Duration::from_secs_f64(p.warmup);
        let _ = drive(&hub, &mut publisher, &common.channel, load, warm_until).await?;
        drain(&hub, publisher.seq, Duration::from_secs(10)).await;

        let live = hub.live.get();
        let (d0, s0, c0) = (hub.delivered.get(), publisher.seq, hub.completed.get());
        let (servers0, self0, cores0) = (common.servers(), usage(std::process::id()), Cores::now());
        let server0 = servers0.total();
        hub.samples.borrow_mut().clear();
        hub.sampling.set(true);
        let t0 = Instant::now();
        let stalls =
            drive(&hub, &mut publisher, &common.channel, load, t0 + Duration::from_secs_f64(p.seconds)).await?;
        let elapsed = t0.elapsed().as_secs_f64();
        let (d1, s1) = (hub.delivered.get(), publisher.seq);
        let (servers1, self1, cores1) = (common.servers(), usage(std::process::id()), Cores::now());
        let server1 = servers1.total();
        let drained = drain(&hub, publisher.seq, Duration::from_secs(10)).await;
        let server2 = common.server_usage();
        hub.sampling.set(false);
        let d2 = hub.delivered.get();
        let mut samples = std::mem::take(&mut *hub.samples.borrow_mut());
        samples.sort_unstable();
        let published = s1 - s0;
        let deliveries = d2 - d0;
        let expected = published * live;
        let cpu_total = cpu_delta(server0, server2);
        let scenario = if matches!(load, Load::Rate(_)) { "latency" } else { "fanout" };
        let mut j = common
            .json(scenario)
            .int("subscribers", live)
            .int("subscribers_requested", p.subscribers as u64)
            .counts("subscribe_failures", &opened.failures)
            .num("connect_seconds", opened.seconds, 2);
        j = match load {
            Load::Rate(rate) => j.num("rate", rate, 1),
            Load::Window(window) => j.int("window", window),
        };
        j = j
            .num("seconds", elapsed, 3)
            .int("published", published)
            // Every publication of this connection so far, warm-ups included: what a broker behind the server saw.
            .int("published_total", publisher.seq)
            .num("published_per_s", published as f64 / elapsed, 1)
            .int("delivered", deliveries)
            .num("delivered_per_s", (d1 - d0) as f64 / elapsed, 0)
            .int("expected", expected)
            .signed("loss", expected as i64 - deliveries as i64)
            .num("loss_ratio", (expected as f64 - deliveries as f64) / (expected.max(1) as f64), 6)
            .bool("drained", drained)
            .int("stalls", stalls)
            .int("unfinished_messages", s1.saturating_sub(hub.completed.get()).min(s1 - c0))
            .int("latency_samples", samples.len() as u64)
            .raw(
                "latency_ms",
                &Json::new()
                    .opt("p50", percentile_ms(&samples, 0.50), 3)
                    .opt("p99", percentile_ms(&samples, 0.99), 3)
                    .opt("p999", percentile_ms(&samples, 0.999), 3)
                    .opt("max", samples.last().map(|&v| v as f64 / 1000.0), 3)
                    .finish(),
            )
            .opt("server_cpu_s", cpu_total, 3)
            .opt("server_cpu_util", cpu_delta(server0, server1).map(|c| c / elapsed), 3)
            .opt("server_cpu_us_per_delivery", cpu_total.map(|c| c * 1e6 / deliveries.max(1) as f64), 4)
            .opt("server_rss_bytes", server2.map(|u| u.rss_bytes as f64), 0)
            .opt("server_rss_before_connect_bytes", idle_rss.map(|v| v as f64), 0)
            .opt("generator_cpu_util", cpu_delta(self0, self1).map(|c| c / elapsed), 3)
            .raw("cores_busy", &json_list(&cores1.busy_since(&cores0)))
            .opt("unattributed_cpu_util", unattributed(&cores0, &cores1, server0, server1, self0, self1, elapsed), 3)
            .int("subscribers_lost", live.saturating_sub(hub.live.get()))
            .counts("subscriber_endings", &*hub.endings.borrow())
            .int("publisher_errors", hub.publisher_errors.get());
        let j = common.cluster_fields(j, &opened.per_target, Some((&servers0, &servers1, elapsed)));
        let line = j.finish();
        emit(line.clone());
        lines.push(line);
    }
    reader.abort();
    for h in opened.handles {
        h.abort();
    }
    Ok(lines)
}

/// CPU (in cores) that was busy during the interval but not spent by the server or the generator: the kernel's
/// deferred network work (softirq threads) plus any other process on the machine. High values mean a noisy run.
fn unattributed(
    cores0: &Cores,
    cores1: &Cores,
    server0: Option<report::Usage>,
    server1: Option<report::Usage>,
    self0: Option<report::Usage>,
    self1: Option<report::Usage>,
    elapsed: f64,
) -> Option<f64> {
    let busy: f64 = cores1.busy_since(cores0).iter().sum();
    let ours = cpu_delta(server0, server1)? + cpu_delta(self0, self1)?;
    Some((busy - ours / elapsed.max(1e-9)).max(0.0))
}

/// Publish until `until`: with a fixed rate, one message per tick; otherwise as fast as the window allows (each
/// write carries every message the window has room for). Returns how many times a full window had to be forced
/// open because a message never reached every subscriber within 3 s.
async fn drive(
    hub: &Rc<Hub>,
    publisher: &mut Publisher,
    channel: &str,
    load: Load,
    until: Instant,
) -> Result<u64, String> {
    let mut stalls = 0;
    let window = match load {
        Load::Window(w) => w,
        Load::Rate(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let mut next = Instant::now();
            while next < until {
                tokio::time::sleep_until(next.into()).await;
                publisher.publish(channel, 1, hub.now_us()).await?;
                next += interval;
            }
            return Ok(0);
        }
    };
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(stalls);
        }
        let outstanding = publisher.seq - hub.completed.get();
        if outstanding >= window {
            let wait_until = (now + Duration::from_secs(3)).min(until);
            let woke = tokio::time::timeout_at(wait_until.into(), hub.advanced.notified()).await.is_ok();
            if !woke && Instant::now() < until && publisher.seq - hub.completed.get() >= window {
                stalls += 1;
                hub.force_advance();
            }
            continue;
        }
        publisher.publish(channel, window - outstanding, hub.now_us()).await?;
    }
}

/// Wait until every message published so far reached every live subscriber, or `limit` passed.
async fn drain(hub: &Rc<Hub>, published: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while hub.completed.get() < published {
        if hub.live.get() == 0 || Instant::now() >= deadline {
            return false;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), hub.advanced.notified()).await;
    }
    true
}

// ---------------------------------------------------------------------------------------------------------------
// idle

struct IdleParams {
    connections: usize,
    channels: usize,
    hold: f64,
    settle: f64,
}

async fn idle(common: &Common, p: &IdleParams) -> Result<String, String> {
    let hub = Hub::new(false, 0);
    let before = common.server_usage();
    let channels = p.channels.max(1);
    let prefix = common.channel.clone();
    let channel_of: Rc<dyn Fn(usize) -> String> = Rc::new(move |i| format!("{prefix}.idle.{}", i % channels));
    let opened = open_subscribers(&hub, common, p.connections, Rc::clone(&channel_of), 0).await;
    let connected = hub.live.get();
    eprintln!("loadgen: {connected} idle connections in {:.1} s", opened.seconds);
    tokio::time::sleep(Duration::from_secs_f64(p.settle)).await;
    let after = common.server_usage();
    let cpu_hold0 = common.server_usage();
    tokio::time::sleep(Duration::from_secs_f64(p.hold)).await;
    let cpu_hold1 = common.server_usage();
    let still_connected = hub.live.get();
    // One publication per channel: every idle connection must get exactly one frame.
    let push_started = Instant::now();
    let (write, reader) = open_publisher(&hub, common).await?;
    let mut publisher = Publisher::new(write);
    for c in 0..channels {
        publisher.publish(&channel_of(c), 1, hub.now_us()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while hub.first_deliveries.get() < hub.live.get() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let push_seconds = push_started.elapsed().as_secs_f64();
    let answered = hub.first_deliveries.get();
    let rss_delta = match (before, after) {
        (Some(b), Some(a)) => Some(a.rss_bytes as f64 - b.rss_bytes as f64),
        _ => None,
    };
    let j = common
        .json("idle")
        .int("connections_requested", p.connections as u64)
        .int("connections", connected)
        .counts("connect_failures", &opened.failures)
        .num("connect_seconds", opened.seconds, 2)
        .num("connects_per_s", connected as f64 / opened.seconds.max(1e-9), 0)
        .int("channels", channels as u64)
        .opt("server_rss_before_bytes", before.map(|u| u.rss_bytes as f64), 0)
        .opt("server_rss_after_bytes", after.map(|u| u.rss_bytes as f64), 0)
        .opt("bytes_per_connection", rss_delta.map(|d| d / connected.max(1) as f64), 0)
        .opt("server_cpu_util_idle", cpu_delta(cpu_hold0, cpu_hold1).map(|c| c / p.hold.max(1e-9)), 4)
        .int("still_connected_before_push", still_connected)
        .int("answered_push", answered)
        .int("missed_push", still_connected.saturating_sub(answered))
        .num("push_seconds", push_seconds, 3)
        .int("publisher_errors", hub.publisher_errors.get())
        .counts("subscriber_endings", &*hub.endings.borrow());
    let line = common.cluster_fields(j, &opened.per_target, None).finish();
    emit(line.clone());
    reader.abort();
    for h in opened.handles {
        h.abort();
    }
    Ok(line)
}

// ---------------------------------------------------------------------------------------------------------------
// connect

struct ConnectParams {
    connections: usize,
    concurrency: usize,
    token: bool,
}

async fn connect_bench(common: &Common, p: &ConnectParams) -> Result<String, String> {
    let (before, self0, cores0) = (common.server_usage(), usage(std::process::id()), Cores::now());
    let started = Instant::now();
    let next = Rc::new(Cell::new(0usize));
    let ok = Rc::new(Cell::new(0u64));
    let clean_closes = Rc::new(Cell::new(0u64));
    let failures = Rc::new(RefCell::new(BTreeMap::new()));
    let latencies = Rc::new(RefCell::new(Vec::with_capacity(p.connections)));
    let mut workers = Vec::new();
    for w in 0..p.concurrency.clamp(1, p.connections.max(1)) {
        let (next, ok, clean, failures, latencies) =
            (Rc::clone(&next), Rc::clone(&ok), Rc::clone(&clean_closes), Rc::clone(&failures), Rc::clone(&latencies));
        let (targets, srcs, n) = (common.targets.clone(), common.srcs.clone(), p.connections);
        workers.push(spawn_local(async move {
            let mut masker = Masker::new(w as u32 + 1);
            loop {
                let i = next.get();
                if i >= n {
                    break;
                }
                next.set(i + 1);
                let t = Instant::now();
                let (mut stream, leftover) = match tokio::time::timeout(
                    Duration::from_secs(10),
                    ws::connect(&targets[i % targets.len()], srcs[i % srcs.len()]),
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        count(&failures, e.to_string());
                        continue;
                    }
                    Err(_) => {
                        count(&failures, "timeout".into());
                        continue;
                    }
                };
                latencies.borrow_mut().push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                ok.set(ok.get() + 1);
                // Close properly: send a close frame, wait (briefly) for the server's.
                let mut out = Vec::new();
                masker.frame(&mut out, ws::OP_CLOSE, &1000u16.to_be_bytes());
                if stream.write_all(&out).await.is_err() {
                    continue;
                }
                let mut parser = Parser::new(0);
                let closed = Cell::new(false);
                let mut on_frame = |f: &Frame<'_>| {
                    if f.opcode == ws::OP_CLOSE {
                        closed.set(true);
                    }
                    After::Continue
                };
                let _ = parser.feed(&leftover, &mut on_frame);
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while !closed.get() {
                        if read_some(&stream, &mut parser, &mut on_frame).await.is_some() {
                            break;
                        }
                    }
                })
                .await;
                if closed.get() {
                    clean.set(clean.get() + 1);
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (after, self1, cores1) = (common.server_usage(), usage(std::process::id()), Cores::now());
    let mut latencies = std::mem::take(&mut *latencies.borrow_mut());
    latencies.sort_unstable();
    let handshakes = ok.get();
    let cpu = cpu_delta(before, after);
    let line = common
        .json("connect")
        .bool("jwt", p.token)
        .int("connections", p.connections as u64)
        .int("concurrency", p.concurrency as u64)
        .int("handshakes", handshakes)
        .counts("failures", &*failures.borrow())
        .int("clean_closes", clean_closes.get())
        .num("seconds", elapsed, 3)
        .num("handshakes_per_s", handshakes as f64 / elapsed, 0)
        .raw(
            "handshake_ms",
            &Json::new()
                .opt("p50", percentile_ms(&latencies, 0.5), 3)
                .opt("p99", percentile_ms(&latencies, 0.99), 3)
                .finish(),
        )
        .opt("server_cpu_s", cpu, 3)
        .opt("server_cpu_us_per_handshake", cpu.map(|c| c * 1e6 / handshakes.max(1) as f64), 2)
        .opt("server_rss_bytes", after.map(|u| u.rss_bytes as f64), 0)
        .opt("server_cpu_util", cpu.map(|c| c / elapsed), 3)
        .opt("generator_cpu_util", cpu_delta(self0, self1).map(|c| c / elapsed), 3)
        .raw("cores_busy", &json_list(&cores1.busy_since(&cores0)))
        .opt("unattributed_cpu_util", unattributed(&cores0, &cores1, before, after, self0, self1, elapsed), 3)
        .finish();
    emit(line.clone());
    Ok(line)
}

// ---------------------------------------------------------------------------------------------------------------
// subscribe (the subscriber side of push_bench.py)

async fn subscribe_mode(common: &Common, subscribers: usize, expect: u64, timeout: f64) -> Result<bool, String> {
    let hub = Hub::new(false, expect.max(1));
    let channel = common.channel.clone();
    let channel_of: Rc<dyn Fn(usize) -> String> = Rc::new(move |_| channel.clone());
    let opened = open_subscribers(&hub, common, subscribers, channel_of, 0).await;
    let live = hub.live.get();
    emit(
        common
            .json("subscribe")
            .bool("ready", true)
            .int("subscribers", live)
            .counts("failures", &opened.failures)
            .finish(),
    );
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    while hub.complete.get() < hub.live.get() && Instant::now() < deadline {
        let _ = tokio::time::timeout_at(deadline.into(), hub.ended.notified()).await;
    }
    let delivered = hub.delivered.get();
    let span = match (hub.first_delivery.get(), hub.last_delivery.get()) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let all = hub.complete.get() == live && live == subscribers as u64;
    emit(
        common
            .json("subscribe")
            .bool("ready", false)
            .int("subscribers", live)
            .int("expect_per_subscriber", expect)
            .int("delivered", delivered)
            .int("expected", expect * live)
            .int("complete_subscribers", hub.complete.get())
            .bool("all_delivered", all)
            .num("delivery_span_seconds", span, 4)
            .num("delivered_per_s", if span > 0.0 { delivered as f64 / span } else { f64::NAN }, 0)
            .counts("subscriber_endings", &*hub.endings.borrow())
            .finish(),
    );
    for h in opened.handles {
        h.abort();
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------------------------------
// smoke: every scenario in miniature, with checks

async fn smoke(common: &Common) -> Result<bool, String> {
    let mut ok = true;
    let mut check = |name: &str, pass: bool, line: &str| {
        if !pass {
            eprintln!("loadgen smoke: FAILED {name}: {line}");
            ok = false;
        }
    };
    let fan = fanout(
        common,
        &FanoutParams { subscribers: 20, loads: vec![Load::Window(4)], seconds: 0.5, warmup: 0.1, sample_every: 4 },
    )
    .await?;
    let line = &fan[0];
    check("fanout delivers everything", line.contains("\"loss\":0,") && line.contains("\"drained\":true"), line);
    check("fanout publishes", !line.contains("\"published\":0,"), line);
    let lat = fanout(
        common,
        &FanoutParams { subscribers: 10, loads: vec![Load::Rate(50.0)], seconds: 0.5, warmup: 0.1, sample_every: 1 },
    )
    .await?;
    check("latency delivers everything", lat[0].contains("\"loss\":0,"), &lat[0]);
    let idle_line = idle(common, &IdleParams { connections: 50, channels: 5, hold: 0.1, settle: 0.1 }).await?;
    check(
        "idle connections answer the push",
        idle_line.contains("\"connections\":50,") && idle_line.contains("\"missed_push\":0,"),
        &idle_line,
    );
    let conn = connect_bench(common, &ConnectParams { connections: 200, concurrency: 20, token: false }).await?;
    check("connect handshakes", conn.contains("\"handshakes\":200,"), &conn);
    emit(Json::new().str("scenario", "smoke").bool("ok", ok).finish());
    Ok(ok)
}
