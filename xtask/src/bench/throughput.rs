//! Throughput: `pod-app send` in the client pod streams a seeded pattern to `pod-app sink` in
//! the server pod for a fixed time on one or more connections; the sink verifies every byte and
//! the rate is what it verified over the time from the first connect to the last verdict.

use std::time::Duration;

use super::{
    modes::{Bed, SINK_PORT},
    results::{ThroughputRun, gbit_per_s},
};

/// Runs one throughput measurement; fails unless every byte sent was verified.
pub fn run(bed: &Bed, round: u32, streams: u32, duration: Duration) -> anyhow::Result<ThroughputRun> {
    let report = bed.topology.send(bed.client(), bed.target(SINK_PORT), streams, duration)?;
    anyhow::ensure!(
        report.ok && report.bytes_sent > 0 && report.bytes_verified == report.bytes_sent,
        "{}: {streams}-stream throughput run lost data: {} of {} bytes verified, {} of {} streams failed: {:?}",
        bed.mode.label(),
        report.bytes_verified,
        report.bytes_sent,
        report.failed,
        report.conns,
        report.errors
    );
    Ok(ThroughputRun {
        mode: bed.mode,
        round,
        streams,
        bytes: report.bytes_verified,
        elapsed_us: report.elapsed_us,
        gbit_per_s: gbit_per_s(report.bytes_verified, report.elapsed_us),
    })
}
