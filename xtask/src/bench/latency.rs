//! The open-loop load generator for latency at a fixed request rate. It runs inside the client
//! pod (`xtask-bench load`, started by the harness in the pod's netns and cgroup, so the mesh
//! captures it like any app) and prints a [`LoadReport`] as JSON.
//!
//! Requests are sent on a fixed schedule whatever the responses do (open loop): request `i` is
//! due at `start + i / rate`, on connection `i % conns`, pipelined. Each latency is measured from
//! the request's *intended* send time, not from when it was actually written, so a stall in the
//! path (or in the generator) is charged to every request it delayed: no coordinated omission.
//! A run whose sending could not keep the rate (±2 %), or whose responses stopped coming, is
//! reported so, and the harness discards it rather than report latencies of a lighter load.
//!
//! Two wires. **Raw**: every request is 1 KiB by default and the server is pod-app's echo, so the
//! response is the same bytes. **HTTP/1.1** (`--http-path`): every request is a keep-alive
//! `POST` whose body is those bytes, to the bench's HTTP echo ([`super::http`]), which answers
//! `200` with the same body. Either way every response is checked: the request's number on its
//! connection in the first 8 bytes, then a fixed filler. An HTTP status other than 200 is
//! counted and reported (a 403 from the destination's policy is the first thing the harness
//! looks for), not fatal here.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{histogram::Histogram, http};

/// How far the achieved rate may be from the target before the run is discarded.
pub const RATE_TOLERANCE: f64 = 0.02;
/// A run whose last response came this long after the last request was due did not keep up.
const SATURATED_AFTER: Duration = Duration::from_secs(1);
/// A connection on which nothing moves for this long has stalled (the run is then discarded).
const STALL: Duration = Duration::from_secs(10);
/// Responses still missing this long after the last request was due are not waited for.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// What one load run is asked to do.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub to: SocketAddr,
    /// Requests per second, over all connections.
    pub rate: u32,
    pub conns: u32,
    pub duration: Duration,
    /// Request (and response) size in bytes, at least 8: the whole message on the raw wire, the
    /// body over HTTP.
    pub size: usize,
    /// `Some(path)`: HTTP/1.1 `POST`s to this path instead of raw bytes.
    pub http_path: Option<String>,
}

/// What `xtask-bench load` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub target_rps: u32,
    pub achieved_rps: f64,
    pub conns: u32,
    pub size: usize,
    /// Requests sent, and responses received and verified (all of them, unless the run stalled).
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
    /// From the last request's intended send time to the last response: a few milliseconds on
    /// a path that keeps up, seconds on one that queues (see [`LoadReport::saturated`]).
    #[serde(default)]
    pub drain_us: f64,
    /// HTTP only: responses per status code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub statuses: BTreeMap<u16, u64>,
    /// HTTP only: the first response that was not `200`, status and the start of its body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unexpected: Option<String>,
    /// Why sending or receiving stopped before the end, if it did (an overloaded path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
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

    /// Returns how the path fell behind, if the last response came more than a second after
    /// the last request was due: the server side could not answer at this rate and requests
    /// queued. The run is kept (its latencies are what callers would see) but is no latency of
    /// a path that keeps up.
    pub fn saturated(&self) -> Option<String> {
        let drain = Duration::from_secs_f64(self.drain_us.max(0.0) / 1e6);
        (drain > SATURATED_AFTER).then(|| {
            format!(
                "saturated: the last response came {:.1} s after the last request was due (answered ~{:.0} req/s \
                 of {})",
                drain.as_secs_f64(),
                self.answered_rps(),
                self.target_rps
            )
        })
    }

    /// Returns the rate responses came at: completed over the time from the start to the last
    /// response (the schedule's span plus the drain).
    pub fn answered_rps(&self) -> f64 {
        let span = self.completed as f64 / f64::from(self.target_rps.max(1)) + self.drain_us / 1e6;
        if span > 0.0 { self.completed as f64 / span } else { 0.0 }
    }

    /// Returns a response status other than 200, with how many and the first one's body, if
    /// any came (HTTP only).
    pub fn wrong_status(&self) -> Option<String> {
        let wrong: Vec<String> =
            self.statuses.iter().filter(|(s, _)| **s != 200).map(|(s, n)| format!("{n} × {s}")).collect();
        (!wrong.is_empty()).then(|| {
            format!(
                "responses other than 200: {} of {} (first: {}){}",
                wrong.join(", "),
                self.completed,
                self.unexpected.as_deref().unwrap_or("?"),
                if self.statuses.contains_key(&403) {
                    "; a 403 is the destination refusing the bench's own requests: the bench's policy is wrong"
                } else {
                    ""
                }
            )
        })
    }

    /// Returns why the run is discarded, if it is: it stalled or lost responses, an HTTP
    /// response was not 200, or the rate was missed (in that order).
    pub fn discard_reason(&self) -> Option<String> {
        if let Some(why) = &self.stalled {
            return Some(format!("{why} ({} of {} responses arrived)", self.completed, self.sent));
        }
        if self.sent == 0 || self.completed != self.sent {
            return Some(format!("{} of {} responses arrived", self.completed, self.sent));
        }
        self.wrong_status().or_else(|| self.rate_miss())
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

/// Opens a connection: to pod-app's echo server (reading its `PEER` greeting) on the raw wire,
/// or to an HTTP server.
fn open(to: SocketAddr, http: bool) -> anyhow::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream =
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).with_context(|| format!("connect {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STALL))?;
    stream.set_write_timeout(Some(STALL))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    if !http {
        let mut line = String::new();
        reader.read_line(&mut line).with_context(|| format!("reading the greeting of {to}"))?;
        anyhow::ensure!(line.starts_with("PEER "), "{to} is not pod-app's echo server: {line:?}");
    }
    Ok((stream, reader))
}

/// Returns whether an error is a socket timeout (`SO_RCVTIMEO` / `SO_SNDTIMEO` ran out).
fn is_timeout(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        })
    })
}

/// Lets this thread's sleeps end within microseconds rather than the default 50 µs slack.
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// What one connection's reader saw.
#[derive(Default)]
struct Received {
    latencies: Histogram,
    /// When the last response arrived, from the start.
    last: Duration,
    statuses: BTreeMap<u16, u64>,
    unexpected: Option<String>,
    stalled: Option<String>,
}

/// What every reader shares: the run, its schedule, and the flag saying sending stopped early.
struct Shared<'a> {
    spec: &'a LoadSpec,
    start: Instant,
    conns: u64,
    /// When readers stop waiting ([`DRAIN_LIMIT`] after the last request was due).
    deadline: Instant,
    stop: AtomicBool,
}

/// Reads connection `c`'s `expected` responses, checking each, until done, stalled or stopped.
fn receive(
    mut reader: BufReader<TcpStream>,
    c: usize,
    expected: u64,
    shared: &Shared<'_>,
) -> anyhow::Result<Received> {
    let Shared { spec, start, conns, deadline, ref stop } = *shared;
    let mut received = Received::default();
    let (mut got, mut want) = (vec![0u8; spec.size], vec![0u8; spec.size]);
    for k in 0..expected {
        let status = match &spec.http_path {
            None => reader.read_exact(&mut got).map(|()| 200).map_err(anyhow::Error::from),
            Some(_) => http::read_response(&mut reader, &mut got),
        };
        let status = match status {
            Ok(status) => status,
            Err(err) if is_timeout(&err) => {
                received.stalled = Some(format!("no response for {}s on connection {c}", STALL.as_secs()));
                break;
            }
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(err) => return Err(err.context(format!("response {k} on connection {c}"))),
        };
        let arrived = start.elapsed();
        if spec.http_path.is_some() {
            *received.statuses.entry(status).or_default() += 1;
        }
        if status == 200 {
            fill_request(&mut want, k);
            if got != want {
                bail!("response {k} on connection {c} is not what was sent ({} bytes)", got.len());
            }
        } else if received.unexpected.is_none() {
            let text = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
            received.unexpected = Some(format!("{status} {text:?}"));
        }
        received.latencies.record(corrected_latency(k * conns + c as u64, spec.rate, arrived));
        received.last = arrived;
        if Instant::now() > deadline {
            received.stalled = Some(format!(
                "responses still missing {}s after the last request was due",
                DRAIN_LIMIT.as_secs()
            ));
            break;
        }
    }
    Ok(received)
}

/// Runs the load and returns its report; fails if a response is malformed or not what was
/// sent. A stall (nothing moving for 10 s, or responses still missing 30 s after the last
/// request was due) ends the run early and is reported, not fatal: the harness discards it.
pub fn run(spec: LoadSpec) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(spec.size >= 8 && spec.conns > 0 && spec.rate > 0, "bad load spec {spec:?}");
    let total = request_count(spec.rate, spec.duration);
    let conns = u64::from(spec.conns);
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..spec.conns {
        let (writer, reader) = open(spec.to, spec.http_path.is_some())?;
        writers.push(writer);
        readers.push(reader);
    }
    let head =
        spec.http_path.as_deref().map(|path| http::request_head(path, &spec.to.to_string(), spec.size));
    // Time for the reader threads to start before the first request is due.
    let start = Instant::now() + Duration::from_millis(50);
    let shared = Shared {
        spec: &spec,
        start,
        conns,
        deadline: start + spec.duration + DRAIN_LIMIT,
        stop: AtomicBool::new(false),
    };
    let (outcomes, sent, last_sent, send_error, stalled, lag) = std::thread::scope(|s| {
        let handles: Vec<_> = readers
            .into_iter()
            .enumerate()
            .map(|(c, reader)| {
                let shared = &shared;
                let mine = total / conns + u64::from((c as u64) < total % conns);
                s.spawn(move || receive(reader, c, mine, shared))
            })
            .collect();

        tighten_timer_slack();
        let head_len = head.as_ref().map_or(0, Vec::len);
        let mut request = head.clone().unwrap_or_default();
        request.resize(head_len + spec.size, 0);
        let mut lag = Histogram::default();
        let mut sent_per_conn = vec![0u64; writers.len()];
        let mut last_sent = Duration::ZERO;
        let (mut send_error, mut stalled) = (None, None);
        for i in 0..total {
            let due = start + intended_offset(i, spec.rate);
            let now = Instant::now();
            if now < due {
                std::thread::sleep(due - now);
            }
            let c = (i % conns) as usize;
            fill_request(&mut request[head_len..], sent_per_conn[c]);
            lag.record(Instant::now().saturating_duration_since(due));
            if let Err(err) = writers[c].write_all(&request) {
                let err = anyhow::Error::new(err);
                if is_timeout(&err) {
                    stalled = Some(format!("sending blocked for {}s on connection {c}", STALL.as_secs()));
                } else {
                    send_error = Some(err.context(format!("sending request {i} on connection {c}")));
                }
                break;
            }
            sent_per_conn[c] += 1;
            last_sent = start.elapsed();
        }
        if send_error.is_some() || stalled.is_some() {
            // Unblock the readers waiting for responses that will not come.
            shared.stop.store(true, Ordering::Relaxed);
            for w in &writers {
                let _ = w.shutdown(std::net::Shutdown::Both);
            }
        }
        let outcomes: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a response reader panicked"))))
            .collect();
        (outcomes, sent_per_conn.iter().sum::<u64>(), last_sent, send_error, stalled, lag)
    });
    if let Some(err) = send_error {
        return Err(err);
    }
    let mut report = LoadReport { stalled, ..LoadReport::default() };
    let mut histogram = Histogram::default();
    let mut last_response = Duration::ZERO;
    for outcome in outcomes {
        let received =
            outcome.with_context(|| format!("{} of {sent} responses verified", histogram.len()))?;
        histogram.merge(&received.latencies);
        last_response = last_response.max(received.last);
        for (status, n) in received.statuses {
            *report.statuses.entry(status).or_default() += n;
        }
        report.unexpected = report.unexpected.or(received.unexpected);
        report.stalled = report.stalled.or(received.stalled);
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
        drain_us: us(last_response.saturating_sub(intended_offset(total.saturating_sub(1), spec.rate))),
        ..report
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

    #[test]
    fn a_run_is_discarded_for_a_stall_lost_responses_a_wrong_status_or_a_missed_rate() {
        let good = LoadReport {
            target_rps: 1000,
            achieved_rps: 1000.0,
            sent: 10,
            completed: 10,
            ..LoadReport::default()
        };
        assert_eq!(good.discard_reason(), None);
        let http_ok = LoadReport { statuses: [(200, 10)].into(), ..good.clone() };
        assert_eq!(http_ok.discard_reason(), None);
        let denied = LoadReport {
            statuses: [(200, 7), (403, 3)].into(),
            unexpected: Some("403 \"RBAC: access denied\"".into()),
            ..good.clone()
        };
        let why = denied.discard_reason().expect("discarded");
        assert!(why.contains("3 × 403 of 10") && why.contains("RBAC: access denied"), "{why}");
        let lost = LoadReport { completed: 9, ..good.clone() };
        assert_eq!(lost.discard_reason().as_deref(), Some("9 of 10 responses arrived"));
        let stalled =
            LoadReport { completed: 4, stalled: Some("no response for 10s".into()), ..good.clone() };
        assert_eq!(
            stalled.discard_reason().as_deref(),
            Some("no response for 10s (4 of 10 responses arrived)")
        );
        let slow = LoadReport { achieved_rps: 900.0, ..good.clone() };
        assert!(slow.discard_reason().expect("discarded").starts_with("achieved 900 req/s"));
    }

    #[test]
    fn a_path_that_falls_behind_is_saturated() {
        let run = |drain_us| LoadReport {
            target_rps: 1000,
            achieved_rps: 1000.0,
            sent: 10_000,
            completed: 10_000,
            drain_us,
            ..LoadReport::default()
        };
        assert_eq!(run(3_000.0).saturated(), None, "a few milliseconds: keeping up");
        // 10,000 requests due over 10 s, the last answered 15 s late: 400 answers a second.
        let behind = run(15e6);
        assert!((behind.answered_rps() - 400.0).abs() < 1e-9, "{}", behind.answered_rps());
        let why = behind.saturated().expect("saturated");
        assert!(why.contains("15.0 s after") && why.contains("~400 req/s of 1000"), "{why}");
        assert_eq!(behind.discard_reason(), None, "kept: its latencies are what callers see");
    }
}
