//! Measurements of other processes (/proc) and the one-line JSON report.

use std::fmt::Write;

/// CPU seconds (user + system, all threads) and resident memory of a process.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu_s: f64,
    pub rss_bytes: u64,
}

pub fn usage(pid: u32) -> Option<Usage> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: utime is field 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(Usage { cpu_s: ticks / hz, rss_bytes: rss_kb * 1024 })
}

/// CPU and RSS of each server under test at one moment: several when the subscribers are spread over the nodes of
/// a cluster, since the cluster's cost is what all of them spend together.
#[derive(Clone, Debug)]
pub struct Servers(Vec<Option<Usage>>);

impl Servers {
    pub fn now(pids: &[u32]) -> Servers {
        Servers(pids.iter().map(|&pid| usage(pid)).collect())
    }

    /// The servers added up; None when no PID was given or one could not be read (a sum that silently left out
    /// a node would understate the cost).
    pub fn total(&self) -> Option<Usage> {
        if self.0.is_empty() {
            return None;
        }
        self.0.iter().try_fold(Usage { cpu_s: 0.0, rss_bytes: 0 }, |sum, u| {
            let u = (*u)?;
            Some(Usage { cpu_s: sum.cpu_s + u.cpu_s, rss_bytes: sum.rss_bytes + u.rss_bytes })
        })
    }

    /// CPU seconds each server used since `before` (NaN for one that could not be read).
    pub fn cpu_each_since(&self, before: &Servers) -> Vec<f64> {
        self.0.iter().zip(&before.0).map(|(a, b)| cpu_delta(*b, *a).unwrap_or(f64::NAN)).collect()
    }
}

/// Busy and total jiffies of each core, from /proc/stat (busy: everything but idle and iowait).
#[derive(Clone, Debug, Default)]
pub struct Cores(Vec<(u64, u64)>);

impl Cores {
    pub fn now() -> Cores {
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return Cores::default() };
        let mut cores = Vec::new();
        for line in stat.lines() {
            let Some(rest) = line.strip_prefix("cpu") else { continue };
            if !rest.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            let v: Vec<u64> = rest.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            if v.len() < 5 {
                continue;
            }
            let total: u64 = v.iter().take(8).sum();
            let idle = v[3] + v[4];
            cores.push((total - idle, total));
        }
        Cores(cores)
    }

    /// Busy fraction of each core between two snapshots.
    pub fn busy_since(&self, before: &Cores) -> Vec<f64> {
        self.0
            .iter()
            .zip(&before.0)
            .map(|((b1, t1), (b0, t0))| if t1 > t0 { (b1 - b0) as f64 / (t1 - t0) as f64 } else { f64::NAN })
            .collect()
    }
}

/// `[0.99,0.42]`
pub fn json_list(values: &[f64]) -> String {
    let items: Vec<String> =
        values.iter().map(|v| if v.is_finite() { format!("{v:.3}") } else { "null".into() }).collect();
    format!("[{}]", items.join(","))
}

pub fn cpu_delta(before: Option<Usage>, after: Option<Usage>) -> Option<f64> {
    Some(after?.cpu_s - before?.cpu_s)
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds.
pub fn percentile_ms(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 1000.0)
}

/// A flat JSON object written by hand (the generator has no JSON dependency). Non-finite numbers become null.
#[derive(Default)]
pub struct Json(String);

impl Json {
    pub fn new() -> Json {
        Json(String::from("{"))
    }

    fn key(&mut self, key: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "\"{key}\":");
    }

    pub fn str(mut self, key: &str, value: &str) -> Json {
        self.key(key);
        self.0.push('"');
        for c in value.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        self.0.push('"');
        self
    }

    pub fn int(mut self, key: &str, value: u64) -> Json {
        self.key(key);
        let _ = write!(self.0, "{value}");
        self
    }

    pub fn signed(mut self, key: &str, value: i64) -> Json {
        self.key(key);
        let _ = write!(self.0, "{value}");
        self
    }

    pub fn num(mut self, key: &str, value: f64, decimals: usize) -> Json {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.0, "{value:.decimals$}");
        } else {
            self.0.push_str("null");
        }
        self
    }

    pub fn opt(self, key: &str, value: Option<f64>, decimals: usize) -> Json {
        self.num(key, value.unwrap_or(f64::NAN), decimals)
    }

    pub fn bool(mut self, key: &str, value: bool) -> Json {
        self.key(key);
        self.0.push_str(if value { "true" } else { "false" });
        self
    }

    /// A nested object written verbatim (already JSON).
    pub fn raw(mut self, key: &str, json: &str) -> Json {
        self.key(key);
        self.0.push_str(json);
        self
    }

    pub fn counts<'a>(self, key: &str, items: impl IntoIterator<Item = (&'a String, &'a u64)>) -> Json {
        let mut inner = Json::new();
        for (k, v) in items {
            inner = inner.int(k, *v);
        }
        self.raw(key, &inner.finish())
    }

    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile_ms(&s, 0.5), Some(0.5));
        assert_eq!(percentile_ms(&s, 0.99), Some(0.99));
        assert_eq!(percentile_ms(&s, 0.999), Some(0.999));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }

    #[test]
    fn json() {
        let j = Json::new().str("a", "x\"y").int("b", 2).num("c", f64::NAN, 2).bool("d", true).finish();
        assert_eq!(j, r#"{"a":"x\"y","b":2,"c":null,"d":true}"#);
    }

    #[test]
    fn servers_add_up() {
        let me = std::process::id();
        let one = Servers::now(&[me]).total().expect("own /proc entry");
        let two = Servers::now(&[me, me]).total().expect("own /proc entry");
        // Two reads of the same process: about twice the RSS (not exactly, it may change between the reads).
        assert!(two.rss_bytes > one.rss_bytes * 3 / 2);
        assert!(Servers::now(&[]).total().is_none());
        assert!(Servers::now(&[me, u32::MAX]).total().is_none());
        assert_eq!(Servers::now(&[me, me]).cpu_each_since(&Servers::now(&[me, me])).len(), 2);
    }

    #[test]
    fn usage_of_self() {
        let u = usage(std::process::id()).expect("own /proc entry");
        assert!(u.rss_bytes > 0);
    }
}
