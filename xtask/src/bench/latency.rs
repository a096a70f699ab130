//! The open-loop load generator for latency at a fixed request rate. It runs inside the client
//! pod (`xtask-bench load`, started by the harness in the pod's netns and cgroup, so the mesh
//! captures it like any app) and prints a [`LoadReport`] as JSON.
//!
//! Requests are sent on a fixed schedule whatever the responses do (open loop): request `i` is
//! due at `start + i / rate`, on connection `i % conns`, pipelined. Each latency is measured from
//! the request's *intended* send time, not from when it was actually written, so a stall in the
//! path (or in the generator) is charged to every request it delayed: no coordinated omission.
//! A run whose sending could not keep the rate (±2 %) is reported so, and the harness discards
//! it rather than report latencies of a lighter load.
//!
//! Every request is 1 KiB by default; the server is pod-app's echo, so the response is the same
//! bytes, checked: the request's number in the first 8 bytes, then a fixed filler.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// How far the achieved rate may be from the target before the run is discarded.
pub const RATE_TOLERANCE: f64 = 0.02;

/// What one load run is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct LoadSpec {
    pub to: SocketAddr,
    /// Requests per second, over all connections.
    pub rate: u32,
    pub conns: u32,
    pub duration: Duration,
    /// Request (and response) size in bytes, at least 8.
    pub size: usize,
}

/// What `xtask-bench load` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub target_rps: u32,
    pub achieved_rps: f64,
    pub conns: u32,
    pub size: usize,
    /// Requests sent, and responses received and verified (all of them, or the run fails).
    pub sent: u64,
    pub completed: u64,
    /// Latency percentiles from each request's intended send time, in microseconds.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// How late the generator itself wrote requests (p99), for judging a discarded run.
    pub send_lag_p99_us: f64,
}

impl LoadReport {
    /// Returns why the run cannot be trusted as a run at its target rate, if it cannot.
    pub fn rate_miss(&self) -> Option<String> {
        let target = f64::from(self.target_rps);
        let off = (self.achieved_rps - target) / target;
        (off.abs() > RATE_TOLERANCE).then(|| {
            format!(
                "achieved {:.0} req/s of {} ({:+.1} %, more than ±{:.0} %)",
                self.achieved_rps,
                self.target_rps,
                off * 100.0,
                RATE_TOLERANCE * 100.0
            )
        })
    }
}

/// Returns when request `i` is due, after the start, at `rate` requests per second.
pub fn intended_offset(i: u64, rate: u32) -> Duration {
    let ns = u128::from(i) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// Returns the latency of a response that arrived `arrived` after the start to request `i`,
/// measured from the request's intended send time (coordinated-omission corrected).
pub fn corrected_latency(i: u64, rate: u32, arrived: Duration) -> Duration {
    arrived.saturating_sub(intended_offset(i, rate))
}

/// Returns the achieved rate: `sent` requests whose last one was written `last_sent` after the
/// start. One period is added, as `n` requests on schedule span `n - 1` periods.
pub fn achieved_rate(sent: u64, rate: u32, last_sent: Duration) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    let span = last_sent.as_secs_f64() + 1.0 / f64::from(rate.max(1));
    sent as f64 / span
}

/// Returns how many requests a run sends: the rate over the duration.
pub fn request_count(rate: u32, duration: Duration) -> u64 {
    (f64::from(rate) * duration.as_secs_f64()).round() as u64
}

/// Writes request `k` of a connection into `buf`: its number, then a fixed filler.
fn fill_request(buf: &mut [u8], k: u64) {
    buf[..8].copy_from_slice(&k.to_le_bytes());
    for (j, b) in buf[8..].iter_mut().enumerate() {
        *b = (j as u8).wrapping_mul(31).wrapping_add(7);
    }
}

/// Opens a connection to pod-app's echo server and reads its `PEER` greeting.
fn open(to: SocketAddr) -> anyhow::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream =
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).with_context(|| format!("connect {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line).with_context(|| format!("reading the greeting of {to}"))?;
    anyhow::ensure!(line.starts_with("PEER "), "{to} is not pod-app's echo server: {line:?}");
    Ok((stream, reader))
}

/// Lets this thread's sleeps end within microseconds rather than the default 50 µs slack.
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Runs the load and returns its report; fails if any response is missing or wrong.
pub fn run(spec: LoadSpec) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(spec.size >= 8 && spec.conns > 0 && spec.rate > 0, "bad load spec {spec:?}");
    let total = request_count(spec.rate, spec.duration);
    let conns = u64::from(spec.conns);
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..spec.conns {
        let (writer, reader) = open(spec.to)?;
        writers.push(writer);
        readers.push(reader);
    }
    // Time for the reader threads to start before the first request is due.
    let start = Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(c, mut reader)| {
            let (size, rate) = (spec.size, spec.rate);
            std::thread::spawn(move || -> anyhow::Result<Histogram> {
                let mut histogram = Histogram::default();
                let (mut got, mut want) = (vec![0u8; size], vec![0u8; size]);
                let mine = total / conns + u64::from((c as u64) < total % conns);
                for k in 0..mine {
                    reader.read_exact(&mut got).with_context(|| format!("response {k} on connection {c}"))?;
                    let arrived = start.elapsed();
                    fill_request(&mut want, k);
                    if got != want {
                        bail!("response {k} on connection {c} is not what was sent");
                    }
                    histogram.record(corrected_latency(k * conns + c as u64, rate, arrived));
                }
                Ok(histogram)
            })
        })
        .collect();

    tighten_timer_slack();
    let mut request = vec![0u8; spec.size];
    let mut lag = Histogram::default();
    let mut sent_per_conn = vec![0u64; writers.len()];
    let mut last_sent = Duration::ZERO;
    let mut send_error = None;
    for i in 0..total {
        let due = start + intended_offset(i, spec.rate);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        let c = (i % conns) as usize;
        fill_request(&mut request, sent_per_conn[c]);
        lag.record(Instant::now().saturating_duration_since(due));
        if let Err(err) = writers[c].write_all(&request) {
            send_error =
                Some(anyhow::Error::new(err).context(format!("sending request {i} on connection {c}")));
            break;
        }
        sent_per_conn[c] += 1;
        last_sent = start.elapsed();
    }
    let sent: u64 = sent_per_conn.iter().sum();
    if let Some(err) = send_error {
        // Unblock the readers waiting for responses that will not come.
        for w in &writers {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        for h in handles {
            let _ = h.join();
        }
        return Err(err);
    }
    let mut histogram = Histogram::default();
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(part)) => histogram.merge(&part),
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("a response reader panicked"));
            }
        }
    }
    if let Some(err) = first_error {
        return Err(err.context(format!("{} of {sent} responses verified", histogram.len())));
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Ok(LoadReport {
        target_rps: spec.rate,
        achieved_rps: achieved_rate(sent, spec.rate, last_sent),
        conns: spec.conns,
        size: spec.size,
        sent,
        completed: histogram.len(),
        p50_us: us(histogram.percentile(50.0)),
        p90_us: us(histogram.percentile(90.0)),
        p99_us: us(histogram.percentile(99.0)),
        p999_us: us(histogram.percentile(99.9)),
        max_us: us(histogram.max()),
        send_lag_p99_us: us(lag.percentile(99.0)),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{LoadReport, achieved_rate, corrected_latency, intended_offset, request_count};

    #[test]
    fn the_schedule_is_fixed_by_the_rate() {
        assert_eq!(intended_offset(0, 1000), Duration::ZERO);
        assert_eq!(intended_offset(1, 1000), Duration::from_millis(1));
        assert_eq!(intended_offset(5000, 5000), Duration::from_secs(1));
        assert_eq!(intended_offset(3, 3), Duration::from_secs(1));
        assert_eq!(request_count(5000, Duration::from_millis(1500)), 7500);
    }

    #[test]
    fn latency_counts_from_the_intended_send_time() {
        // At 1,000 req/s a 100 ms stall holds back 100 requests. A closed-loop measurement
        // would record one slow request; measured from the intended send time, request 10 (due
        // at 10 ms, answered at 110 ms) waited 100 ms and request 99 (due at 99 ms) 11 ms.
        assert_eq!(corrected_latency(10, 1000, Duration::from_millis(110)), Duration::from_millis(100));
        assert_eq!(corrected_latency(99, 1000, Duration::from_millis(110)), Duration::from_millis(11));
        assert_eq!(corrected_latency(5, 1000, Duration::from_millis(1)), Duration::ZERO, "never negative");
    }

    #[test]
    fn a_generator_that_falls_behind_misses_the_rate() {
        // 10,000 requests at 1,000/s, on time: the last one leaves at 9.999 s.
        let on_time = achieved_rate(10_000, 1000, Duration::from_millis(9_999));
        assert!((on_time - 1000.0).abs() < 1e-6, "{on_time}");
        let report = |achieved_rps| LoadReport { target_rps: 1000, achieved_rps, ..LoadReport::default() };
        assert_eq!(report(on_time).rate_miss(), None);
        assert_eq!(report(985.0).rate_miss(), None, "within 2 %");
        // Half a second behind by the end: 10,000 requests over 10.5 s.
        let late = achieved_rate(10_000, 1000, Duration::from_millis(10_499));
        let miss = report(late).rate_miss().expect("discarded");
        assert!(miss.contains("achieved 952 req/s of 1000 (-4.8 %"), "{miss}");
        assert_eq!(achieved_rate(0, 1000, Duration::ZERO), 0.0);
    }
}
